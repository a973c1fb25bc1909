<?php

declare(strict_types=1);

namespace Keyd;

/**
 * keyd's socket API from PHP (the curl extension): TalkJS tokens, signatures, webhook checks, and
 * TalkJS's REST API through keyd's proxy.
 *
 *     $keyd = new \Keyd\Client();                      // $KEYD_SOCKET, or /run/keyd/keyd.sock
 *     $token = $keyd->userToken('alice');              // JWT for new Talk.Session({ token })
 *     $ok = $keyd->verifyWebhook(getallheaders(), file_get_contents('php://input'));
 *     $answer = $keyd->rest('PUT', '/users/alice', ['name' => 'Alice']);
 *
 * It behaves as keyd's Python client (keyd/client.py): one curl handle keeps the connection alive
 * between calls (a php-fpm worker reuses it); a request on a kept-alive connection that keyd closed
 * before answering is sent once more on a fresh one, except a proxied POST or PATCH (keyd may
 * already have forwarded it: those always take a fresh connection, so curl never resends them
 * either); answers without a Content-Length, or over 1 MiB (8 MiB for TalkJS's answers through the
 * proxy), are refused unread. Errors are ClientException subclasses and never hold a response body,
 * not in their traces either (#[\SensitiveParameter] on the parameters that carry one).
 */
final class Client
{
    public const DEFAULT_SOCKET = '/run/keyd/keyd.sock';
    public const MAX_RESPONSE = 1 << 20;
    public const MAX_REST_RESPONSE = 8 << 20;  // keyd's default rest.max_response_body
    public const MAX_HEAD = 64 * 1024;
    public const REST_TIMEOUT = 35.0;  // above the proxy's default total timeout (15 s)
    /** The answers that mean "this webhook is not authentic": verifyWebhook returns false for them. */
    public const WEBHOOK_REJECTIONS = ['invalid_signature', 'stale_timestamp', 'missing_header', 'invalid_header'];
    private const RETRIED = [CURLE_GOT_NOTHING, CURLE_SEND_ERROR, CURLE_RECV_ERROR];

    public readonly string $socketPath;
    private ?\CurlHandle $curl = null;

    /** @param float $timeout seconds per request */
    public function __construct(?string $socketPath = null, public readonly float $timeout = 5.0)
    {
        $this->socketPath = $socketPath ?? self::defaultSocket();
    }

    /** $KEYD_SOCKET when set (what `keyd dev` prints to export), else DEFAULT_SOCKET. */
    public static function defaultSocket(): string
    {
        $env = getenv('KEYD_SOCKET');
        return is_string($env) && $env !== '' ? $env : self::DEFAULT_SOCKET;
    }

    /** Close the kept-alive connection. */
    public function close(): void
    {
        $this->curl = null;  // curl_close is a no-op since PHP 8; dropping the handle closes it
    }

    /**
     * One request: [status, decoded JSON]. Throws UnreachableException when keyd is not reached.
     * @param array<string, string> $headers
     * @return array{0: int, 1: mixed}
     */
    public function request(string $method, string $path, ?string $body = null, array $headers = []): array
    {
        [$status, , $raw] = $this->raw($method, $path, $body, $headers, $this->timeout, true);
        return [$status, self::decode($status, $raw)];
    }

    /**
     * POST /v1/tokens with the given fields (null values left out); the whole answer.
     * @param array<string, mixed> $fields
     * @return array<string, mixed>
     */
    public function token(array $fields): array
    {
        return $this->post('/v1/tokens', self::payload($fields));
    }

    /** A TalkJS user token (JWT) for $userId. */
    public function userToken(string $userId, ?int $ttl = null, ?string $app = null): string
    {
        return self::stringField($this->token(['user_id' => $userId, 'ttl' => $ttl, 'app' => $app]), 'token');
    }

    /** A TalkJS REST API token (needs a grant with type "app"). */
    public function appToken(?int $ttl = null, ?string $app = null): string
    {
        return self::stringField($this->token(['type' => 'app', 'ttl' => $ttl, 'app' => $app]), 'token');
    }

