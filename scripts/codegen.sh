#!/usr/bin/env bash
# Regenerates everything generated from the code, in order:
#   1. openapi/openapi.json, from the handlers' utoipa annotations;
#   2. crates/keel-client, the Rust client (OpenAPI Generator, `rust`);
#   3. ui/src/api/generated, the TypeScript client (`typescript-fetch`).
# Never edit the outputs by hand; CI runs this and fails on any diff.
# Needs Java 17+ and `pip install openapi-generator-cli` (7.x).
set -euo pipefail
cd "$(dirname "$0")/.."
unset DATABASE_URL

cargo run --quiet -p keel-api-bin --bin api -- openapi > openapi/openapi.json.tmp
mv openapi/openapi.json.tmp openapi/openapi.json
echo "codegen: openapi/openapi.json written"

if ! command -v openapi-generator-cli >/dev/null 2>&1; then
    echo "codegen: openapi-generator-cli is missing (pip install 'openapi-generator-cli==7.26.*')" >&2
    exit 1
fi

generate() {
    local generator=$1 output=$2 properties=$3
    local scratch
    scratch=$(mktemp -d)
    openapi-generator-cli generate --global-property skipFormModel=false \
        -i openapi/openapi.json -g "$generator" -o "$scratch" \
        --additional-properties="$properties" >/dev/null
    # Keep only the generated sources, not the generator's own bookkeeping.
    rm -rf "$scratch/.openapi-generator" "$scratch/.openapi-generator-ignore" "$scratch/git_push.sh" \
        "$scratch/.travis.yml" "$scratch/.gitignore"
    rm -rf "$output"
    mkdir -p "$(dirname "$output")"
    mv "$scratch" "$output"
}

generate rust crates/keel-client \
    "packageName=keel-client,reqwestDefaultFeatures=,supportAsync=true,avoidBoxedModels=true"
# Generated code is not ours to lint; clippy checks it as a dependency of
# the end-to-end tests otherwise.
printf '\n[lints.clippy]\nall = { level = "allow", priority = -1 }\n' >> crates/keel-client/Cargo.toml
cargo fmt -p keel-client
echo "codegen: crates/keel-client written"

generate typescript-fetch ui/src/api/generated \
    "npmName=keel-client,supportsES6=true,withInterfaces=false,typescriptThreePlus=true"
echo "codegen: ui/src/api/generated written"
