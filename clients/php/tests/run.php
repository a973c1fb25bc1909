<?php
// The PHP client's tests, run by keyd's tests/integration/test_clients.py with composer's autoloader:
//   php tests/run.php AUTOLOAD live      against a live keyd (KEYD_SOCKET, KEYD_TEST_KEY, KEYD_TEST_APP_ID)
//   php tests/run.php AUTOLOAD hostile   against misbehaving fake servers (tests/fake-server.php)
// Prints "ok N - name" / "not ok N - name: why" and a "# tests / # pass / # fail" summary; exit 1
// when any test failed. Tokens are verified with hash_hmac against the key in Vault.

declare(strict_types=1);

use Keyd\Client;
use Keyd\ClientException;

require $argv[1];
$group = $argv[2] ?? '';
const SECRET_PARTS = ['never-in-errors', 'c2VjcmV0'];

$tests = [];
function test(string $name, callable $body): void
{
    $GLOBALS['tests'][] = [$name, $body];
}

function check(bool $condition, string $what): void
{
    if (!$condition) {
        throw new AssertionError($what);
    }
}

/** The call throws $class with $code, within $seconds, and no response body is anywhere in it. */
function refused(callable $call, string $class, string $code, float $seconds = 3.0): ClientException
{
    $started = microtime(true);
    try {
        $call();
    } catch (ClientException $e) {
        check($e instanceof $class, get_class($e) . " is not $class: " . $e->getMessage());
        check($e->getErrorCode() === $code, "code {$e->getErrorCode()}, not $code");
        $shown = (string) $e . print_r($e->getTrace(), true) . var_export($e, true);
        foreach (SECRET_PARTS as $part) {
            check(!str_contains($shown, $part), "the answer's body is in the error: $shown");
        }
        check(microtime(true) - $started < $seconds, 'took ' . round(microtime(true) - $started, 2) . ' s');
        return $e;
    }
    throw new AssertionError("no $class thrown");
}

/** Verify an HS256 JWT with hash_hmac; its claims. */
function verified(string $token, string $key): array
{
    $b64 = fn (string $s): string => base64_decode(strtr($s, '-_', '+/') . str_repeat('=', (4 - strlen($s) % 4) % 4), true);
    [$head, $payload, $signature] = explode('.', $token);
    check(hash_equals(hash_hmac('sha256', "$head.$payload", $key, true), $b64($signature)), 'signature verifies');
    check(json_decode($b64($head), true) === ['alg' => 'HS256', 'typ' => 'JWT'], 'header');
    return json_decode($b64($payload), true, 8, JSON_THROW_ON_ERROR);
}

/** A fake server (tests/fake-server.php) for one scenario: [client, requests-so-far reader, stop]. */
function fake(string $scenario): array
{
    $dir = sys_get_temp_dir() . '/keyd-fake-' . bin2hex(random_bytes(4));
    mkdir($dir, 0700);
    $socket = "$dir/s";
    $count = "$dir/n";
    $proc = proc_open([PHP_BINARY, __DIR__ . '/fake-server.php', $socket, $scenario, $count], [], $pipes);
    for ($i = 0; $i < 100 && !file_exists($socket); $i++) {
        usleep(20000);
    }
    $stop = function () use ($proc, $dir): void {
        proc_terminate($proc);
        proc_close($proc);
        array_map('unlink', glob("$dir/*") ?: []);
        rmdir($dir);
    };
    return [new Client($socket, 1.0), fn (): int => (int) @file_get_contents($count), $stop];
}

