// A sync job: pushes users to TalkJS through keyd's REST proxy. This process never holds a TalkJS
// token: keyd checks each call against the job's grant and signs it itself.
//
//   echo '[{"id": "alice", "name": "Alice", "email": ["alice@example.com"]}]' | node sync-users.js
//
// Every object is one user: "id" is the TalkJS user id, the other fields are sent as the body of
// TalkJS's PUT /v1/{appId}/users/{id}. One JSON line per user is printed; the exit code is 1 when
// any user failed. TalkJS's 429 (and keyd's own 429 too_many_requests) are waited out and retried.
// The grant it needs (config.toml):
//   [[grant]]
//   unit = "talkjs-sync.service"
//   user = "talkjs-sync"
//   types = ["rest"]
//   rest = ["PUT /users/*"]
// The socket is $KEYD_SOCKET, or /run/keyd/keyd.sock; the app is $KEYD_APP, or "default".
'use strict';

const http = require('http');

const SOCKET = process.env.KEYD_SOCKET || '/run/keyd/keyd.sock';
const APP = process.env.KEYD_APP || 'default';
const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
const ATTEMPTS = 5;

/** One call through keyd: {status, body, retryAfter, fromTalkjs}; rejects when keyd is unreachable. */
function rest(method, path, payload) {
  const body = payload === undefined ? null : Buffer.from(JSON.stringify(payload));
  const headers = { Accept: 'application/json', 'Content-Length': body ? body.length : 0 };
  if (body) headers['Content-Type'] = 'application/json';
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath: SOCKET, path: `/v1/rest/${encodeURIComponent(APP)}${path}`, method, agent, headers },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () =>
          resolve({
            status: res.statusCode,
            body: Buffer.concat(chunks).toString('utf8'),
            retryAfter: Number(res.headers['retry-after']) || 1,
            // Set on TalkJS's answers; keyd's own errors ({"error": {"code": ...}}) lack it.
            fromTalkjs: res.headers['x-keyd-upstream'] === 'talkjs',
          }),
        );
      },
    );
    req.setTimeout(35000, () => req.destroy(new Error('keyd did not answer in time')));
    req.on('error', reject);
    req.end(body);
  });
}

/** {error, message} for a failed call: keyd's code and its message (the helpful part), or TalkJS's. */
function failure(answer) {
  if (answer.fromTalkjs) return { error: `talkjs_${answer.status}`, message: answer.body.slice(0, 500) };
  try {
    const { code, message } = JSON.parse(answer.body).error;
    return { error: code, message };
  } catch (e) {
    return { error: 'bad_response', message: answer.body.slice(0, 200) };
  }
}

async function putUser(user) {
  const { id, ...fields } = user;
  // encodeURIComponent: an id with "/" or "%" stays one path segment (keyd refuses "." and "..").
  const path = `/users/${encodeURIComponent(String(id))}`;
  let answer;
  for (let attempt = 1; attempt <= ATTEMPTS; attempt += 1) {
    answer = await rest('PUT', path, fields);
    if (answer.status !== 429) break;
    const seconds = Math.min(answer.retryAfter, 30);
    await new Promise((r) => setTimeout(r, seconds * 1000));
  }
  const ok = answer.status >= 200 && answer.status < 300;
  return ok ? { id, status: answer.status } : { id, status: answer.status, ...failure(answer) };
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const users = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  let failed = 0;
  for (const user of users) {
    let result;
    try {
      result = await putUser(user);
    } catch (e) {
      result = { id: user.id, status: 0, error: 'unreachable', message: e.message };
    }
    if (result.error) failed += 1;
    console.log(JSON.stringify(result));
  }
  agent.destroy();
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  console.error(e.message);
  process.exitCode = 1;
});
