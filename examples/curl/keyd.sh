#!/bin/sh
# Every keyd endpoint with curl over the Unix socket. Usage:
#   KEYD_SOCKET=/run/keyd/keyd.sock sh keyd.sh [USER_ID]
# Signatures, app tokens and webhook checks need a [[grant]] allowing them; each answer is one JSON
# line, errors included ({"error": {"code": ..., "message": ...}}), and curl's exit status is 0 for
# any HTTP answer, so check the status (here printed after each line by -w).
set -eu
SOCK="${KEYD_SOCKET:-/run/keyd/keyd.sock}"
USER_ID="${1:-alice}"
# --max-time: never wait on keyd for ever (a keyd that cannot start leaves connections queued on
# keyd.socket); 5 s is keyd.client's default too. REST proxy calls need more (35 s: keyd's own
# upstream timeout is 15 s, with retries).
k() { curl --silent --show-error --max-time 5 --unix-socket "$SOCK" -w '\n%{http_code}\n' "$@"; }

# A user token (add "ttl": 600 or "app": "live" as needed).
k -H 'Content-Type: application/json' -d "{\"user_id\": \"$USER_ID\"}" http://keyd/v1/tokens
# A REST API token.
k -H 'Content-Type: application/json' -d '{"type": "app"}' http://keyd/v1/tokens
# The legacy identity-verification signature (add "uppercase": true for the PHP-style form).
k -H 'Content-Type: application/json' -d "{\"user_id\": \"$USER_ID\"}" http://keyd/v1/signatures
# A webhook check: forward TalkJS's two headers and the raw body (--data-binary keeps the bytes exact).
if [ -n "${WEBHOOK_BODY_FILE:-}" ]; then
  k -H "X-TalkJS-Timestamp: $WEBHOOK_TIMESTAMP" -H "X-TalkJS-Signature: $WEBHOOK_SIGNATURE" \
    -H 'Content-Type: application/json' --data-binary "@$WEBHOOK_BODY_FILE" \
    "http://keyd/v1/webhooks/verify?app=${WEBHOOK_APP:-default}"
fi
# Health (200 or 503) and metrics (Prometheus text format, not JSON: printed last).
k http://keyd/v1/health
k http://keyd/metrics | grep -E '^keyd_tokens_total' || true
