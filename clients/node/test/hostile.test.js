// keyd-client against servers that misbehave (a broken keyd, or whatever is listening where
// KEYD_SOCKET points): answers are bounded, errors are ClientErrors, and no answer's body (which
// may hold a token) ever reaches an error. Also the retry rule: a kept-alive connection closed
// before an answer is retried once, except for a proxied POST or PATCH.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const test = require('node:test');
const util = require('node:util');
const keyd = require('keyd-client');

const SECRET = 'eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.never-in-errors';
const OK = (body, extra = '') =>
  `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n${extra}\r\n${body}`;

/** A Unix socket server; `answer(request text, socket, n)` is called once per request head. */
async function fake(answer) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'keyd-fake-'));
  const socketPath = path.join(dir, 's');
  const state = { requests: 0, connections: 0 };
  const server = net.createServer((socket) => {
    state.connections += 1;
    let buffer = '';
    socket.on('error', () => {});
    socket.on('data', (data) => {
      buffer += data.toString('latin1');
      for (;;) {
        const end = buffer.indexOf('\r\n\r\n');
        if (end < 0) return;
        const length = Number((/content-length: *(\d+)/i.exec(buffer.slice(0, end)) || [0, 0])[1]);
        if (buffer.length < end + 4 + length) return;
        const head = buffer.slice(0, end);
        buffer = buffer.slice(end + 4 + length);
        state.requests += 1;
        answer(head, socket, state.requests);
      }
    });
  });
  await new Promise((resolve) => server.listen(socketPath, resolve));
  const client = new keyd.KeydClient({ socketPath, timeout: 1000 });
  return {
    client,
    state,
    close: () => {
      client.close();
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The call fails with `Cls` and code `code`, within `ms`, and the secret is nowhere in the error. */
async function refused(promise, Cls, code, ms = 3000) {
  const started = Date.now();
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof Cls, `${e.name}: ${e.message}`);
    assert.equal(e.code, code);
    const shown = `${util.inspect(e)} ${e.stack} ${JSON.stringify(e)} ${String(e)}`;
    assert.ok(!shown.includes('never-in-errors') && !shown.includes('c2VjcmV0'), shown);
    return true;
  });
  assert.ok(Date.now() - started < ms, `took ${Date.now() - started} ms`);
}

test('a huge declared body is refused unread', async () => {
  const f = await fake((head, socket) => {
    socket.write('HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n');
    socket.write(Buffer.alloc(64 * 1024, 'a'));
  });
  try {
    await refused(f.client.userToken('alice'), keyd.UnreachableError, 'bad_response');
  } finally {
    f.close();
  }
});

test('no Content-Length (chunked, or read to close) is refused', async () => {
  for (const answer of [
    'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n',
    `HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"token":"${SECRET}"}`,
  ]) {
    const f = await fake((head, socket) => socket.end(answer));
    try {
      await refused(f.client.userToken('alice'), keyd.UnreachableError, 'bad_response');
    } finally {
      f.close();
    }
  }
});

test("TalkJS's answers may be up to 8 MiB through the proxy, keyd's own up to 1 MiB", async () => {
  const big = `"${'x'.repeat(2 << 20)}"`;
  const f = await fake((head, socket, n) => {
    const upstream = n === 1 ? 'X-Keyd-Upstream: talkjs\r\n' : '';
    if (n === 3) socket.write(`HTTP/1.1 200 OK\r\nX-Keyd-Upstream: talkjs\r\nContent-Length: ${(8 << 20) + 1}\r\n\r\n`);
    else socket.write(OK(big, upstream));
  });
  try {
    const answer = await f.client.rest('GET', '/users/alice');
    assert.equal(answer.body.length, big.length);
    await refused(f.client.userToken('alice'), keyd.UnreachableError, 'bad_response');
    await refused(f.client.rest('GET', '/users/alice'), keyd.UnreachableError, 'bad_response');
  } finally {
    f.close();
  }
});

