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

const ATTEMPTS = 5;

/** One call through keyd: [status, body, Retry-After seconds, whether TalkJS answered]. */
function keyd_rest(string $method, string $path, mixed $payload): array
{
    static $curl = null;  // one handle: the connection to keyd stays open between calls
    $curl ??= curl_init();
    curl_reset($curl);
    $app = getenv('KEYD_APP') ?: 'default';
    $headers = ['Accept: application/json', 'Expect:'];
    $fields = [];
    $options = [
        CURLOPT_UNIX_SOCKET_PATH => getenv('KEYD_SOCKET') ?: '/run/keyd/keyd.sock',
        CURLOPT_URL => 'http://keyd/v1/rest/' . rawurlencode($app) . $path,
        CURLOPT_CUSTOMREQUEST => $method,
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT => 35,
        CURLOPT_HEADERFUNCTION => function ($handle, string $line) use (&$fields): int {
            $parts = explode(':', $line, 2);
            if (count($parts) === 2) {
                $fields[strtolower(trim($parts[0]))] = trim($parts[1]);
            }
            return strlen($line);
        },
    ];
    if ($payload !== null) {
        $options[CURLOPT_POSTFIELDS] = json_encode($payload, JSON_THROW_ON_ERROR);
        $headers[] = 'Content-Type: application/json';
    }
    $options[CURLOPT_HTTPHEADER] = $headers;
    curl_setopt_array($curl, $options);
    $body = curl_exec($curl);
    if ($body === false) {
        throw new RuntimeException('cannot reach keyd: ' . curl_error($curl));
    }
    $retryAfter = ctype_digit($fields['retry-after'] ?? '') ? (int) $fields['retry-after'] : 1;
    // Set on TalkJS's answers; keyd's own errors ({"error": {"code": ...}}) lack it.
    $fromTalkjs = ($fields['x-keyd-upstream'] ?? '') === 'talkjs';
    return [curl_getinfo($curl, CURLINFO_RESPONSE_CODE), (string) $body, $retryAfter, $fromTalkjs];
}

function put_user(array $user): array
{
    $id = (string) $user['id'];
    unset($user['id']);
    // rawurlencode: an id with "/" or "%" stays one path segment (keyd refuses "." and "..").
    $path = '/users/' . rawurlencode($id);
    for ($attempt = 1; $attempt <= ATTEMPTS; $attempt++) {
        [$status, $body, $retryAfter, $fromTalkjs] = keyd_rest('PUT', $path, (object) $user);  // (object): {} even without fields
        if ($status !== 429) {
            break;
        }
        sleep(min($retryAfter, 30));
    }
    if ($status >= 200 && $status < 300) {
        return ['id' => $id, 'status' => $status];
    }
    if ($fromTalkjs) {
        return ['id' => $id, 'status' => $status, 'error' => "talkjs_$status", 'message' => substr($body, 0, 500)];
    }
    // keyd's own refusal: its code and its message, which says what to change.
    $error = json_decode($body, true)['error'] ?? null;
    return [
        'id' => $id,
        'status' => $status,
        'error' => $error['code'] ?? 'bad_response',
        'message' => $error['message'] ?? substr($body, 0, 200),
    ];
}

$users = json_decode((string) stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$failed = 0;
foreach ($users as $user) {
    try {
        $result = put_user($user);
    } catch (RuntimeException $e) {
        $result = ['id' => $user['id'] ?? null, 'status' => 0, 'error' => 'unreachable', 'message' => $e->getMessage()];
    }
    if (isset($result['error'])) {
        $failed++;
    }
    echo json_encode($result), "\n";
}
exit($failed ? 1 : 0);
