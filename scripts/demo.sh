#!/usr/bin/env bash
# The main job on a fresh machine: set up, build pwhost, and run a bundled plugin (the Proxy-Wasm
# Rust SDK header-rewrite example) through one HTTP exchange, printing what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --release -q -p pwhost -- run \
  --plugin plugins/dist/rust/http_headers.wasm \
  --scenario examples/http_headers.yaml "$@"
