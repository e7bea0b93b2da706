#!/usr/bin/env bash
# Regenerates what is generated from the code: openapi/openapi.json.
# (The Rust and TypeScript clients generated from it by OpenAPI Generator
# are added here with the contracts work; see doc/ARCHITECTURE.md.)
set -euo pipefail
cd "$(dirname "$0")/.."
unset DATABASE_URL
cargo run --quiet -p keel-api-bin --bin api -- openapi > openapi/openapi.json.tmp
mv openapi/openapi.json.tmp openapi/openapi.json
echo "codegen: openapi/openapi.json written"
