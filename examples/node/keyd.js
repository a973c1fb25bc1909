// keyd from the command line with the keyd-client package (clients/node), for a first try and for
// the tests:  node keyd.js token alice | app-token | signature alice
// The socket is $KEYD_SOCKET, or /run/keyd/keyd.sock. In your app:
//
//   const { KeydClient } = require('keyd-client');   // npm install /path/to/keyd/clients/node
//   const keyd = new KeydClient();
//   const token = await keyd.userToken('alice');      // JWT for new Talk.Session({ token })
'use strict';

const { KeydClient } = require('../../clients/node');

const [command, arg] = process.argv.slice(2);
const keyd = new KeydClient();
const run = {
  token: () => keyd.token({ user_id: arg }),
  'app-token': () => keyd.token({ type: 'app' }),
  signature: async () => ({ signature: await keyd.signature(arg) }),
}[command];
if (!run) {
  console.error('usage: node keyd.js token USER_ID | app-token | signature USER_ID');
  process.exit(2);
}
run()
  .then((doc) => console.log(JSON.stringify(doc)))
  .catch((e) => {
    console.error(`keyd: ${e.code}: ${e.message}`);
    process.exitCode = 1;
  })
  .finally(() => keyd.close());
