#!/usr/bin/env bash
# Local mode. Without DATABASE_URL it runs a private Postgres from the
# system's binaries under ./.keel/ (data kept between runs), applies the
# migrations, creates the api's runtime role, builds the web console, and
# starts the api (serving the console at /), a worker and one local node
# agent (enrolled with a join token on first run). Ctrl-C (or SIGTERM)
# stops everything it started.
#
# KEEL_LOCAL_STATE moves the state directory (the console's browser tests
# run a throw-away Keel this way), KEEL_CONSOLE_BUILD=0 serves the console
# as already built.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state="${KEEL_LOCAL_STATE:-$root/.keel}"
mkdir -p "$state"
cd "$root"

pids=()
pg_started=""
cleanup() {
    trap - EXIT INT TERM
    for pid in "${pids[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]:-}"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    done
    # Workloads outlive their agent by design (an agent restart must not
    # kill tenants' work); local mode stops them too, so nothing is left.
    for proc in /proc/[0-9]*; do
        case "$(readlink "$proc/cwd" 2>/dev/null)" in
            "$state/agent/workloads/"*) kill -KILL "${proc#/proc/}" 2>/dev/null || true ;;
        esac
    done
    if [ -n "$pg_started" ]; then
        as_pg "$pgbin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null || true
        echo "local mode: stopped"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Postgres refuses to run as root: when we are root, run it as `postgres`.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ -z "${DATABASE_URL:-}" ]; then
    pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -x "$pgbin/initdb" ] || { echo "run-local: no Postgres server binaries under /usr/lib/postgresql (apt-get install postgresql)" >&2; exit 1; }
    pgdata="$state/pg"
    port=${KEEL_PG_PORT:-54329}
    if [ ! -f "$pgdata/PG_VERSION" ]; then
        mkdir -p "$pgdata"
        [ "$(id -u)" = 0 ] && chown postgres:postgres "$pgdata" && chmod 700 "$pgdata"
        as_pg "$pgbin/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 >/dev/null
        echo "local mode: created a private Postgres in $pgdata"
    fi
    as_pg "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w \
        -o "-p $port -k $pgdata -c listen_addresses=127.0.0.1" start >/dev/null
    pg_started=1
    admin="postgres://postgres@127.0.0.1:$port"
    psql "$admin/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'keel'" | grep -q 1 ||
        psql "$admin/postgres" -qc "CREATE DATABASE keel" >/dev/null
    export KEEL_DATABASE__MIGRATE_URL="$admin/keel"
    export KEEL_DATABASE__URL="postgres://keel_api@127.0.0.1:$port/keel"
else
    export KEEL_DATABASE__URL="$DATABASE_URL"
fi

# A signing key for access tokens, made once and kept private.
if [ ! -f "$state/token-signing-key" ]; then
    (umask 077; head -c 48 /dev/urandom | base64 | tr -d '\n=' > "$state/token-signing-key")
fi
export KEEL_AUTH__SIGNING_KEYS="[\"$(cat "$state/token-signing-key")\"]"

cargo build --quiet -p keel-api-bin -p keel-worker-bin -p keel-agent
if [ "${KEEL_CONSOLE_BUILD:-1}" != 0 ]; then
    command -v npm >/dev/null 2>&1 || { echo "run-local: the console needs Node.js 20.19+ and npm (apt-get install nodejs npm)" >&2; exit 1; }
    # Install again when the lock file changed since the last install.
    if [ ! -f ui/node_modules/.package-lock.json ] || [ ui/package-lock.json -nt ui/node_modules/.package-lock.json ]; then
        (cd ui && npm ci --no-audit --no-fund --loglevel=error)
    fi
    if ! (cd ui && npm run --silent build) >"$state/console-build.log" 2>&1; then
        cat "$state/console-build.log" >&2
        echo "run-local: building the console failed (above)" >&2
        exit 1
    fi
fi
export KEEL_CONSOLE__DIR="$root/ui/dist"
./target/debug/api migrate
if [ -n "$pg_started" ]; then
    # The runtime role: a member of keel_app and keel_system (created by the
    # migrations), without superuser or BYPASSRLS.
    psql "$KEEL_DATABASE__MIGRATE_URL" -qc "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keel_api') THEN
            CREATE ROLE keel_api LOGIN NOSUPERUSER NOBYPASSRLS;
        END IF; END \$\$; GRANT keel_app, keel_system TO keel_api;" >/dev/null
fi

# The KMS master key of local mode; the CAs and signing keys live in
# Postgres, sealed under it.
export KEEL_KMS__PROVIDER=local
export KEEL_KMS__MASTER_KEY_FILE="$state/kms/master-keys.json"
if [ -d "$state/pki" ]; then
    # Keys from before they moved into Postgres: the local agent trusts a
    # CA that no longer exists, so it enrols again.
    echo "keel: control-plane keys now live in Postgres; re-enrolling the local agent"
    rm -rf "$state/pki" "$state/agent"
fi
listen=${KEEL_SERVER__LISTEN:-127.0.0.1:8080}
export KEEL_SERVER__LISTEN="$listen"
# Prometheus metrics of each process, on loopback.
export KEEL_METRICS__API_LISTEN=${KEEL_METRICS__API_LISTEN:-127.0.0.1:9464}
export KEEL_METRICS__WORKER_LISTEN=${KEEL_METRICS__WORKER_LISTEN:-127.0.0.1:9465}
KEEL_DATABASE_MIGRATE_ON_START=false ./target/debug/api &
pids+=($!)

for _ in $(seq 1 100); do
    curl -fsS "http://$listen/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done

./target/debug/worker &
pids+=($!)

# One local node agent, enrolled on first run with a fresh join token.
agent_state="$state/agent"
agent_listen=${KEEL_AGENT_LISTEN:-127.0.0.1:7443}
if [ ! -f "$agent_state/node.json" ]; then
    token=$(./target/debug/api join-token 2>"$state/join-token.err")
    fingerprint=$(sed -n 's/.*fingerprint \([0-9a-f]*\).*/\1/p' "$state/join-token.err")
    ./target/debug/keel-agent join --api-url "http://$listen" --join-token "$token" \
        --ca-fingerprint "$fingerprint" --state-dir "$agent_state" --listen "$agent_listen" --name local-agent
fi
KEEL_AGENT_METRICS_LISTEN=${KEEL_AGENT_METRICS_LISTEN:-127.0.0.1:9466} \
    ./target/debug/keel-agent run --state-dir "$agent_state" &
pids+=($!)
cat <<MSG

Keel is running at http://$listen  (Ctrl-C stops it)
  console:  http://$listen/
  register: curl -s http://$listen/v1/auth/register -H 'content-type: application/json' \\
              -d '{"email":"you@example.com","password":"a long password","tenant_name":"Acme"}'
  log in:   curl -s http://$listen/v1/auth/login -H 'content-type: application/json' \\
              -d '{"email":"you@example.com","password":"a long password"}'
  API document: http://$listen/v1/openapi.json
  metrics:  http://$KEEL_METRICS__API_LISTEN/metrics (api), http://$KEEL_METRICS__WORKER_LISTEN/metrics (worker),
            http://127.0.0.1:9466/metrics (agent)

MSG
wait "${pids[@]}"
