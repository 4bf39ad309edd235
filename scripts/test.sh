#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, clippy, and all tests (unit tests
# and the conformance suite on every engine compiled in). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
