#!/usr/bin/env bash
# Runs every test. Needs a Postgres reachable as a superuser at
# KEEL_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres);
# each test creates its own database from a migrated template.
set -euo pipefail
cd "$(dirname "$0")/.."

admin_url=${KEEL_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export KEEL_TEST_DATABASE_URL=$admin_url

# Never let a developer's DATABASE_URL turn sqlx's compile-time checks
# against some other database.
unset DATABASE_URL

if ! psql "$admin_url" -qtAc 'SELECT 1' >/dev/null 2>&1; then
    echo "test.sh: cannot reach Postgres at $admin_url (start it, or set KEEL_TEST_DATABASE_URL)" >&2
    exit 1
fi

# Drop the per-test databases of earlier runs (and stale templates).
psql "$admin_url" -qtAc "SELECT datname FROM pg_database WHERE datname LIKE 'keel\_test\_%' OR datname LIKE 'keel\_template\_%\_building'" |
    while read -r db; do
        [ -n "$db" ] && psql "$admin_url" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
    done

# The end-to-end tests run the real binaries as separate processes.
cargo build -p keel-api-bin -p keel-worker-bin -p keel-agent

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi

# The console: install from the lock file, type-check and build it, its
# unit tests (vitest), then its browser tests in Chromium against a real
# local Keel (scripts/ui-e2e.sh).
(cd ui && npm ci --no-audit --no-fund --loglevel=error && npm run build && npm test)
bash scripts/ui-e2e.sh
