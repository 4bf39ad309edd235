#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, clippy, and all tests (unit tests
# and the conformance suite on every engine: wasmtime, wasmer with its three compilers, wasmi,
# WAMR, V8 and the null runtime). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${CI:-}" ]; then
  # A one-off build gains nothing from incremental state, which would add about 1 GB to the
  # 3 GB that the test build of every engine takes on disk.
  export CARGO_INCREMENTAL=0
  df -h . | sed 's/^/disk: /'
fi
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy (every engine)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo test (every engine)"
cargo test --workspace --all-features
