# Shared by scripts/bench.sh and scripts/bench-lifecycle.sh (sourced, not
# run). Expects admin_url (a superuser URL), db, port and scratch to be set.
#
# bench_api: a fresh database $db, the KEEL_* environment every process of
#   the run shares (rate limits off), migrations, and a release api on
#   $port in the background. Sets app_url (the runtime role),
#   bench_admin_url, api (its URL) and api_pid.
# bench_tenant: registers a tenant and logs in. Sets project, tenant, user
#   and token.

bench_api() {
    local base=${admin_url%/*}
    app_url="postgres://keel_api@${base#*@}/$db"
    bench_admin_url="$base/$db"
    psql "$admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
    psql "$admin_url" -qc "CREATE DATABASE $db" >/dev/null
    psql "$admin_url" -qc "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keel_api') THEN CREATE ROLE keel_api LOGIN; END IF; END \$\$;" >/dev/null

    export KEEL_DATABASE__URL=$app_url
    export KEEL_DATABASE__MIGRATE_URL=$bench_admin_url
    export KEEL_AUTH__SIGNING_KEYS='["bench-signing-key-that-is-long-enough-0123456789"]'
    export KEEL_SERVER__LISTEN=127.0.0.1:$port
    export KEEL_AGENT__LISTEN=127.0.0.1:$((port + 1))
    export KEEL_KMS__PROVIDER=local
    export KEEL_KMS__MASTER_KEY_FILE=$scratch/kms/master-keys.json
    export KEEL_RATE_LIMIT__ENABLED=false
    export KEEL_LOG__FILTER=warn
    target/release/api migrate >/dev/null
    psql "$bench_admin_url" -qc "GRANT keel_app, keel_system TO keel_api" >/dev/null
    target/release/api serve >"$scratch/api.log" 2>&1 &
    api_pid=$!
    api="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do
        curl -sf "$api/healthz" >/dev/null && break
        sleep 0.1
    done
}

bench_tenant() {
    local registered
    registered=$(curl -sf "$api/v1/auth/register" -H 'content-type: application/json' \
        -d '{"email":"bench@example.com","password":"a long bench password","tenant_name":"Bench"}')
    project=$(echo "$registered" | bench_json project_id)
    tenant=$(echo "$registered" | bench_json tenant_id)
    user=$(echo "$registered" | bench_json user_id)
    token=$(curl -sf "$api/v1/auth/login" -H 'content-type: application/json' \
        -d '{"email":"bench@example.com","password":"a long bench password"}' | bench_json access_token)
    # A quota no run reaches (the quota check itself still runs on every create).
    psql "$bench_admin_url" -qc "INSERT INTO quotas (tenant_id, allocations, vcpus, memory_mib, gpus)
        VALUES ('$tenant', 1000000000, 1000000000, 1000000000000, 0)" >/dev/null
}

# The value of a string field of a one-line JSON object on stdin.
bench_json() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }
