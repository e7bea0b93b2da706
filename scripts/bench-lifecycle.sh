#!/usr/bin/env bash
# The lifecycle part of `make bench` (release build, real processes):
#
# (a) create -> running with the process driver: api, worker and a node
#     agent as separate processes (mutual TLS, signed tasks, a real process
#     per allocation under its shim), 1, 10 and 50 clients that each create
#     an allocation, poll it (every 10 ms x clients) until it runs and
#     terminate it;
#     p50/p99 from the control plane's own timestamps (the allocation's
#     creation to its `allocation.running` event), which the target is
#     judged on, and as the client saw it (which adds up to one poll
#     interval: half a second at 50 clients). The agent offers 256 vCPUs,
#     512 GiB and 4,000 GiB of disk (KEEL_AGENT_VCPUS/MEMORY_MIB/DISK_GIB)
#     so that the clients, their launches and the terminations still under
#     way all fit on one small machine: the run measures latency, not
#     running out of room.
# (b) scheduler placements per second with 5,000 hosts and 20,000
#     allocations on them: `capacity_reserve` in its own transaction, as
#     the create path calls it, 8 clients for 10 s.
# (c) list allocations (keyset pages of 50) with 100,000 more rows in the
#     table: p99 over 8 clients for 10 s.
#
# Targets: (a) p50 < 150 ms, p99 < 1 s; (b) >= 1,000 placements/s;
# (c) p99 < 20 ms. doc/performance.md compares them with Kubernetes' SLOs.
# Run as root (per-allocation users and cgroups, as in production).
# BENCH_LAUNCH_SPECS ("1:20 10:5 50:3", clients:launches each) and
# KEEL_BENCH_DATABASE_URL change the run.
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
cd "$(dirname "$0")/.."

