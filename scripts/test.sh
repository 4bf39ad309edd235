#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, clippy, all tests (unit tests
# and the conformance suite on every engine: wasmtime, wasmer with its three compilers, wasmi,
# WAMR, V8 and the null runtime), the Debian package tried as installed software
# (scripts/install-test.sh) and a short run of each fuzz target. CI runs exactly this (.ci/run).
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
# The fuzz targets are a workspace of their own (scripts/fuzz.sh builds them); their harness,
# run on seeds by the tests below, is a member of this one.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== cargo clippy (every engine)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo test (every engine)"
cargo test --workspace --all-features
echo "== Debian package of the test build, installed into a throwaway root"
bash scripts/package.sh --profile dev --no-build --fast
bash scripts/install-test.sh
echo "== fuzz smoke run (cargo-fuzz targets, each briefly from its seeds)"
bash scripts/fuzz.sh smoke 20
