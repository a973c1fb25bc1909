<?php
// A sync job: pushes users to TalkJS through keyd's REST proxy. This process never holds a TalkJS
// token: keyd checks each call against the job's grant and signs it itself.
//
//   echo '[{"id": "alice", "name": "Alice", "email": ["alice@example.com"]}]' | php sync-users.php
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

declare(strict_types=1);

// The keyd/client package (clients/php): rest() returns TalkJS's answer, and throws for keyd's own
// refusals. In your app, composer's autoloader loads it.
require __DIR__ . '/autoload.php';

const ATTEMPTS = 5;

/** One user: ['id', 'status'] or with 'error' and 'message' (keyd's message is the helpful part). */
function put_user(Keyd\Client $keyd, array $user): array
{
    $id = (string) $user['id'];
    unset($user['id']);
    // rawurlencode: an id with "/" or "%" stays one path segment (keyd refuses "." and "..").
    $path = '/users/' . rawurlencode($id);
    $app = getenv('KEYD_APP') ?: 'default';
    for ($attempt = 1; ; $attempt++) {
        try {
            $answer = $keyd->rest('PUT', $path, (object) $user, $app);  // (object): {} even without fields
        } catch (Keyd\RateLimitedException $e) {
            if ($attempt < ATTEMPTS) {
                sleep(1);
                continue;
            }
            return ['id' => $id, 'status' => $e->getStatus(), 'error' => $e->getErrorCode(), 'message' => $e->getMessage()];
        } catch (Keyd\ClientException $e) {  // keyd's own refusal, or keyd unreachable
            return ['id' => $id, 'status' => $e->getStatus(), 'error' => $e->getErrorCode(), 'message' => $e->getMessage()];
        }
        if ($answer->status === 429 && $attempt < ATTEMPTS) {  // TalkJS's own rate limit
            $wait = ctype_digit($answer->retryAfter ?? '') ? (int) $answer->retryAfter : 1;
            sleep(min($wait, 30));
            continue;
        }
        if ($answer->ok()) {
            return ['id' => $id, 'status' => $answer->status];
        }
        return ['id' => $id, 'status' => $answer->status, 'error' => "talkjs_{$answer->status}", 'message' => substr($answer->body, 0, 500)];
    }
}

$keyd = new Keyd\Client();
$users = json_decode((string) stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$failed = 0;
foreach ($users as $user) {
    $result = put_user($keyd, $user);
    if (isset($result['error'])) {
        $failed++;
    }
    echo json_encode($result), "\n";
}
exit($failed ? 1 : 0);
