#!/usr/bin/env bash
# The console's browser tests: starts a throw-away Keel in local mode (its
# own Postgres, api serving the built console, worker, one node agent; free
# ports, a temporary state directory), waits until the agent's host is
# ready, runs Playwright in Debian's Chromium (ui/e2e), then stops it all.
# Expects the binaries and ui/dist to be built (scripts/test.sh does).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

chromium=${KEEL_CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] || { echo "ui-e2e: no Chromium at $chromium (apt-get install chromium)" >&2; exit 1; }

state=$(mktemp -d /tmp/keel-ui-e2e.XXXXXX)
# Postgres (as its own user) and the workloads' users must reach inside.
chmod 755 "$state"
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
pg_port=$(free_port)
listen="127.0.0.1:$(free_port)"

keel=""
finish() {
    status=$?
    if [ -n "$keel" ]; then
        kill -TERM "$keel" 2>/dev/null || true
        wait "$keel" 2>/dev/null || true
    fi
    if [ "$status" != 0 ]; then
        echo "ui-e2e: failed; the last lines of Keel's log:" >&2
        tail -n 40 "$state/keel.log" >&2 || true
    fi
    rm -rf "$state"
    exit "$status"
}
trap finish EXIT

env -u DATABASE_URL \
    KEEL_LOCAL_STATE="$state" KEEL_CONSOLE_BUILD=0 KEEL_PG_PORT="$pg_port" \
    KEEL_SERVER__LISTEN="$listen" \
    KEEL_AGENT__LISTEN="127.0.0.1:$(free_port)" \
    KEEL_AGENT_LISTEN="127.0.0.1:$(free_port)" \
    KEEL_METRICS__API_LISTEN="127.0.0.1:$(free_port)" \
    KEEL_METRICS__WORKER_LISTEN="127.0.0.1:$(free_port)" \
    KEEL_AGENT_METRICS_LISTEN="127.0.0.1:$(free_port)" \
    KEEL_AGENT_HEARTBEAT_SECS=1 \
    KEEL_RATE_LIMIT__AUTH_PER_MINUTE=600 KEEL_RATE_LIMIT__AUTH_BURST=100 \
    bash scripts/run-local.sh >"$state/keel.log" 2>&1 &
keel=$!

# Ready when the api answers and the local agent's host can take work.
ready=""
for _ in $(seq 1 600); do
    kill -0 "$keel" 2>/dev/null || { echo "ui-e2e: local mode exited" >&2; exit 1; }
    if curl -fsS "http://$listen/readyz" >/dev/null 2>&1 &&
        [ "$(psql "postgres://postgres@127.0.0.1:$pg_port/keel" -qtAc "SELECT count(*) FROM hosts WHERE state = 'ready'" 2>/dev/null)" = 1 ]; then
        ready=1
        break
    fi
    sleep 0.2
done
[ -n "$ready" ] || { echo "ui-e2e: Keel did not become ready" >&2; exit 1; }

# An operator for the operator console's tests (as an operator would make
# one: `api operator create`).
operator_email="ops-$(date +%s)@keel.test"
operator_password=$(head -c 18 /dev/urandom | base64)
env -u DATABASE_URL KEEL_DATABASE__URL="postgres://keel_api@127.0.0.1:$pg_port/keel" \
    KEEL_AUTH__SIGNING_KEYS="[\"$(cat "$state/token-signing-key")\"]" \
    KEEL_OPERATOR_PASSWORD="$operator_password" \
    ./target/debug/api operator create --email "$operator_email" >/dev/null

cd ui
KEEL_CONSOLE_URL="http://$listen" KEEL_CHROMIUM="$chromium" \
    KEEL_E2E_OPERATOR_EMAIL="$operator_email" KEEL_E2E_OPERATOR_PASSWORD="$operator_password" \
    npx playwright test "$@"
