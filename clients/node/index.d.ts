/// <reference types="node" />
// Types for keyd-client (index.js): keyd's Unix socket API from Node.js.

export declare const DEFAULT_SOCKET: string;
export declare const MAX_RESPONSE: number;
export declare const MAX_REST_RESPONSE: number;
/** $KEYD_SOCKET when set, else DEFAULT_SOCKET. */
export declare function defaultSocket(): string;

/** Every error the client throws about keyd: .status (0 when keyd was not reached) and .code. */
export declare class ClientError extends Error {
  constructor(status: number, code: string, message: string);
  readonly status: number;
  readonly code: string;
}
/** keyd cannot be reached: no socket, no permission, refused, reset, timed out, or a bad answer. */
export declare class UnreachableError extends ClientError {}
/** keyd rejected the request itself (400, 404, 405, 413, 415, 422): fix the request. */
export declare class InvalidRequestError extends ClientError {}
/** 403: no grant allows this caller to make this request. */
export declare class ForbiddenError extends ClientError {}
/** 429: the caller's grant rate is used up. */
export declare class RateLimitedError extends ClientError {}
/** 401 from the webhook check. */
export declare class WebhookRejectedError extends ClientError {}
/** 5xx: keyd cannot answer right now. */
export declare class UnavailableError extends ClientError {}
/** 503 key_unavailable: the app's key is not loaded, or is past refresh.max_stale. */
export declare class KeyUnavailableError extends UnavailableError {}

export interface KeydClientOptions {
  /** The socket; default $KEYD_SOCKET, else /run/keyd/keyd.sock. */
  socketPath?: string;
  /** Milliseconds per request (default 5000). */
  timeout?: number;
  /** Keep-alive connections kept open (default 16). */
  maxSockets?: number;
}

export interface TokenFields {
  user_id?: string;
  type?: 'user' | 'app';
  ttl?: number;
  app?: string;
  [field: string]: unknown;
}

/** The whole POST /v1/tokens answer. */
export interface TokenAnswer {
  token: string;
  type: 'user' | 'app';
  app: string;
  app_id: string;
  expires_at: number;
  key_version: number;
  [field: string]: unknown;
}

/** What TalkJS answered to a proxied call (4xx and 5xx included). */
export declare class RestResponse {
  readonly status: number;
  readonly body: Buffer;
  readonly contentType: string;
  readonly retryAfter: string | null;
  readonly ok: boolean;
  text(): string;
  json(): unknown;
}

export type RestMethod = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

export declare class KeydClient {
  constructor(options?: KeydClientOptions);
  readonly socketPath: string;
  readonly timeout: number;
  close(): void;
  request(
    method: string,
    path: string,
    body?: Buffer | string | null,
    headers?: Record<string, string>,
  ): Promise<{ status: number; data: unknown }>;
  token(fields: TokenFields): Promise<TokenAnswer>;
  userToken(userId: string, options?: { ttl?: number; app?: string }): Promise<string>;
  appToken(options?: { ttl?: number; app?: string }): Promise<string>;
  signature(userId: string, options?: { uppercase?: boolean; app?: string }): Promise<string>;
  verifyWebhook(
    headers: Record<string, string | string[] | undefined>,
    rawBody: Buffer | Uint8Array | string,
    options?: { app?: string },
  ): Promise<boolean>;
  health(): Promise<{ status: number; data: Record<string, unknown> }>;
  rest(
    method: RestMethod,
    path: string,
    options?: { json?: unknown; app?: string; timeout?: number },
  ): Promise<RestResponse>;
}
