<?php
// keyd from the command line with the keyd/client package (clients/php), for a first try and for
// the tests:  php keyd.php token alice | app-token | signature alice | verify TIMESTAMP SIGNATURE < body
// The socket is $KEYD_SOCKET, or /run/keyd/keyd.sock. In your app:
//
//   $keyd = new \Keyd\Client();
//   $token = $keyd->userToken('alice');                  // JWT for new Talk.Session({ token })
//   $ok = $keyd->verifyWebhook(getallheaders(), file_get_contents('php://input'));

declare(strict_types=1);

require __DIR__ . '/autoload.php';

$command = $argv[1] ?? '';
$arg = $argv[2] ?? '';
$keyd = new Keyd\Client();
try {
    $doc = match ($command) {
        'token' => $keyd->token(['user_id' => $arg]),
        'app-token' => $keyd->token(['type' => 'app']),
        'signature' => ['signature' => $keyd->signature($arg)],
        'verify' => ['valid' => $keyd->verifyWebhook(
            ['X-TalkJS-Timestamp' => $argv[2] ?? '', 'X-TalkJS-Signature' => $argv[3] ?? ''],
            (string) stream_get_contents(STDIN),
        )],
        default => null,
    };
} catch (Keyd\ClientException $e) {
    fwrite(STDERR, "keyd: {$e->getErrorCode()}: {$e->getMessage()}\n");
    exit(1);
}
if ($doc === null) {
    fwrite(STDERR, "usage: php keyd.php token USER_ID | app-token | signature USER_ID | verify TIMESTAMP SIGNATURE < body\n");
    exit(2);
}
echo json_encode($doc), "\n";
