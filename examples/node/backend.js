// A minimal TalkJS backend on keyd: the endpoint behind TalkJS's refreshable tokens, and a webhook
// receiver. Browser side:
//
//   const session = new Talk.Session({
//     appId: 'tXXXXXXX',
//     me: me,
//     tokenFetcher: () => fetch('/talkjs-token', { credentials: 'include' })
//       .then((r) => (r.ok ? r.text() : Promise.reject(new Error(`token: ${r.status}`)))),
//   });
//
// Run:  KEYD_SOCKET=/run/keyd/keyd.sock PORT=3000 node backend.js
// The demo "sessions" come from $DEMO_SESSIONS ({"cookie value": "user id"}) and $DEMO_BANNED
// (["user id", ...]); replace currentUser() with your framework's session lookup.
'use strict';

const http = require('http');
// The keyd-client package (clients/node): in your app, `npm install /path/to/keyd/clients/node`
// and require('keyd-client').
const { KeydClient } = require('../../clients/node');

const keyd = new KeydClient(); // $KEYD_SOCKET, or /run/keyd/keyd.sock

const sessions = JSON.parse(process.env.DEMO_SESSIONS || '{}');
const banned = new Set(JSON.parse(process.env.DEMO_BANNED || '[]'));

/** The logged-in user's id for this request, or null. */
function currentUser(req) {
  const cookies = Object.fromEntries(
    (req.headers.cookie || '').split(';').map((c) => c.trim().split('=')).filter((p) => p.length === 2),
  );
  return Object.prototype.hasOwnProperty.call(sessions, cookies.session) ? sessions[cookies.session] : null;
}

function send(res, status, body, type = 'text/plain; charset=utf-8') {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
  res.end(body);
}

async function talkjsToken(req, res) {
  const userId = currentUser(req);
  // Never mint a token for someone who is not logged in, or who is banned: the token is a login.
  if (userId === null) return send(res, 401, 'not logged in\n');
  if (banned.has(userId)) return send(res, 403, 'banned\n');
  try {
    send(res, 200, await keyd.userToken(userId));
  } catch (e) {
    console.error(`keyd refused a token: ${e.code} (${e.status})`);
    send(res, 503, 'chat is unavailable right now\n');
  }
}

function talkjsWebhook(req, res) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    const raw = Buffer.concat(chunks); // the exact bytes: the signature covers them
    try {
      if (!(await keyd.verifyWebhook(req.headers, raw))) return send(res, 401, 'invalid webhook\n');
    } catch (e) {
      console.error(`keyd could not check a webhook: ${e.code} (${e.status})`);
      return send(res, 503, 'try again\n'); // TalkJS retries once
    }
    const event = JSON.parse(raw.toString('utf8'));
    // ... handle event.type here ...
    send(res, 200, JSON.stringify({ received: event.type }), 'application/json');
  });
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/talkjs-token') return talkjsToken(req, res);
  if (req.method === 'POST' && req.url === '/talkjs-webhook') return talkjsWebhook(req, res);
  send(res, 404, 'not found\n');
});

server.listen(Number(process.env.PORT || 3000), '127.0.0.1', () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
process.on('SIGTERM', () => {
  server.close();
  keyd.close();
});
