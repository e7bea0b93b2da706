#!/usr/bin/env bash
# Prepares a fresh Debian machine for the tests: installs what is missing
# (Postgres, psql, curl, Java, iproute2, Chromium, Node.js, OpenAPI Generator, moto) and starts Postgres on
# 127.0.0.1:5432 with password-less local access for `postgres`.
set -euo pipefail

need_apt=()
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
# `ip netns` and veth pairs for the network-namespace test.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# The console's browser tests drive Debian's Chromium (never a downloaded
# browser). Vite needs Node.js 20.19 or later.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# Vite 8 needs Node.js 20.19+ and npm 11 (Debian 12's own nodejs is 18).
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; then
    echo "setup: the console needs Node.js 20.19 or later; this machine has $(node --version)" >&2
    exit 1
fi
npm_major=$(npm --version | cut -d. -f1)
[ "$npm_major" -ge 11 ] || npm install -g --no-audit --no-fund --loglevel=error npm@11

# OpenAPI Generator (the jar ships inside the PyPI package; runs offline).
command -v openapi-generator-cli >/dev/null 2>&1 || python3 -m pip install -q 'openapi-generator-cli==7.26.*'

# moto's server: a real KMS API on 127.0.0.1 for the AWS KMS tests.
python3 -c 'import moto.server' >/dev/null 2>&1 || python3 -m pip install -q 'moto[server]==5.*'

# Postgres on 127.0.0.1:5432 with trust auth for `postgres`.
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    cluster=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$cluster" ]; then
        pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
    fi
    for _ in $(seq 1 50); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
fi
pg_isready -h 127.0.0.1 -p 5432
# A freshly installed Debian cluster asks for passwords on TCP; the tests
# connect as `postgres` and `keel_api` without one.
if ! psql -h 127.0.0.1 -U postgres -d postgres -qtAc 'SELECT 1' >/dev/null 2>&1; then
    hba=$(runuser -u postgres -- psql -qtAc 'SHOW hba_file')
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    runuser -u postgres -- psql -qtAc 'SELECT pg_reload_conf()' >/dev/null
fi
