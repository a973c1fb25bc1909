// A TalkJS backend's side of keyd in Node.js: no dependencies, only `http.request` with `socketPath`.
//
//   const keyd = require('./keyd');
//   const token = await keyd.userToken('alice');              // JWT for new Talk.Session({ token })
//   const sig = await keyd.signature('alice');                // legacy identity verification
//   const ok = await keyd.verifyWebhook(req.headers, rawBody); // rawBody: the exact bytes received
//
// Errors are `KeydError` with `.status` (0 when keyd is unreachable) and `.code` (the API's code).
//
// Command line (used by the tests):  node keyd.js token alice | app-token | signature alice
// The socket is $KEYD_SOCKET, or /run/keyd/keyd.sock.
'use strict';

const http = require('http');

const SOCKET = process.env.KEYD_SOCKET || '/run/keyd/keyd.sock';
// One keep-alive agent: a request reuses an open connection instead of connecting each time.
const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });

class KeydError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'KeydError';
    this.status = status;
    this.code = code;
  }
}

function request(method, path, body, headers = {}, socketPath = SOCKET) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath, path, method, agent, headers: { 'Content-Length': body ? body.length : 0, ...headers } },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          let doc;
          try {
            doc = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch (e) {
            return reject(new KeydError(res.statusCode, 'bad_response', 'keyd answered with invalid JSON'));
          }
          if (res.statusCode === 200) return resolve(doc);
          const err = (doc && doc.error) || {};
          reject(new KeydError(res.statusCode, err.code || 'error', err.message || `keyd answered ${res.statusCode}`));
        });
      },
    );
    req.setTimeout(5000, () => req.destroy(new Error('keyd did not answer in time')));
    req.on('error', (e) => reject(new KeydError(0, 'unreachable', `cannot reach keyd at ${socketPath}: ${e.message}`)));
    req.end(body);
  });
}

function postJson(path, payload) {
  return request('POST', path, Buffer.from(JSON.stringify(payload)), { 'Content-Type': 'application/json' });
}

/** The whole POST /v1/tokens answer: {token, type, app, app_id, expires_at, key_version}. */
function token(fields) {
  return postJson('/v1/tokens', fields);
}

/** A TalkJS user token for `userId` (optional: ttl in seconds, app name). */
async function userToken(userId, { ttl, app } = {}) {
  return (await token({ user_id: userId, ttl, app })).token;
}

/** A TalkJS REST API token (the caller needs a grant with type "app"). */
async function appToken({ ttl, app } = {}) {
  return (await token({ type: 'app', ttl, app })).token;
}

/** Legacy identity verification: hex HMAC-SHA256 of the user id. */
async function signature(userId, { uppercase = false, app } = {}) {
  return (await postJson('/v1/signatures', { user_id: userId, uppercase, app })).signature;
}

const REJECTED = new Set(['invalid_signature', 'stale_timestamp', 'missing_header', 'invalid_header']);

/**
 * true when TalkJS signed this webhook recently, false when it is not authentic.
 * `headers` are the incoming request's headers (Node lower-cases them); `rawBody` is a Buffer of the
 * exact bytes received (do not re-serialise parsed JSON). Throws KeydError when keyd cannot decide.
 */
async function verifyWebhook(headers, rawBody, { app } = {}) {
  const forward = { 'Content-Type': 'application/json' };
  for (const name of ['x-talkjs-timestamp', 'x-talkjs-signature']) {
    if (typeof headers[name] === 'string') forward[name] = headers[name];
  }
  const path = '/v1/webhooks/verify' + (app ? `?app=${encodeURIComponent(app)}` : '');
  try {
    await request('POST', path, rawBody, forward);
    return true;
  } catch (e) {
    if (e instanceof KeydError && REJECTED.has(e.code)) return false;
    throw e;
  }
}

module.exports = { KeydError, request, token, userToken, appToken, signature, verifyWebhook, agent };

if (require.main === module) {
  const [command, arg] = process.argv.slice(2);
  const run = {
    token: () => token({ user_id: arg }),
    'app-token': () => token({ type: 'app' }),
    signature: () => postJson('/v1/signatures', { user_id: arg }),
  }[command];
  if (!run) {
    console.error('usage: node keyd.js token USER_ID | app-token | signature USER_ID');
    process.exit(2);
  }
  run()
    .then((doc) => {
      console.log(JSON.stringify(doc));
      agent.destroy();
    })
    .catch((e) => {
      console.error(`keyd: ${e.code}: ${e.message}`);
      agent.destroy();
      process.exit(1);
    });
}
