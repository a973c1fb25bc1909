// keyd-client: a TalkJS backend's side of keyd in Node.js (>= 18), no dependencies.
//
//   const { KeydClient, ForbiddenError } = require('keyd-client');
//   const keyd = new KeydClient();                      // $KEYD_SOCKET, or /run/keyd/keyd.sock
//   const token = await keyd.userToken('alice');        // JWT for new Talk.Session({ token })
//   const ok = await keyd.verifyWebhook(req.headers, rawBody);
//   const res = await keyd.rest('PUT', '/users/alice', { json: { name: 'Alice' } });
//
// It behaves as keyd's Python client (keyd/client.py) does: one keep-alive agent; a request on a
// kept-alive connection that keyd closed before answering is sent once more on a fresh one (not a
// proxied POST or PATCH, which keyd may already have forwarded); answers without a Content-Length,
// or larger than 1 MiB (8 MiB for TalkJS's answers through the proxy), are refused unread; errors
// are ClientError subclasses carrying .status (0: keyd not reached) and .code (the API's code), and
// never a response body (an answer can hold a token).
'use strict';

const http = require('http');

const DEFAULT_SOCKET = '/run/keyd/keyd.sock';
const MAX_RESPONSE = 1 << 20;
const MAX_REST_RESPONSE = 8 << 20; // keyd's default rest.max_response_body
const MAX_HEADER = 16 * 1024;
const TIMEOUT = 5000;
const REST_TIMEOUT = 35000; // above the proxy's default total timeout (15 s)
const UPSTREAM = 'x-keyd-upstream';
// The answers that mean "this webhook is not authentic": verifyWebhook returns false for them.
const WEBHOOK_REJECTIONS = new Set(['invalid_signature', 'stale_timestamp', 'missing_header', 'invalid_header']);
const RETRIED = new Set(['ECONNRESET', 'EPIPE']);

/** $KEYD_SOCKET when set (what `keyd dev` prints to export), else DEFAULT_SOCKET. */
function defaultSocket() {
  return process.env.KEYD_SOCKET || DEFAULT_SOCKET;
}

/** Every error: .status is the HTTP status (0 when keyd was not reached), .code the API's code. */
class ClientError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
  }
}
/** keyd cannot be reached: no socket, no permission, refused, reset, timed out, or a bad answer. */
class UnreachableError extends ClientError {}
/** keyd rejected the request itself (400, 404, 405, 413, 415, 422): fix the request. */
class InvalidRequestError extends ClientError {}
/** 403: no grant allows this caller (its uid, group or unit) to make this request. */
class ForbiddenError extends ClientError {}
/** 429: the caller's grant rate is used up; slow down. */
class RateLimitedError extends ClientError {}
/** 401 from POST /v1/webhooks/verify: the webhook is not authentic or not fresh. */
class WebhookRejectedError extends ClientError {}
/** 5xx: keyd cannot answer right now (shutting down, at its connection limit, upstream error). */
class UnavailableError extends ClientError {}
/** 503 key_unavailable: the app's key is not loaded, or is past refresh.max_stale. */
class KeyUnavailableError extends UnavailableError {}

/** The ClientError subclass for an error answer. */
function errorFor(status, code, message) {
  let Cls = ClientError;
  if (status === 0) Cls = UnreachableError;
  else if (status === 401) Cls = WebhookRejectedError;
  else if (status === 403) Cls = ForbiddenError;
  else if (status === 429) Cls = RateLimitedError;
  else if (code === 'key_unavailable') Cls = KeyUnavailableError;
  else if (status >= 500) Cls = UnavailableError;
  else if (status >= 400) Cls = InvalidRequestError;
  return new Cls(status, code, message);
}

