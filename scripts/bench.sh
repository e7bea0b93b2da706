#!/usr/bin/env bash
# `make bench`: the api against the local Postgres, and pgbench running the
# same SQL statements as the ceiling.
#
# 1. builds the api and the load generator (release);
# 2. makes a fresh database `keel_bench`, migrates it, starts the api on it
#    (rate limits off), registers a tenant, logs in, adds a host large
#    enough for every allocation the run creates;
# 3. keel-bench: authenticated GET of a project, then authenticated
#    allocation create (with Idempotency-Key: idempotency + allocation +
#    placement + audit + outbox in one transaction), N clients for D s;
# 4. pgbench with scripts/bench/{get,create}.sql (the same statements) as
#    the runtime role, same clients and duration;
# 5. prints the table and the ratios against the targets (create >= 50 %
#    of the ceiling, reads >= 5,000 req/s).
#
# Environment: KEEL_BENCH_DATABASE_URL (superuser; default
# postgres://postgres@127.0.0.1:5432/postgres), BENCH_CLIENTS (32),
# BENCH_SECONDS (10).
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
cd "$(dirname "$0")/.."

admin_url=${KEEL_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
clients=${BENCH_CLIENTS:-32}
seconds=${BENCH_SECONDS:-10}
port=${BENCH_PORT:-18080}
db=keel_bench
scratch=$(mktemp -d)
api_pid=
cleanup() {
    [ -n "$api_pid" ] && kill "$api_pid" 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

for tool in psql pgbench curl; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing" >&2; exit 1; }
done

echo "bench: building (release)…" >&2
cargo build --release -q -p keel-api-bin -p keel-bench

. scripts/bench/common.sh
bench_api
bench_tenant
session=$(psql "$bench_admin_url" -qtAc "SELECT id FROM sessions WHERE user_id = '$user' LIMIT 1")
psql "$bench_admin_url" -qc "INSERT INTO hosts (id, name, region, state, agent_url, vcpus, memory_mib, disk_gib, cert_serial, cert_not_after)
    VALUES (gen_random_uuid(), 'bench-host', 'local-1', 'ready', 'https://127.0.0.1:1', 100000000, 1000000000000, 1000000000000, '00', now() + interval '1 day')" >/dev/null

run_api() {
    target/release/keel-bench "$1" --url "$api" --token "$token" --project "$project" \
        --clients "$clients" --seconds "$seconds"
}
run_pgbench() {
    # As the runtime role, so row-level security costs the same.
    pgbench -n -M prepared -c "$clients" -j 2 -T "$seconds" -r \
        -D tenant="$tenant" -D user="$user" -D session="$session" -D project="$project" \
        -f "scripts/bench/$1.sql" "$app_url" >"$scratch/pgbench-$1.txt" 2>&1 || {
        cat "$scratch/pgbench-$1.txt" >&2
        exit 1
    }
    grep -E '^tps' "$scratch/pgbench-$1.txt" | sed -E 's/tps = ([0-9.]+).*/\1/'
}
field() { echo "$1" | sed -E "s/.*\"$2\":([0-9.e+-]+).*/\\1/"; }

echo "bench: $clients clients, $seconds s per run, on $(nproc) cores" >&2
get_api=$(run_api get)
get_pg=$(run_pgbench get)
create_api=$(run_api create)
create_pg=$(run_pgbench create)

python3 - "$get_api" "$get_pg" "$create_api" "$create_pg" <<'PY'
import json, sys
get_api, get_pg, create_api, create_pg = json.loads(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
rows = [("GET project", get_api, get_pg), ("create allocation", create_api, create_pg)]
print(f"{'path':<20} {'api req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'pgbench tps':>12} {'ratio':>7}")
for name, api, pg in rows:
    ratio = api["rps"] / pg if pg else 0.0
    print(f"{name:<20} {api['rps']:>10.0f} {api['p50_ms']:>8.2f} {api['p99_ms']:>8.2f} {api['errors']:>7} {pg:>12.0f} {ratio:>6.0%}")
reads_ok = get_api["rps"] >= 5000
create_ok = create_pg and create_api["rps"] / create_pg >= 0.5
print()
print(f"target: reads >= 5,000 req/s ......... {'met' if reads_ok else 'NOT met'} ({get_api['rps']:.0f})")
print(f"target: create >= 50 % of pgbench .... {'met' if create_ok else 'NOT met'} ({create_api['rps'] / create_pg:.0%})")
PY
