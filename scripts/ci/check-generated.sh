#!/usr/bin/env bash
# Fails when the committed OpenAPI document or either generated client is
# not exactly what the code produces (run `make codegen` and commit).
set -euo pipefail
cd "$(dirname "$0")/../.."

# The committed OpenAPI document and both generated clients must be what
# the code produces.
bash scripts/codegen.sh
generated=(openapi crates/keel-client ui/src/api/generated)
if ! git diff --exit-code -- "${generated[@]}" || [ -n "$(git status --porcelain -- "${generated[@]}")" ]; then
    echo "CI: generated contracts drifted; run make codegen and commit" >&2
    exit 1
fi