function isObject(value) {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** The document of a 200, or the matching ClientError thrown. */
function checked(status, data) {
  if (status === 200 && isObject(data)) return data;
  const error = isObject(data) ? data.error : undefined;
  if (isObject(error)) {
    throw errorFor(status, String(error.code ?? 'error'), String(error.message ?? ''));
  }
  throw errorFor(status, 'bad_response', `keyd answered ${status} without an error document`);
}

function decode(status, raw) {
  if (raw.length === 0) return {};
  try {
    return JSON.parse(raw.toString('utf8'));
  } catch (e) {
    throw new UnavailableError(status, 'bad_response', 'keyd answered with invalid JSON');
  }
}

function unreachable(socketPath, error) {
  const code = error && error.code;
  if (code === 'ENOENT') return new UnreachableError(0, 'unreachable', `no keyd socket at ${socketPath}`);
  if (code === 'EACCES') {
    return new UnreachableError(
      0,
      'unreachable',
      `permission denied opening ${socketPath}: only its owner and group may connect ` +
        "(ask to be added to the socket's group, then log in again)",
    );
  }
  if (code === 'ECONNREFUSED') {
    return new UnreachableError(0, 'unreachable', `nothing is listening on ${socketPath} (is keyd running?)`);
  }
  if (typeof code === 'string' && code.startsWith('HPE_')) {
    return new UnreachableError(0, 'bad_response', 'keyd answered with a malformed HTTP response');
  }
  return new UnreachableError(0, 'unreachable', `cannot reach keyd at ${socketPath}: ${code || 'connection failed'}`);
}

/** A value an HTTP sender could have sent as it is: ASCII, no CR, LF or NUL. */
function safe(value) {
  return typeof value === 'string' && /^[\x01-\x09\x0b\x0c\x0e-\x7f]*$/.test(value);
}

/** Whether a proxied call may be sent again when its connection closed without an answer. */
function retrySafe(method) {
  return ['GET', 'PUT', 'DELETE'].includes(method.toUpperCase());
}

/** What TalkJS answered to a proxied call: status, raw body, Content-Type and Retry-After. */
class RestResponse {
  constructor(status, body, contentType, retryAfter) {
    this.status = status;
    this.body = body;
    this.contentType = contentType;
    this.retryAfter = retryAfter;
  }

  get ok() {
    return this.status >= 200 && this.status < 300;
  }

  text() {
    return this.body.toString('utf8');
  }

  /** The body decoded as JSON (null for an empty body); throws SyntaxError when it is not JSON. */
  json() {
    return this.body.length ? JSON.parse(this.text()) : null;
  }
}

class KeydClient {
  /**
   * @param {{socketPath?: string, timeout?: number, maxSockets?: number}} options
   *   timeout: milliseconds per request (default 5000); maxSockets: keep-alive connections (16).
   */
  constructor({ socketPath, timeout = TIMEOUT, maxSockets = 16 } = {}) {
    this.socketPath = socketPath || defaultSocket();
    this.timeout = timeout;
    this.agent = new http.Agent({ keepAlive: true, maxSockets });
  }

  /** Close the kept-alive connections (a process exits sooner). */
  close() {
    this.agent.destroy();
  }

  /** One request: {status, data} (decoded JSON); throws UnreachableError when keyd is not reached. */
  async request(method, path, body = null, headers = {}) {
    if (typeof body === 'string') body = Buffer.from(body);
    const { status, raw } = await this._raw(method, path, body, headers, this.timeout, true);
    return { status, data: decode(status, raw) };
  }

  async _raw(method, path, body, headers, timeout, retry) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this._once(method, path, body, headers, timeout);
      } catch (failure) {
        // A kept-alive connection keyd closed while idle: try once on a fresh one.
        if (!(failure instanceof Stale) || attempt === 2 || !retry) {
          throw failure instanceof Stale ? unreachable(this.socketPath, failure.error) : failure;
        }
      }
    }
  }

  _once(method, path, body, headers, timeout) {
    return new Promise((resolve, reject) => {
      let answered = false;
      let settled = false;
      const finish = (fn, value) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        fn(value);
      };
      const req = http.request({
        socketPath: this.socketPath,
        path,
        method,
        agent: this.agent,
        maxHeaderSize: MAX_HEADER,
        headers: { Host: 'keyd', 'Content-Length': body ? body.length : 0, ...headers },
      });
      const timer = setTimeout(() => {
        req.destroy();
        finish(reject, new UnreachableError(0, 'unreachable', `keyd at ${this.socketPath} did not answer in time`));
      }, timeout);
      req.on('response', (res) => {
        answered = true;
        const limit = res.headers[UPSTREAM] ? MAX_REST_RESPONSE : MAX_RESPONSE;
        const declared = res.headers['content-length'];
        const length = /^[0-9]{1,10}$/.test(declared || '') ? Number(declared) : -1;
        // A known length within the limit, or no body is read at all (a broken or hostile peer on
        // the socket path must not make the caller buffer GiBs).
        if (res.headers['transfer-encoding'] !== undefined || length < 0 || length > limit) {
          req.destroy();
          finish(reject, new UnreachableError(0, 'bad_response', "keyd's response has no usable Content-Length"));
          return;
        }
        const chunks = [];
        let size = 0;
        res.on('data', (chunk) => {
          size += chunk.length;
          if (size > length) req.destroy();
          else chunks.push(chunk);
        });
        res.on('end', () => {
          if (size !== length) return;
          finish(resolve, { status: res.statusCode, headers: res.headers, raw: Buffer.concat(chunks, size) });
        });
        res.on('error', () => finish(reject, new UnreachableError(0, 'unreachable', 'keyd closed the connection mid-answer')));
        res.on('close', () => {
          if (size !== length || !res.complete) {
            finish(reject, new UnreachableError(0, 'unreachable', 'keyd closed the connection mid-answer'));
          }
        });
      });
      req.on('error', (error) => {
        if (!answered && req.reusedSocket && RETRIED.has(error.code)) finish(reject, new Stale(error));
        else finish(reject, unreachable(this.socketPath, error));
      });
      req.end(body || undefined);
    });
  }

  async _post(path, body, headers = { 'Content-Type': 'application/json' }) {
    const { status, data } = await this.request('POST', path, body, headers);
    return checked(status, data);
  }

  /** POST /v1/tokens with the given fields (undefined and null left out); the whole answer. */
  token(fields) {
    return this._post('/v1/tokens', payload(fields));
  }

  /** A TalkJS user token (JWT) for `userId`; options: ttl (seconds), app. */
  async userToken(userId, { ttl, app } = {}) {
    return stringField(await this.token({ user_id: userId, ttl, app }), 'token');
  }

  /** A TalkJS REST API token (needs a grant with type "app"). */
  async appToken({ ttl, app } = {}) {
    return stringField(await this.token({ type: 'app', ttl, app }), 'token');
  }

  /** The legacy identity-verification signature (hex HMAC-SHA256 of the user id). */
  async signature(userId, { uppercase = false, app } = {}) {
    const doc = await this._post('/v1/signatures', payload({ user_id: userId, uppercase: uppercase || undefined, app }));
    return stringField(doc, 'signature');
  }

  /**
   * true when TalkJS signed this webhook recently, false when keyd judges it not authentic.
   * `headers`: the incoming request's headers (any case); `rawBody`: a Buffer of the exact bytes
   * received. Throws a ClientError when keyd cannot decide (answer 5xx so that TalkJS retries).
   */
  async verifyWebhook(headers, rawBody, { app } = {}) {
    const lowered = {};
    for (const [name, value] of Object.entries(headers || {})) lowered[name.toLowerCase()] = value;
    const forward = { 'Content-Type': 'application/json' };
    for (const name of ['X-TalkJS-Timestamp', 'X-TalkJS-Signature']) {
      const value = lowered[name.toLowerCase()];
      if (safe(value)) forward[name] = value; // else keyd answers missing_header: not authentic
    }
    const path = '/v1/webhooks/verify' + (app !== undefined ? `?app=${encodeURIComponent(app)}` : '');
    try {
      await this._post(path, Buffer.from(rawBody), forward);
      return true;
    } catch (e) {
      if ((e instanceof WebhookRejectedError || e instanceof InvalidRequestError) && WEBHOOK_REJECTIONS.has(e.code)) {
        return false;
      }
      throw e;
    }
  }

  /** {status, data}: GET /v1/health; 503 is an answer here, not an error. */
  async health() {
    const { status, data } = await this.request('GET', '/v1/health');
    if (!isObject(data)) throw new UnavailableError(status, 'bad_response', 'keyd answered health with a non-object');
    return { status, data };
  }

  /**
   * Call TalkJS's REST API through keyd: `rest('PUT', '/users/alice', { json: {...} })`. `path` is
   * TalkJS's path below /v1/APP_ID (percent-encode ids: encodeURIComponent). Resolves to a
   * RestResponse for whatever TalkJS answered (4xx and 5xx included); throws for keyd's own refusals
   * (ForbiddenError, RateLimitedError, InvalidRequestError, UnavailableError for 502/504).
   */
  async rest(method, path, { json, app, timeout = REST_TIMEOUT } = {}) {
    if (typeof path !== 'string' || !path.startsWith('/')) {
      throw new TypeError('path must start with /, e.g. /users/alice');
    }
    const url = `/v1/rest/${encodeURIComponent(app || 'default')}${path}`;
    const headers = { Accept: 'application/json' };
    let body = null;
    if (json !== undefined) {
      body = Buffer.from(JSON.stringify(json));
      headers['Content-Type'] = 'application/json';
    }
    const { status, headers: fields, raw } = await this._raw(method, url, body, headers, timeout, retrySafe(method));
    if (fields[UPSTREAM] !== 'talkjs') checked(status, decode(status, raw)); // keyd's own answer
    return new RestResponse(status, raw, fields['content-type'] || '', fields['retry-after'] ?? null);
  }
}

/** A kept-alive connection that closed before any answer (internal: retried or turned into an error). */
class Stale {
  constructor(error) {
    this.error = error;
  }
}

function payload(fields) {
  const out = {};
  for (const [name, value] of Object.entries(fields)) if (value !== undefined && value !== null) out[name] = value;
  return Buffer.from(JSON.stringify(out));
}

function stringField(doc, name) {
  if (typeof doc[name] !== 'string') throw new UnavailableError(200, 'bad_response', `keyd's answer has no ${name}`);
  return doc[name];
}

module.exports = {
  DEFAULT_SOCKET,
  MAX_RESPONSE,
  MAX_REST_RESPONSE,
  defaultSocket,
  KeydClient,
  RestResponse,
  ClientError,
  UnreachableError,
  InvalidRequestError,
  ForbiddenError,
  RateLimitedError,
  WebhookRejectedError,
  UnavailableError,
  KeyUnavailableError,
};
