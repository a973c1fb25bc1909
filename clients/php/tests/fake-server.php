<?php
// A misbehaving server on a Unix socket for tests/run.php: php fake-server.php SOCKET SCENARIO
// COUNT_FILE. Answers request n (1, 2, ...) as SCENARIO says; writes n to COUNT_FILE each time.

declare(strict_types=1);

[, $path, $scenario, $countFile] = $argv;
const SECRET = 'eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.never-in-errors';

function ok(string $body, string $extra = ''): string
{
    return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " . strlen($body) . "\r\n$extra\r\n$body";
}

/** [bytes to write, what then: keep | close | destroy | drip] */
function answer(string $scenario, int $n): array
{
    $secret = SECRET;
    $up = "X-Keyd-Upstream: talkjs\r\n";
    return match ($scenario) {
        'huge' => ["HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n" . str_repeat('a', 65536), 'keep'],
        'chunked' => ["HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 'keep'],
        'to-close' => ["HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"token\":\"$secret\"}", 'close'],
        'sizes' => match ($n) {
            1 => [ok('"' . str_repeat('x', 2 << 20) . '"', $up), 'keep'],
            2 => [ok('"' . str_repeat('x', 2 << 20) . '"'), 'keep'],
            default => ["HTTP/1.1 200 OK\r\n{$up}Content-Length: " . ((8 << 20) + 1) . "\r\n\r\n", 'keep'],
        },
        'big-head' => ["HTTP/1.1 200 OK\r\nX-Pad: " . str_repeat('a', 100000) . "\r\nContent-Length: 2\r\n\r\n{}", 'keep'],
        'garbage' => ["SSH-2.0-OpenSSH_9.2 $secret\r\n", 'close'],
        'bad-json' => match ($n) {
            1 => [ok("{\"token\": \"$secret\""), 'keep'],
            2 => ["HTTP/1.1 500 Oops\r\nContent-Length: " . (strlen($secret) + 2) . "\r\n\r\n\"$secret\"", 'keep'],
            3 => [ok("{\"token\": [\"$secret\"]}"), 'keep'],
            default => [ok("[\"$secret\"]"), 'keep'],
        },
        'silent' => ['', 'keep'],
        'drip' => ["HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 'drip'],
        'retry' => $n === 2 ? ['', 'destroy'] : [ok("{\"token\":\"t$n\"}"), 'keep'],
        'no-resend' => $n === 2 ? ['', 'destroy'] : [ok('{}', $up), 'keep'],
    };
}

@unlink($path);
$server = stream_socket_server("unix://$path", $errno, $error);
if ($server === false) {
    fwrite(STDERR, "cannot listen on $path: $error\n");
    exit(1);
}
$clients = [];
$buffers = [];
$drips = [];
$n = 0;
for (;;) {
    $read = [$server, ...$clients];
    $write = $except = null;
    if (stream_select($read, $write, $except, 0, 50000) === false) {
        break;
    }
    foreach ($drips as $id => $sock) {
        if (@fwrite($sock, 'a') === false) {
            unset($drips[$id]);
        }
    }
    foreach ($read as $sock) {
        if ($sock === $server) {
            $conn = stream_socket_accept($server);
            $clients[(int) $conn] = $conn;
            $buffers[(int) $conn] = '';
            continue;
        }
        $id = (int) $sock;
        $data = fread($sock, 65536);
        if ($data === '' || $data === false) {
            fclose($sock);
            unset($clients[$id], $drips[$id]);
            continue;
        }
        $buffers[$id] .= $data;
        while (($end = strpos($buffers[$id], "\r\n\r\n")) !== false) {
            $length = preg_match('/content-length: *(\d+)/i', substr($buffers[$id], 0, $end), $m) ? (int) $m[1] : 0;
            if (strlen($buffers[$id]) < $end + 4 + $length) {
                break;
            }
            $buffers[$id] = substr($buffers[$id], $end + 4 + $length);
            $n++;
            file_put_contents($countFile, (string) $n);
            [$bytes, $then] = answer($scenario, $n);
            if ($bytes !== '') {
                @fwrite($sock, $bytes);  // the client may have hung up, as it should
            }
            if ($then === 'close' || $then === 'destroy') {
                fclose($sock);
                unset($clients[$id]);
                break;
            }
            if ($then === 'drip') {
                $drips[$id] = $sock;
            }
        }
    }
}
