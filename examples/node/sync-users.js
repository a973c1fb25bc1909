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
// It uses the keyd-client package (clients/node): keyd.rest() returns TalkJS's answer, and throws
// for keyd's own refusals.
'use strict';

const { KeydClient, RateLimitedError } = require('../../clients/node'); // require('keyd-client') in your app

const APP = process.env.KEYD_APP || 'default';
const ATTEMPTS = 5;
const keyd = new KeydClient(); // $KEYD_SOCKET, or /run/keyd/keyd.sock

const sleep = (seconds) => new Promise((r) => setTimeout(r, Math.min(seconds, 30) * 1000));

/** One user: {id, status} or {id, status, error, message}; keyd's message is the helpful part. */
async function putUser(user) {
  const { id, ...fields } = user;
  // encodeURIComponent: an id with "/" or "%" stays one path segment (keyd refuses "." and "..").
  const path = `/users/${encodeURIComponent(String(id))}`;
  for (let attempt = 1; ; attempt += 1) {
    let answer;
    try {
      answer = await keyd.rest('PUT', path, { json: fields, app: APP });
    } catch (e) {
      // keyd's own refusal (403 forbidden, 400 invalid_path, ...) or keyd unreachable.
      if (e instanceof RateLimitedError && attempt < ATTEMPTS) {
        await sleep(1);
        continue;
      }
      return { id, status: e.status, error: e.code, message: e.message };
    }
    if (answer.status === 429 && attempt < ATTEMPTS) {
      await sleep(Number(answer.retryAfter) || 1); // TalkJS's own rate limit
      continue;
    }
    if (answer.ok) return { id, status: answer.status };
    return { id, status: answer.status, error: `talkjs_${answer.status}`, message: answer.text().slice(0, 500) };
  }
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const users = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  let failed = 0;
  for (const user of users) {
    const result = await putUser(user);
    if (result.error) failed += 1;
    console.log(JSON.stringify(result));
  }
  keyd.close();
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  console.error(e.message);
  keyd.close();
  process.exitCode = 1;
});
