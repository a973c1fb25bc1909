<?php
// A TalkJS backend's side of keyd in PHP, with the curl extension (php-curl) and
// CURLOPT_UNIX_SOCKET_PATH. No other dependency.
//
//   require __DIR__ . '/keyd.php';
//   $token = keyd_user_token('alice');                   // JWT for new Talk.Session({ token })
//   $sig = keyd_signature('alice', true);                // legacy identity verification (upper case)
//   $ok = keyd_verify_webhook(getallheaders(), file_get_contents('php://input'));
//
// Errors throw KeydException with getStatus() (0 when keyd is unreachable) and getErrorCode().
// Command line (used by the tests):  php keyd.php token alice | app-token | signature alice
// The socket is $KEYD_SOCKET, or /run/keyd/keyd.sock.

declare(strict_types=1);

final class KeydException extends RuntimeException
{
    public function __construct(private int $status, private string $errorCode, string $message)
    {
        parent::__construct($message);
    }

    public function getStatus(): int
    {
        return $this->status;
    }

    public function getErrorCode(): string
    {
        return $this->errorCode;
    }
}

function keyd_socket(): string
{
    return getenv('KEYD_SOCKET') ?: '/run/keyd/keyd.sock';
}

/** POST a body to keyd; the decoded 200 answer, or KeydException. */
function keyd_post(string $path, string $body, array $headers = ['Content-Type: application/json']): array
{
    // One handle per process: curl keeps the connection to keyd alive between calls (php-fpm workers).
    static $curl = null;
    $curl ??= curl_init();
    curl_reset($curl);
    curl_setopt_array($curl, [
        CURLOPT_UNIX_SOCKET_PATH => keyd_socket(),
        CURLOPT_URL => 'http://keyd' . $path,
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => $body,
        CURLOPT_HTTPHEADER => $headers,
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT => 5,
    ]);
    $raw = curl_exec($curl);
    if ($raw === false) {
        throw new KeydException(0, 'unreachable', 'cannot reach keyd at ' . keyd_socket() . ': ' . curl_error($curl));
    }
    $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
    $doc = json_decode((string) $raw, true);
    if (!is_array($doc)) {
        throw new KeydException($status, 'bad_response', 'keyd answered with invalid JSON');
    }
    if ($status !== 200) {
        $error = $doc['error'] ?? [];
        throw new KeydException($status, (string) ($error['code'] ?? 'error'), (string) ($error['message'] ?? "keyd answered $status"));
    }
    return $doc;
}

/** The whole POST /v1/tokens answer: token, type, app, app_id, expires_at, key_version. */
function keyd_token(array $fields): array
{
    return keyd_post('/v1/tokens', json_encode(array_filter($fields, fn ($v) => $v !== null), JSON_THROW_ON_ERROR));
}

/** A TalkJS user token for $userId. */
function keyd_user_token(string $userId, ?int $ttl = null, ?string $app = null): string
{
    return keyd_token(['user_id' => $userId, 'ttl' => $ttl, 'app' => $app])['token'];
}

/** A TalkJS REST API token (the caller needs a grant with type "app"). */
function keyd_app_token(?int $ttl = null, ?string $app = null): string
{
    return keyd_token(['type' => 'app', 'ttl' => $ttl, 'app' => $app])['token'];
}

/** Legacy identity verification: hex HMAC-SHA256 of the user id (upper case like TalkJS's PHP snippet). */
function keyd_signature(string $userId, bool $uppercase = false, ?string $app = null): string
{
    $fields = array_filter(['user_id' => $userId, 'uppercase' => $uppercase, 'app' => $app], fn ($v) => $v !== null);
    return keyd_post('/v1/signatures', json_encode($fields, JSON_THROW_ON_ERROR))['signature'];
}

/**
 * true when TalkJS signed this webhook recently, false when it is not authentic.
 * $headers: the request's headers (any case), $rawBody: exactly the bytes received
 * (file_get_contents('php://input')). Throws KeydException when keyd cannot decide.
 */
function keyd_verify_webhook(array $headers, string $rawBody, ?string $app = null): bool
{
    $lower = array_change_key_case($headers, CASE_LOWER);
    $forward = ['Content-Type: application/json'];
    foreach (['X-TalkJS-Timestamp', 'X-TalkJS-Signature'] as $name) {
        $value = $lower[strtolower($name)] ?? null;
        if (is_string($value) && !preg_match('/[\r\n]/', $value)) {
            $forward[] = "$name: $value";
        }
    }
    $path = '/v1/webhooks/verify' . ($app !== null ? '?app=' . rawurlencode($app) : '');
    try {
        keyd_post($path, $rawBody, $forward);
        return true;
    } catch (KeydException $e) {
        if (in_array($e->getErrorCode(), ['invalid_signature', 'stale_timestamp', 'missing_header', 'invalid_header'], true)) {
            return false;
        }
        throw $e;
    }
}

if (PHP_SAPI === 'cli' && realpath($_SERVER['SCRIPT_FILENAME'] ?? '') === __FILE__) {
    $command = $argv[1] ?? '';
    $arg = $argv[2] ?? '';
    try {
        $doc = match ($command) {
            'token' => keyd_token(['user_id' => $arg]),
            'app-token' => keyd_token(['type' => 'app']),
            'signature' => ['signature' => keyd_signature($arg)],
            'verify' => ['valid' => keyd_verify_webhook(
                ['X-TalkJS-Timestamp' => $argv[2] ?? '', 'X-TalkJS-Signature' => $argv[3] ?? ''],
                (string) stream_get_contents(STDIN),
            )],
            default => null,
        };
    } catch (KeydException $e) {
        fwrite(STDERR, "keyd: {$e->getErrorCode()}: {$e->getMessage()}\n");
        exit(1);
    }
    if ($doc === null) {
        fwrite(STDERR, "usage: php keyd.php token USER_ID | app-token | signature USER_ID | verify TIMESTAMP SIGNATURE < body\n");
        exit(2);
    }
    echo json_encode($doc), "\n";
}
