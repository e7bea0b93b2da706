# Keel: the two commands a newcomer needs are `make run` and `make test`.
.PHONY: run test bench build lint fmt codegen ci

run: ## Local mode: private Postgres, api (and, as they land, worker and agent)
	bash scripts/run-local.sh

test: ## Every test: unit, database (fresh database per test), end-to-end
	bash scripts/test.sh

bench: ## The api against pgbench running the same SQL, the node agent's numbers, the lifecycle (create -> running, placements, lists) and billing (metering rate, invoice time) (release build)
	bash scripts/bench.sh
	bash scripts/bench-agent.sh
	bash scripts/bench-lifecycle.sh
	bash scripts/bench-billing.sh

build:
	cargo build --workspace --all-targets

lint: ## What CI checks besides the tests
	cargo fmt --all -- --check
	cargo clippy --workspace --exclude keel-client --all-targets -- -D warnings

fmt:
	cargo fmt --all

codegen: ## Regenerate openapi/openapi.json and the Rust and TypeScript clients
	bash scripts/codegen.sh

ci: ## What CI runs on a fresh machine
	bash .ci/run
