#!/usr/bin/env bash
# Builds pwhost's Debian package with cargo-deb (metadata: [package.metadata.deb] in
# pwhost/Cargo.toml): the `pwhost` binary and the Traffic Server plugin with every engine,
# Debian's libnode (V8) from .deps/libnode bundled in /usr/lib/pwhost, the examples. Prints the
# package's path.
#
#   bash scripts/package.sh                            # release build, then target/debian/*.deb
#   bash scripts/package.sh --profile dev --no-build   # package what a test build left (CI)
#
# Other arguments go to cargo-deb (e.g. --fast for quicker, larger compression). Needs the
# system packages and libnode of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
deb_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a profile name}; shift 2 ;;
    --profile=*) profile=${1#--profile=}; shift ;;
    --no-build) build=0; shift ;;
    *) deb_args+=("$1"); shift ;;
  esac
done
if [ -n "${PWHOST_V8_DIR:-}" ]; then
  echo "package: the package bundles Debian's libnode from .deps/libnode; unset PWHOST_V8_DIR" >&2
  exit 1
fi

# cargo-deb in a root of its own (not the user's ~/.cargo/bin), pinned: the package's metadata
# is written for this version, which packages a dev-profile build (the test build) with a
# warning that later versions will refuse it.
cargo_deb_version=3.8.0
tools=$PWD/.deps/tools
if [ "$("$tools/bin/cargo-deb" --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
  cargo install --locked --quiet --root "$tools" cargo-deb --version "$cargo_deb_version"
fi
if [ "$build" = 1 ]; then
  # One build for both packages, so that they share every dependency.
  cargo build --profile "$profile" -p pwhost -p pwhost-ats \
    --features pwhost/all-engines,pwhost-ats/all-engines
fi
# Both binaries are built by this script (or the test build), not by cargo-deb, which builds
# only the package it is given. Stripped: the release profile keeps line tables for profiling,
# which would make the installed binaries several times larger.
"$tools/bin/cargo-deb" -p pwhost --no-build --profile "$profile" --output target/debian --strip \
  ${deb_args[@]+"${deb_args[@]}"}
