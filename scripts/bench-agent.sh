#!/usr/bin/env bash
# The node agent's part of `make bench` (release build): task verifications
# per second on one core, resident memory idle and with 100 simulated
# workloads, and the time from a task being signed to its workload process
# running (p50/p99). Targets: idle RSS < 20 MB, >= 10,000 verifications/s,
# signed -> started p50 < 20 ms. Run as root for cgroup limits and
# per-allocation users (as in production); it works without.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "bench: building the agent (release)…" >&2
cargo build --release -q -p keel-agent -p keel-bench
target/release/keel-agent-bench --agent target/release/keel-agent --launches "${BENCH_LAUNCHES:-50}"