test('huge headers and malformed HTTP are refused', async () => {
  for (const answer of [
    `HTTP/1.1 200 OK\r\nX-Pad: ${'a'.repeat(100000)}\r\nContent-Length: 2\r\n\r\n{}`,
    `HTTP/1.1 2xx nonsense\r\n\r\n{"token":"${SECRET}"}`,
    `SSH-2.0-OpenSSH_9.2 ${SECRET}\r\n`,
  ]) {
    const f = await fake((head, socket) => socket.end(answer));
    try {
      await refused(f.client.userToken('alice'), keyd.UnreachableError, 'bad_response');
    } finally {
      f.close();
    }
  }
});

test('invalid JSON, or an answer without an error document, never quotes the body', async () => {
  const f = await fake((head, socket, n) => {
    if (n === 1) socket.write(OK(`{"token": "${SECRET}"`)); // cut short
    else if (n === 2) socket.write(`HTTP/1.1 500 Oops\r\nContent-Length: ${SECRET.length + 2}\r\n\r\n"${SECRET}"`);
    else if (n === 3) socket.write(OK(`{"token": ["${SECRET}"]}`));
    else socket.write(OK(`[${JSON.stringify(SECRET)}]`));
  });
  try {
    await refused(f.client.userToken('alice'), keyd.UnavailableError, 'bad_response');
    await refused(f.client.userToken('alice'), keyd.UnavailableError, 'bad_response');
    await refused(f.client.userToken('alice'), keyd.UnavailableError, 'bad_response');
    await refused(f.client.userToken('alice'), keyd.ClientError, 'bad_response'); // as keyd.client
  } finally {
    f.close();
  }
});

test('a server that never answers, or drips, is cut off at the timeout', async () => {
  const timers = [];
  const f = await fake((head, socket, n) => {
    if (n === 1) return; // silence
    socket.write('HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n');
    timers.push(setInterval(() => socket.writable && socket.write('a'), 50));
  });
  try {
    await refused(f.client.userToken('alice'), keyd.UnreachableError, 'unreachable', 2000);
    await refused(f.client.userToken('alice'), keyd.UnreachableError, 'unreachable', 2000);
  } finally {
    timers.forEach(clearInterval);
    f.close();
  }
});

test('a kept-alive connection closed unanswered is retried once on a fresh one', async () => {
  const f = await fake((head, socket, n) => {
    if (n === 2) socket.destroy(); // keyd closed it while idle: the request was never read
    else socket.write(OK(`{"token":"t${n}"}`));
  });
  try {
    assert.equal(await f.client.userToken('alice'), 't1');
    assert.equal(await f.client.userToken('alice'), 't3');
    assert.equal(f.state.connections, 2);
  } finally {
    f.close();
  }
});

test('a proxied POST or PATCH is never sent twice', async () => {
  for (const method of ['POST', 'PATCH']) {
    const f = await fake((head, socket, n) => {
      if (n === 2) socket.destroy();
      else socket.write(OK('{}', 'X-Keyd-Upstream: talkjs\r\n'));
    });
    try {
      await f.client.rest(method, '/conversations/c1/messages', { json: [] });
      await refused(f.client.rest(method, '/conversations/c1/messages', { json: [] }), keyd.UnreachableError, 'unreachable');
      assert.equal(f.state.requests, 2, `${method} was sent again`);
    } finally {
      f.close();
    }
  }
  const f = await fake((head, socket, n) => {
    if (n === 2) socket.destroy();
    else socket.write(OK('{}', 'X-Keyd-Upstream: talkjs\r\n'));
  });
  try {
    await f.client.rest('PUT', '/users/a', { json: {} });
    assert.equal((await f.client.rest('PUT', '/users/a', { json: {} })).status, 200);
    assert.equal(f.state.requests, 3, 'PUT is idempotent: retried');
  } finally {
    f.close();
  }
});

test('KEYD_SOCKET is read when no socketPath is given; the default otherwise', () => {
  const saved = process.env.KEYD_SOCKET;
  try {
    process.env.KEYD_SOCKET = '/somewhere/else.sock';
    assert.equal(new keyd.KeydClient().socketPath, '/somewhere/else.sock');
    delete process.env.KEYD_SOCKET;
    assert.equal(new keyd.KeydClient().socketPath, keyd.DEFAULT_SOCKET);
  } finally {
    if (saved === undefined) delete process.env.KEYD_SOCKET;
    else process.env.KEYD_SOCKET = saved;
  }
});
