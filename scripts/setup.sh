#!/usr/bin/env bash
# Installs what pwhost's build and tests need on a fresh Debian machine, then builds the plugin
# corpus. Safe to run again: it skips what is already there.
#   - wasm toolchain for the plugin corpus: Debian's rustc-web/cargo-web (rustc with the
#     library sources, for -Zbuild-std), lld-19 (wasm-ld), wasi-libc, wabt (wat2wasm), clang-19
#     (the C plugin for ABI 0.1.0); the AssemblyScript plugin uses the machine's node and npm
#   - Traffic Server 9.2 and its headers for the Traffic Server plugin (ats/) and its end-to-end
#     tests (trafficserver trafficserver-dev); wrk and h2load (nghttp2-client) for the load
#     benchmarks; curl for `pwhost serve`'s HTTP/2 test; dpkg-dev (dpkg-shlibdeps) for the
#     Debian package's test
#   - engines: LLVM 22 for wasmer's LLVM compiler (llvm-22-dev libpolly-22-dev libzstd-dev), cmake
#     and libclang-dev for WAMR, libuv1 and libc-ares2 for libnode (V8), whose own files
#     scripts/fetch-libnode.sh unpacks into .deps/libnode, g++ for V8's C++ shim
#   - npm (and Debian's Node.js with it) for the AssemblyScript plugin, unless the machine has
#     an npm already (Debian's would conflict with a Node.js from elsewhere, e.g. NodeSource)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(rustc-web cargo-web rust-web-src lld-19 wasi-libc wabt clang-19
  llvm-22-dev libpolly-22-dev libzstd-dev cmake libclang-dev libuv1 libc-ares2
  trafficserver trafficserver-dev wrk nghttp2-client curl dpkg-dev g++)
command -v npm >/dev/null || packages+=(npm)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
  # Debian's trafficserver package starts a system Traffic Server on port 8080 of every
  # interface where systemd runs; the tests start their own on 127.0.0.1 and need none.
  if [[ " ${missing[*]} " == *" trafficserver "* ]] && command -v systemctl >/dev/null &&
    systemctl is-active --quiet trafficserver 2>/dev/null; then
    echo "setup: stopping and disabling the system Traffic Server the package started"
    "${sudo_cmd[@]}" systemctl disable --now trafficserver
  fi
fi

bash scripts/fetch-libnode.sh
bash plugins/build.sh