if ($group === 'live') {
    $key = (string) getenv('KEYD_TEST_KEY');
    $appId = (string) getenv('KEYD_TEST_APP_ID');

    test('the test environment names a live keyd', function () use ($key, $appId): void {
        check($key !== '' && $appId !== '' && getenv('KEYD_SOCKET') !== false, 'run by tests/integration/test_clients.py');
        check((new Client())->socketPath === getenv('KEYD_SOCKET'), 'KEYD_SOCKET is the default');
    });

    test('user and app tokens verify with hash_hmac against the key in Vault', function () use ($key, $appId): void {
        $keyd = new Client();
        $claims = verified($keyd->userToken('alice', 600), $key);
        check($claims['sub'] === 'alice' && $claims['iss'] === $appId && $claims['tokenType'] === 'user', 'user claims');
        check($claims['exp'] - $claims['iat'] === 600, 'ttl');
        $app = verified($keyd->appToken(), $key);
        check($app['tokenType'] === 'app' && !isset($app['sub']), 'app claims');
        $doc = $keyd->token(['user_id' => 'bob']);
        check($doc['app_id'] === $appId && $doc['key_version'] === 1, 'the whole answer');
    });

    test('keep-alive: one connection for many calls', function (): void {
        $keyd = new Client();
        for ($i = 0; $i < 20; $i++) {
            $keyd->userToken("u$i");
        }
        [$status] = $keyd->health();
        check($status === 200, 'healthy');
        // A fresh connection shows as NUM_CONNECTS 1; curl reusing the kept-alive one, 0.
        $curl = (fn () => $this->curl)->call($keyd);
        check(curl_getinfo($curl, CURLINFO_NUM_CONNECTS) === 0, 'the last call reused the connection');
    });

    test('signatures are HMAC-SHA256 of the user id', function () use ($key): void {
        $keyd = new Client();
        check($keyd->signature('alice') === hash_hmac('sha256', 'alice', $key), 'lower case');
        check($keyd->signature('alice', true) === strtoupper(hash_hmac('sha256', 'alice', $key)), 'upper case');
    });

    test('webhooks: authentic ones true, forged or unsafe ones false', function () use ($key): void {
        $keyd = new Client();
        $body = '{"type":"message.sent","data":{}}';
        $ts = (string) (int) (microtime(true) * 1000);
        $sig = strtoupper(hash_hmac('sha256', "$ts.$body", $key));
        check($keyd->verifyWebhook(['X-TalkJS-Timestamp' => $ts, 'X-TalkJS-Signature' => $sig], $body), 'authentic');
        check($keyd->verifyWebhook(['x-talkjs-timestamp' => $ts, 'x-talkjs-signature' => $sig], $body), 'any case');
        check(!$keyd->verifyWebhook(['X-TalkJS-Timestamp' => $ts, 'X-TalkJS-Signature' => $sig], "$body "), 'other body');
        check(!$keyd->verifyWebhook([], $body), 'no headers');
        $injected = ['X-TalkJS-Timestamp' => $ts, 'X-TalkJS-Signature' => "$sig\r\nX-Evil: 1"];
        check(!$keyd->verifyWebhook($injected, $body), 'a CR LF value is dropped, not forwarded');
    });

    test("keyd's refusals are the Python client's exception classes", function (): void {
        $keyd = new Client();
        $e = refused(fn () => $keyd->userToken(''), Keyd\InvalidRequestException::class, 'invalid_field');
        check($e->getStatus() === 422, 'status 422');
        refused(fn () => $keyd->userToken('a', null, 'nope'), Keyd\InvalidRequestException::class, 'unknown_app');
        $e = refused(fn () => $keyd->rest('DELETE', '/users/alice'), Keyd\ForbiddenException::class, 'forbidden');
        check($e->getStatus() === 403 && str_contains($e->getMessage(), 'DELETE /users/alice'), $e->getMessage());
        check(new Keyd\KeyUnavailableException(503, 'key_unavailable', '') instanceof Keyd\UnavailableException, 'subclass');
    });

    test('the REST proxy: TalkJS answers are RestResponses, ids are one segment', function () use ($appId): void {
        $keyd = new Client();
        $put = $keyd->rest('PUT', '/users/alice', ['name' => 'Alice']);
        check($put->status === 200 && $put->ok() && $put->contentType === 'application/json', 'PUT answered');
        check($put->json() === ['ok' => true, 'method' => 'PUT', 'path' => "/v1/$appId/users/alice"], $put->body);
        $get = $keyd->rest('GET', '/users/' . rawurlencode('bob smith é'));
        check($get->json()['path'] === "/v1/$appId/users/bob%20smith%20%C3%A9", $get->body);
        refused(fn () => $keyd->rest('GET', '/users/' . rawurlencode('a/../b')), Keyd\InvalidRequestException::class, 'invalid_path');
        foreach (['users/alice', "/users/a\r\nX: y", '/users/a b'] as $bad) {
            try {
                $keyd->rest('GET', $bad);
                throw new AssertionError("$bad was sent");
            } catch (InvalidArgumentException) {
            }
        }
    });

    test('a socket that is not there, or not a socket, is UnreachableException naming it', function (): void {
        foreach ([getenv('KEYD_SOCKET') . '.missing', '/etc/hostname', '/etc'] as $path) {
            $e = refused(fn () => (new Client($path))->userToken('alice'), Keyd\UnreachableException::class, 'unreachable');
            check($e->getStatus() === 0 && str_contains($e->getMessage(), $path), $e->getMessage());
        }
    });
} elseif ($group === 'hostile') {
    $bad = Keyd\UnreachableException::class;
    foreach (['huge', 'chunked', 'to-close', 'big-head', 'garbage'] as $scenario) {
        test("$scenario answers are refused unread", function () use ($scenario, $bad): void {
            [$keyd, , $stop] = fake($scenario);
            try {
                refused(fn () => $keyd->userToken('alice'), $bad, 'bad_response');
            } finally {
                $stop();
            }
        });
    }

    test("TalkJS's answers may be up to 8 MiB through the proxy, keyd's own up to 1 MiB", function () use ($bad): void {
        [$keyd, , $stop] = fake('sizes');
        try {
            check(strlen($keyd->rest('GET', '/users/alice')->body) === (2 << 20) + 2, '2 MiB through the proxy');
            refused(fn () => $keyd->userToken('alice'), $bad, 'bad_response');
            refused(fn () => $keyd->rest('GET', '/users/alice'), $bad, 'bad_response');
        } finally {
            $stop();
        }
    });

    test('invalid JSON, or an answer without an error document, never quotes the body', function (): void {
        [$keyd, , $stop] = fake('bad-json');
        try {
            refused(fn () => $keyd->userToken('alice'), Keyd\UnavailableException::class, 'bad_response');
            refused(fn () => $keyd->userToken('alice'), Keyd\UnavailableException::class, 'bad_response');
            refused(fn () => $keyd->userToken('alice'), Keyd\UnavailableException::class, 'bad_response');
            refused(fn () => $keyd->userToken('alice'), ClientException::class, 'bad_response');
        } finally {
            $stop();
        }
    });

    test('a server that never answers, or drips, is cut off at the timeout', function () use ($bad): void {
        foreach (['silent', 'drip'] as $scenario) {
            [$keyd, , $stop] = fake($scenario);
            try {
                refused(fn () => $keyd->userToken('alice'), $bad, 'unreachable', 2.0);
            } finally {
                $stop();
            }
        }
    });

    test('a kept-alive connection closed unanswered is retried once on a fresh one', function (): void {
        [$keyd, $requests, $stop] = fake('retry');
        try {
            check($keyd->userToken('alice') === 't1', 'first');
            check($keyd->userToken('alice') === 't3', 'retried');
            check($requests() === 3, "{$requests()} requests");
        } finally {
            $stop();
        }
    });

    test('a proxied POST or PATCH is never sent twice; PUT is retried', function () use ($bad): void {
        foreach (['POST', 'PATCH'] as $method) {
            [$keyd, $requests, $stop] = fake('no-resend');
            try {
                $keyd->rest($method, '/conversations/c1/messages', []);
                refused(fn () => $keyd->rest($method, '/conversations/c1/messages', []), $bad, 'unreachable');
                check($requests() === 2, "$method sent {$requests()} times for 2 calls");
            } finally {
                $stop();
            }
        }
        [$keyd, $requests, $stop] = fake('no-resend');
        try {
            $keyd->rest('PUT', '/users/a', (object) []);
            check($keyd->rest('PUT', '/users/a', (object) [])->status === 200, 'PUT retried');
            check($requests() === 3, "{$requests()} requests");
        } finally {
            $stop();
        }
    });
} else {
    fwrite(STDERR, "usage: php tests/run.php AUTOLOAD live|hostile\n");
    exit(2);
}

$failed = 0;
foreach ($tests as $i => [$name, $body]) {
    try {
        $body();
        echo 'ok ', $i + 1, " - $name\n";
    } catch (Throwable $e) {
        $failed++;
        echo 'not ok ', $i + 1, " - $name: ", get_class($e), ': ', $e->getMessage(), ' at ', $e->getFile(), ':', $e->getLine(), "\n";
    }
}
printf("# tests %d\n# pass %d\n# fail %d\n", count($tests), count($tests) - $failed, $failed);
exit($failed ? 1 : 0);
