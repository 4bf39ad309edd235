#!/usr/bin/env bash
# Fetches Debian's libnode (Node 18, V8 10.2) into .deps/libnode for the v8 engine, without
# installing it: `apt-get install libnode-dev` would conflict with the machine's own Node.js.
# runtime-v8's build script reads PWHOST_V8_DIR, defaulting to this directory.
set -euo pipefail
cd "$(dirname "$0")/.."

target=.deps/libnode
marker="$target/usr/include/node/v8.h"
if [ -f "$marker" ] && ls "$target"/usr/lib/*/libnode.so.108 >/dev/null 2>&1; then
  exit 0
fi
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
chmod 755 "$download" # apt-get download runs as _apt
# Needs the package lists: a machine with every package installed may have none (container
# images delete them), so they are fetched once if the first try finds nothing.
if ! (cd "$download" && apt-get download libnode108 libnode-dev); then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  (cd "$download" && apt-get download libnode108 libnode-dev)
fi
rm -rf "$target"
mkdir -p "$target"
for deb in "$download"/*.deb; do
  dpkg-deb -x "$deb" "$target"
done
echo "fetch-libnode: V8 headers and libnode.so.108 are in $target"