    /** The legacy identity-verification signature (hex HMAC-SHA256 of the user id). */
    public function signature(string $userId, bool $uppercase = false, ?string $app = null): string
    {
        $fields = ['user_id' => $userId, 'uppercase' => $uppercase ?: null, 'app' => $app];
        return self::stringField($this->post('/v1/signatures', self::payload($fields)), 'signature');
    }

    /**
     * true when TalkJS signed this webhook recently, false when keyd judges it not authentic.
     * $headers: the request's headers (any case, e.g. getallheaders()); $rawBody: exactly the bytes
     * received (file_get_contents('php://input')). Throws a ClientException when keyd cannot decide:
     * answer 5xx then, so that TalkJS retries.
     * @param array<string, mixed> $headers
     */
    public function verifyWebhook(array $headers, string $rawBody, ?string $app = null): bool
    {
        $lower = array_change_key_case($headers, CASE_LOWER);
        $forward = ['Content-Type' => 'application/json'];
        foreach (['X-TalkJS-Timestamp', 'X-TalkJS-Signature'] as $name) {
            $value = $lower[strtolower($name)] ?? null;
            if (is_string($value) && self::safe($value)) {
                $forward[$name] = $value;  // else keyd answers missing_header: not authentic
            }
        }
        $path = '/v1/webhooks/verify' . ($app !== null ? '?app=' . rawurlencode($app) : '');
        try {
            $this->post($path, $rawBody, $forward);
            return true;
        } catch (WebhookRejectedException|InvalidRequestException $e) {
            if (in_array($e->getErrorCode(), self::WEBHOOK_REJECTIONS, true)) {
                return false;
            }
            throw $e;
        }
    }

    /**
     * [HTTP status, health document]; 503 is an answer here, not an error.
     * @return array{0: int, 1: array<string, mixed>}
     */
    public function health(): array
    {
        [$status, $data] = $this->request('GET', '/v1/health');
        if (!is_array($data)) {
            throw new UnavailableException($status, 'bad_response', 'keyd answered health with a non-object');
        }
        return [$status, $data];
    }

