// keyd-client against a live keyd (started by tests/integration/test_clients.py, which sets
// KEYD_SOCKET, KEYD_TEST_KEY and KEYD_TEST_APP_ID). Tokens are verified with jsonwebtoken and
// signatures with node's own HMAC, against the key in Vault.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const test = require('node:test');
const jwt = require('jsonwebtoken');
const keyd = require('keyd-client');

const KEY = process.env.KEYD_TEST_KEY;
const APP_ID = process.env.KEYD_TEST_APP_ID;
const SOCKET = process.env.KEYD_SOCKET;

test('the test environment names a live keyd', () => {
  assert.ok(KEY && APP_ID && SOCKET, 'run by tests/integration/test_clients.py');
});

test('user and app tokens verify with jsonwebtoken against the key in Vault', async () => {
  const client = new keyd.KeydClient(); // $KEYD_SOCKET
  try {
    assert.equal(client.socketPath, SOCKET);
    const token = await client.userToken('alice', { ttl: 600 });
    const claims = jwt.verify(token, KEY, { algorithms: ['HS256'], issuer: APP_ID });
    assert.equal(claims.sub, 'alice');
    assert.equal(claims.tokenType, 'user');
    assert.equal(claims.exp - claims.iat, 600);
    const app = jwt.verify(await client.appToken(), KEY, { algorithms: ['HS256'] });
    assert.equal(app.tokenType, 'app');
    assert.equal(app.sub, undefined);
    const doc = await client.token({ user_id: 'bob' });
    assert.equal(doc.app_id, APP_ID);
    assert.equal(doc.key_version, 1);
  } finally {
    client.close();
  }
});

test('keep-alive: many calls share a few connections', async () => {
  const client = new keyd.KeydClient({ maxSockets: 2 });
  let connects = 0;
  const create = client.agent.createConnection.bind(client.agent);
  client.agent.createConnection = (...args) => {
    connects += 1;
    return create(...args);
  };
  try {
    for (let i = 0; i < 20; i += 1) await client.userToken(`u${i}`);
    await Promise.all(Array.from({ length: 10 }, (_, i) => client.userToken(`p${i}`)));
    assert.ok(connects <= 2, `${connects} connections for 30 calls`);
  } finally {
    client.close();
  }
});

test('signatures are HMAC-SHA256 of the user id', async () => {
  const client = new keyd.KeydClient({ socketPath: SOCKET });
  try {
    const expected = crypto.createHmac('sha256', KEY).update('alice').digest('hex');
    assert.equal(await client.signature('alice'), expected);
    assert.equal(await client.signature('alice', { uppercase: true }), expected.toUpperCase());
  } finally {
    client.close();
  }
});

test('webhooks: authentic ones true, forged or unsafe ones false', async () => {
  const client = new keyd.KeydClient();
  try {
    const body = Buffer.from('{"type":"message.sent","data":{}}');
    const ts = String(Date.now());
    const sig = crypto.createHmac('sha256', KEY).update(`${ts}.`).update(body).digest('hex').toUpperCase();
    assert.equal(await client.verifyWebhook({ 'x-talkjs-timestamp': ts, 'x-talkjs-signature': sig }, body), true);
    assert.equal(await client.verifyWebhook({ 'X-TalkJS-Timestamp': ts, 'X-TalkJS-Signature': sig }, body), true);
    const other = Buffer.from(body.toString().replace('sent', 'sunt'));
    assert.equal(await client.verifyWebhook({ 'x-talkjs-timestamp': ts, 'x-talkjs-signature': sig }, other), false);
    assert.equal(await client.verifyWebhook({}, body), false);
    // A header value no sender could send (CR LF: header injection) is dropped, not forwarded.
    const injected = { 'x-talkjs-timestamp': ts, 'x-talkjs-signature': `${sig}\r\nX-Evil: 1` };
    assert.equal(await client.verifyWebhook(injected, body), false);
  } finally {
    client.close();
  }
});

test("keyd's refusals are the Python client's error classes", async () => {
  const client = new keyd.KeydClient();
  try {
    await assert.rejects(client.userToken(''), (e) => e instanceof keyd.InvalidRequestError && e.status === 422);
    await assert.rejects(client.userToken('a', { app: 'nope' }), (e) => e instanceof keyd.InvalidRequestError && e.status === 404);
    await assert.rejects(client.rest('DELETE', '/users/alice'), (e) => {
      assert.ok(e instanceof keyd.ForbiddenError, e.name);
      assert.equal(e.status, 403);
      assert.equal(e.code, 'forbidden');
      assert.match(e.message, /DELETE \/users\/alice/);
      return true;
    });
    assert.ok(new keyd.KeyUnavailableError(503, 'key_unavailable', '') instanceof keyd.UnavailableError);
    const { status, data } = await client.health();
    assert.equal(status, 200);
    assert.equal(data.status, 'ok');
  } finally {
    client.close();
  }
});

test('the REST proxy: TalkJS answers are RestResponses, ids are one segment', async () => {
  const client = new keyd.KeydClient();
  try {
    const put = await client.rest('PUT', '/users/alice', { json: { name: 'Alice' } });
    assert.equal(put.status, 200);
    assert.ok(put.ok);
    assert.equal(put.contentType, 'application/json');
    assert.deepEqual(put.json(), { ok: true, method: 'PUT', path: `/v1/${APP_ID}/users/alice` });
    const get = await client.rest('GET', `/users/${encodeURIComponent('bob smith é')}`);
    assert.equal(get.json().path, `/v1/${APP_ID}/users/bob%20smith%20%C3%A9`);
    await assert.rejects(client.rest('GET', `/users/${encodeURIComponent('a/../b')}`), keyd.InvalidRequestError);
    await assert.rejects(client.rest('GET', 'users/alice'), TypeError);
  } finally {
    client.close();
  }
});

test('a socket that is not there, or not a socket, is UnreachableError naming it', async () => {
  for (const socketPath of [`${SOCKET}.missing`, '/etc/hostname', '/etc']) {
    const client = new keyd.KeydClient({ socketPath });
    await assert.rejects(client.userToken('alice'), (e) => {
      assert.ok(e instanceof keyd.UnreachableError, `${socketPath}: ${e.name}`);
      assert.equal(e.status, 0);
      assert.ok(e.message.includes(socketPath), e.message);
      return true;
    });
    client.close();
  }
});