admin_url=${KEEL_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
port=${BENCH_PORT:-18180}
db=keel_bench_lifecycle
scratch=$(mktemp -d)
# Workloads run as their own users, who must reach their directories.
chmod 755 "$scratch"
state_dir=$scratch/agent
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    # An agent leaves its workloads running when it stops (on purpose);
    # the bench's must not outlive it.
    for dir in "$state_dir"/runtime/*/; do
        [ -f "$dir/pid" ] && kill -KILL "$(cat "$dir/pid")" 2>/dev/null || true
    done
    pkill -KILL -f "$state_dir/runtime" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT
sql() { psql "$bench_admin_url" -qtAc "$1"; }

echo "bench: building the api, worker, agent and load generator (release)…" >&2
cargo build --release -q -p keel-api-bin -p keel-worker-bin -p keel-agent -p keel-bench

. scripts/bench/common.sh
bench_api
pids+=("$api_pid")

# A node: enrolled with a join token, offering more than this machine has.
join_token=$(target/release/api join-token 2>/dev/null)
target/release/keel-agent enrol --api-url "$api" --join-token "$join_token" --name bench-node \
    --state-dir "$state_dir" --listen "127.0.0.1:$((port + 2))" >/dev/null
KEEL_AGENT_VCPUS=256 KEEL_AGENT_MEMORY_MIB=524288 KEEL_AGENT_DISK_GIB=4000 KEEL_AGENT_HEARTBEAT_SECS=1 RUST_LOG=warn \
    target/release/keel-agent run --state-dir "$state_dir" >"$scratch/agent.log" 2>&1 &
pids+=($!)
target/release/worker >"$scratch/worker.log" 2>&1 &
worker_pid=$!
pids+=("$worker_pid")
for _ in $(seq 1 100); do
    [ "$(sql "SELECT vcpus FROM hosts WHERE name = 'bench-node'")" = 256 ] && break
    sleep 0.1
done

bench_tenant
bench() {
    target/release/keel-bench "$@" --url "$api" --token "$token" --project "$project"
}

# (a) create -> running.
launch_results=()
for spec in ${BENCH_LAUNCH_SPECS:-1:20 10:5 50:3}; do
    clients=${spec%:*}
    since=$(sql "SELECT clock_timestamp()")
    echo "bench: (a) $clients client(s) launching…" >&2
    result=$(bench launch --clients "$clients" --launches "${spec#*:}")
    echo "bench: (a) $result" >&2
    # The same launches by the control plane's clock.
    server=$(sql "SELECT coalesce(round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1), 0)
                         || ' ' || coalesce(round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1), 0)
                  FROM (SELECT extract(epoch FROM (min((o.payload->>'at')::timestamptz) - a.created_at)) * 1000 AS ms
                          FROM allocations a JOIN outbox o
                            ON o.aggregate_id = a.id AND o.event_type = 'allocation.running'
                         WHERE a.created_at >= '$since' GROUP BY a.id, a.created_at) launches")
    launch_results+=("$result|$server")
    # Let the terminations finish before the next round.
    for _ in $(seq 1 300); do
        [ "$(sql "SELECT count(*) FROM allocations WHERE state NOT IN ('terminated', 'failed')")" = 0 ] && break
        sleep 0.1
    done
done
# Where the launches ended (a failed one says why).
sql "SELECT state, coalesce(failure_reason, '-'), count(*) FROM allocations GROUP BY 1, 2" | sed 's/^/bench: (a) /' >&2
kill "$worker_pid"

# (b) the scheduler among 5,000 hosts holding 20,000 allocations.
echo "bench: (b) seeding 5,000 hosts and 20,000 allocations…" >&2
sql "UPDATE hosts SET state = 'cordoned' WHERE name = 'bench-node'" >/dev/null
sql "INSERT INTO hosts (id, name, region, state, agent_url, vcpus, memory_mib, disk_gib, cert_serial, cert_not_after, last_seen_at)
     SELECT gen_random_uuid(), 'sim-' || g, 'local-1', 'ready', 'https://127.0.0.1:1', 64, 262144, 4000,
            'sim' || g, now() + interval '1 day', now()
       FROM generate_series(1, 5000) g" >/dev/null
sql "WITH sims AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM hosts WHERE name LIKE 'sim-%')
     INSERT INTO allocations (id, tenant_id, project_id, name, flavor, region, command, state, host_id, reserved)
     SELECT gen_random_uuid(), '$tenant', '$project', 'sim-' || i, 'cpu.small', 'local-1', '{sleep,infinity}',
            'running', sims.id, true
       FROM generate_series(1, 20000) i JOIN sims ON sims.n = 1 + (i * 7919) % 5000" >/dev/null
sql "UPDATE hosts SET reserved_vcpus = held.n, reserved_memory_mib = held.n * 1024, reserved_disk_gib = held.n * 10
       FROM (SELECT host_id, count(*) AS n FROM allocations WHERE reserved GROUP BY host_id) held
      WHERE hosts.id = held.host_id AND hosts.name LIKE 'sim-%'" >/dev/null
sql "ANALYZE hosts" >/dev/null
echo "bench: (b) placing…" >&2
place_result=$(target/release/keel-bench place --database-url "$app_url" --clients 8 --seconds 10)

# (c) listing with 100,000 more rows.
echo "bench: (c) seeding 100,000 allocations…" >&2
sql "INSERT INTO allocations (id, tenant_id, project_id, name, flavor, region, command, state, failure_reason)
     SELECT gen_random_uuid(), '$tenant', '$project', 'row-' || i, 'cpu.small', 'local-1', '{sleep,infinity}',
            'failed', 'insufficient_capacity'
       FROM generate_series(1, 100000) i" >/dev/null
sql "ANALYZE allocations" >/dev/null
echo "bench: (c) listing…" >&2
list_result=$(bench list --clients 8 --seconds 10)
rows=$(sql "SELECT count(*) FROM allocations")

python3 - "$place_result" "$list_result" "$rows" "$(nproc)" "${launch_results[@]}" <<'PY'
import json, sys
place, listing, rows, cores = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
launches = []
for arg in sys.argv[5:]:
    client, server = arg.split("|")
    p50, p99 = (float(x) for x in server.split())
    launches.append((json.loads(client), p50, p99))
print(f"lifecycle benchmarks on {cores} cores")
print()
print("(a) create -> running, process driver")
print(f"{'clients':>8} {'launches':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'server p50':>11} {'server p99':>11}")
ok_a = True
for client, p50, p99 in launches:
    print(f"{client['clients']:>8} {client['requests']:>9} {client['errors']:>7} {client['p50_ms']:>8.1f} {client['p99_ms']:>8.1f} {p50:>11.1f} {p99:>11.1f}")
    ok_a = ok_a and client["errors"] == 0 and p50 < 150 and p99 < 1000
print(f"target (server clock, no errors): p50 < 150 ms, p99 < 1 s at every concurrency ... {'met' if ok_a else 'NOT met'}")
print()
print("(b) scheduler, 5,000 hosts, 20,000 allocations, 8 clients")
print(f"placements/s {place['rps']:.0f}  p50 {place['p50_ms']:.2f} ms  p99 {place['p99_ms']:.2f} ms  errors {place['errors']}")
print(f"target: >= 1,000 placements/s ............................ {'met' if place['rps'] >= 1000 else 'NOT met'}")
print()
print(f"(c) list allocations, {rows:,} rows in the table, pages of 50, 8 clients")
print(f"req/s {listing['rps']:.0f}  p50 {listing['p50_ms']:.2f} ms  p99 {listing['p99_ms']:.2f} ms  errors {listing['errors']}")
print(f"target: p99 < 20 ms ...................................... {'met' if listing['p99_ms'] < 20 else 'NOT met'}")
PY
