#!/usr/bin/env bash
# `make bench`, billing: usage events metered per second by one billing
# worker (target >= 5,000/s) and the invoice of a tenant with 10,000
# allocations in a month (target < 2 s). keel-billing-bench does the work
# on a fresh, migrated database `keel_billing_bench` (release build).
#
# Environment: KEEL_BENCH_DATABASE_URL (superuser; default
# postgres://postgres@127.0.0.1:5432/postgres), BENCH_ALLOCATIONS (10000:
# twice as many events).
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
cd "$(dirname "$0")/.."

admin_url=${KEEL_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=keel_billing_bench
base=${admin_url%/*}
app_url="postgres://keel_api@${base#*@}/$db"
bench_admin_url="$base/$db"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

echo "bench-billing: building (release)…" >&2
cargo build --release -q -p keel-api-bin -p keel-bench

psql "$admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
psql "$admin_url" -qc "CREATE DATABASE $db" >/dev/null
psql "$admin_url" -qc "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keel_api') THEN CREATE ROLE keel_api LOGIN; END IF; END \$\$;" >/dev/null
KEEL_DATABASE__URL=$app_url KEEL_DATABASE__MIGRATE_URL=$bench_admin_url \
    KEEL_AUTH__SIGNING_KEYS='["bench-signing-key-that-is-long-enough-0123456789"]' \
    KEEL_KMS__PROVIDER=local KEEL_KMS__MASTER_KEY_FILE="$scratch/master-keys.json" \
    target/release/api migrate >/dev/null
psql "$bench_admin_url" -qc "GRANT keel_app, keel_system TO keel_api" >/dev/null

echo "bench-billing: metering ${BENCH_ALLOCATIONS:-10000} allocations' events, then invoicing 10,000 allocations…" >&2
target/release/keel-billing-bench --database-url "$app_url" --admin-url "$bench_admin_url" \
    --allocations "${BENCH_ALLOCATIONS:-10000}"
psql "$admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