    /**
     * Call TalkJS's REST API through keyd: rest('PUT', '/users/alice', ['name' => 'Alice']).
     * $path is TalkJS's path below /v1/APP_ID (rawurlencode each id); $json is sent as the JSON
     * body (use (object) [] for {}). Returns what TalkJS answered, 4xx and 5xx included; throws for
     * keyd's own refusals (ForbiddenException, RateLimitedException, InvalidRequestException,
     * UnavailableException for 502 upstream_error and 504 upstream_timeout).
     */
    public function rest(
        string $method,
        string $path,
        mixed $json = null,
        ?string $app = null,
        float $timeout = self::REST_TIMEOUT,
    ): RestResponse {
        if (!str_starts_with($path, '/')) {
            throw new \InvalidArgumentException('path must start with /, e.g. /users/alice');
        }
        $url = '/v1/rest/' . rawurlencode($app ?? 'default') . $path;
        $headers = ['Accept' => 'application/json'];
        $body = null;
        if ($json !== null) {
            $body = json_encode($json, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
            $headers['Content-Type'] = 'application/json';
        }
        $retry = in_array(strtoupper($method), ['GET', 'PUT', 'DELETE'], true);
        [$status, $fields, $raw] = $this->raw($method, $url, $body, $headers, $timeout, $retry);
        if (($fields['x-keyd-upstream'] ?? '') !== 'talkjs') {
            self::checked($status, $raw);  // keyd's own answer: an error document
        }
        return new RestResponse($status, $raw, $fields['content-type'] ?? '', $fields['retry-after'] ?? null);
    }

    /**
     * @param array<string, string> $headers
     * @return array<string, mixed>
     */
    private function post(string $path, string $body, array $headers = ['Content-Type' => 'application/json']): array
    {
        [$status, , $raw] = $this->raw('POST', $path, $body, $headers, $this->timeout, true);
        return self::checked($status, $raw);
    }

    /**
     * [status, lower-cased headers, raw body] of one exchange; $retry: whether a request on a
     * kept-alive connection that closed without an answer may be sent again.
     * @param array<string, string> $headers
     * @return array{0: int, 1: array<string, string>, 2: string}
     */
    private function raw(string $method, string $path, ?string $body, array $headers, float $timeout, bool $retry): array
    {
        if (!preg_match('/^\/[\x21-\x7e]*$/', $path) || !preg_match('/^[A-Z]+$/', $method)) {
            throw new \InvalidArgumentException('the path must be printable ASCII without spaces (percent-encode ids)');
        }
        $lines = ['Expect:'];  // no 100-continue round trip
        foreach ($headers as $name => $value) {
            if (!self::safe($name . $value)) {
                throw new \InvalidArgumentException("header $name: CR, LF, NUL and non-ASCII cannot be sent");
            }
            $lines[] = "$name: $value";
        }
        for ($attempt = 1; ; $attempt++) {
            $curl = $this->curl ??= curl_init();
            curl_reset($curl);  // keeps the live connection
            $fields = [];
            $head = 0;
            $raw = '';
            $refused = '';
            $options = [
                CURLOPT_UNIX_SOCKET_PATH => $this->socketPath,
                CURLOPT_URL => 'http://keyd' . $path,
                CURLOPT_CUSTOMREQUEST => $method,
                CURLOPT_HTTPHEADER => $lines,
                CURLOPT_HTTP_VERSION => CURL_HTTP_VERSION_1_1,
                CURLOPT_PROTOCOLS => CURLPROTO_HTTP,
                CURLOPT_FOLLOWLOCATION => false,
                CURLOPT_TIMEOUT_MS => (int) ceil($timeout * 1000),
                // Not retryable: never a reused connection, so curl cannot resend it on its own.
                CURLOPT_FRESH_CONNECT => !$retry,
                CURLOPT_HEADERFUNCTION => static function ($handle, string $line) use (&$fields, &$head, &$refused): int {
                    $head += strlen($line);
                    if ($head > self::MAX_HEAD) {
                        $refused = "keyd's response head is too large";
                        return 0;
                    }
                    if (str_starts_with($line, 'HTTP/')) {
                        $fields = [':interim' => preg_match('/^HTTP\/\S+ 1\d\d /', $line) ? '1' : ''];
                    } elseif (trim($line) === '') {
                        // The head is complete: a usable length, or the body is not read at all
                        // (a broken or hostile peer must not make the caller buffer GiBs).
                        if (($fields[':interim'] ?? '') !== '1' && self::usableLength($fields) === null) {
                            $refused = "keyd's response has no usable Content-Length";
                            return 0;
                        }
                    } elseif (count($parts = explode(':', $line, 2)) === 2) {
                        $fields[strtolower(trim($parts[0]))] ??= trim($parts[1]);
                    }
                    return strlen($line);
                },
                CURLOPT_WRITEFUNCTION => static function ($handle, string $chunk) use (&$fields, &$raw, &$refused): int {
                    $length = self::usableLength($fields);
                    if ($length === null || strlen($raw) + strlen($chunk) > $length) {
                        $refused = "keyd's response has no usable Content-Length";
                        return 0;
                    }
                    $raw .= $chunk;
                    return strlen($chunk);
                },
            ];
            if ($body !== null || in_array($method, ['POST', 'PUT', 'PATCH'], true)) {
                $options[CURLOPT_POSTFIELDS] = $body ?? '';
            }
            curl_setopt_array($curl, $options);
            $done = curl_exec($curl);
            if ($done === false) {
                $errno = curl_errno($curl);
                $reused = curl_getinfo($curl, CURLINFO_NUM_CONNECTS) === 0;
                $this->close();
                if ($refused !== '') {
                    throw new UnreachableException(0, 'bad_response', $refused);
                }
                if (in_array($errno, self::RETRIED, true) && $reused && $retry && $attempt === 1) {
                    continue;  // a kept-alive connection keyd closed while idle: once more, fresh
                }
                throw $this->unreachable($errno);
            }
            $status = (int) curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
            if (self::usableLength($fields) !== strlen($raw)) {  // also an empty body without a length
                $this->close();
                throw new UnreachableException(0, 'bad_response', "keyd's response has no usable Content-Length");
            }
            unset($fields[':interim']);
            return [$status, $fields, $raw];
        }
    }

    /** @param array<string, string> $fields */
    private static function usableLength(array $fields): ?int
    {
        $declared = $fields['content-length'] ?? '';
        if (isset($fields['transfer-encoding']) || !preg_match('/^[0-9]{1,10}$/', $declared)) {
            return null;
        }
        $limit = isset($fields['x-keyd-upstream']) ? self::MAX_REST_RESPONSE : self::MAX_RESPONSE;
        return (int) $declared <= $limit ? (int) $declared : null;
    }

    private function unreachable(int $errno): UnreachableException
    {
        $path = $this->socketPath;
        if ($errno === CURLE_COULDNT_CONNECT) {
            if (!file_exists($path)) {
                return new UnreachableException(0, 'unreachable', "no keyd socket at $path");
            }
            if (!is_writable($path)) {
                return new UnreachableException(0, 'unreachable', "permission denied opening $path: only its owner and group may connect (ask to be added to the socket's group, then log in again)");
            }
            return new UnreachableException(0, 'unreachable', "nothing is listening on $path (is keyd running?)");
        }
        if ($errno === CURLE_OPERATION_TIMEDOUT) {
            return new UnreachableException(0, 'unreachable', "keyd at $path did not answer in time");
        }
        if (in_array($errno, [CURLE_WEIRD_SERVER_REPLY, CURLE_UNSUPPORTED_PROTOCOL], true)) {
            return new UnreachableException(0, 'bad_response', 'keyd answered with a malformed HTTP response');
        }
        // curl_strerror: the error's generic text, never what the peer sent.
        return new UnreachableException(0, 'unreachable', "cannot reach keyd at $path: " . curl_strerror($errno));
    }

    /** The decoded JSON of an answer ([] for an empty body); UnavailableException when it is not JSON. */
    private static function decode(int $status, #[\SensitiveParameter] string $raw): mixed
    {
        if ($raw === '') {
            return [];
        }
        try {
            return json_decode($raw, true, 64, JSON_THROW_ON_ERROR);
        } catch (\JsonException) {
            throw new UnavailableException($status, 'bad_response', 'keyd answered with invalid JSON');
        }
    }

    /**
     * The document of a 200 (a JSON object), or the matching ClientException thrown.
     * @return array<string, mixed>
     */
    private static function checked(int $status, #[\SensitiveParameter] string $raw): array
    {
        $data = self::decode($status, $raw);
        $object = $raw !== '' && ltrim($raw)[0] === '{' && is_array($data);
        if ($status === 200 && $object) {
            return $data;
        }
        $error = $object ? ($data['error'] ?? null) : null;
        if (is_array($error) && !array_is_list($error)) {
            $code = $error['code'] ?? 'error';
            $message = $error['message'] ?? '';
            throw ClientException::for(
                $status,
                is_scalar($code) ? (string) $code : 'error',
                is_scalar($message) ? (string) $message : '',
            );
        }
        throw ClientException::for($status, 'bad_response', "keyd answered $status without an error document");
    }

    /**
     * @param array<string, mixed> $fields
     */
    private static function payload(array $fields): string
    {
        return json_encode((object) array_filter($fields, fn ($v) => $v !== null), JSON_THROW_ON_ERROR);
    }

    /** @param array<string, mixed> $doc */
    private static function stringField(#[\SensitiveParameter] array $doc, string $name): string
    {
        if (!is_string($doc[$name] ?? null)) {
            throw new UnavailableException(200, 'bad_response', "keyd's answer has no $name");
        }
        return $doc[$name];
    }

    /** A value an HTTP sender could have sent as it is: ASCII, no CR, LF or NUL. */
    private static function safe(string $value): bool
    {
        return (bool) preg_match('/^[\x01-\x09\x0b\x0c\x0e-\x7f]*$/', $value);
    }
}
