#!/usr/bin/env bash
# Checks that pwhost's Debian package works as installed software, away from the build tree:
#   1. its Depends: names every package dpkg-shlibdeps finds the binaries (and the bundled
#      libnode) need;
#   2. no binary names a path of the build machine (NEEDED, RPATH, RUNPATH);
#   3. installed into a throwaway root (dpkg -x) and with the checkout hidden (an empty tmpfs
#      over it, in a mount namespace of its own), `pwhost run` runs the header plugin on every
#      engine the binary has, and Traffic Server loads the plugin (verify_global_plugin).
#
#   bash scripts/install-test.sh [PACKAGE.deb]    # default: the newest in target/debian
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD

deb=${1:-$(ls -t target/debian/pwhost_*.deb 2>/dev/null | head -n 1)}
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
  echo "install-test: no package (run scripts/package.sh first)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # traffic_server reads the plugin as its own user
root=$work/root
dpkg -x "$deb" "$root"
binary=usr/bin/pwhost
plugin=usr/lib/trafficserver/modules/pwhost_ats.so
libnode=usr/lib/pwhost/libnode.so.108
for file in "$binary" "$plugin" "$libnode"; do
  [ -f "$root/$file" ] || { echo "install-test: $deb has no /$file" >&2; exit 1; }
done
failed=0
fail() {
  echo "install-test: FAILED: $*" >&2
  failed=1
}

echo "== Depends: against dpkg-shlibdeps"
declared=$(dpkg-deb -f "$deb" Depends)
mkdir "$root/debian"
printf 'Source: pwhost\n\nPackage: pwhost\nArchitecture: any\n' > "$root/debian/control"
needed=$(cd "$root" && dpkg-shlibdeps --ignore-missing-info -O -lusr/lib/pwhost \
  "$binary" "$plugin" "$libnode" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
rm -r "$root/debian"
[ -n "$needed" ] || fail "dpkg-shlibdeps found no dependencies"
for package in $(echo "$needed" | tr ',' '\n' | sed 's/^ *//; s/ .*//'); do
  echo "$declared" | tr ',' '\n' | sed 's/^ *//; s/ .*//' | grep -qx "$package" ||
    fail "$package is needed (dpkg-shlibdeps: $needed) but not in Depends: $declared"
done

echo "== no path of the build machine in the binaries"
for file in "$binary" "$plugin"; do
  dynamic=$(readelf -d "$root/$file" | grep -E '\((NEEDED|RPATH|RUNPATH)\)' || true)
  echo "$dynamic" | grep -E 'RPATH|RUNPATH' | sed "s|.*\[|  $file: run path [|"
  if echo "$dynamic" | grep -E '\((NEEDED)\)' | grep -q '/'; then
    fail "$file needs a library by absolute path"
  fi
  if echo "$dynamic" | grep -E '\((RPATH|RUNPATH)\)' | sed 's/.*\[//' | tr ':' '\n' |
    grep -qvE '^\$ORIGIN'; then
    fail "$file searches a directory not relative to itself"
  fi
done

# A proxy-wasm SDK library for the null runtime, which binds to the installed binary's exported
# host functions (the package has only the compiled-in native plugins).
cp plugins/dist/native/libhttp_headers.so "$work/"

# The checks on the installed copy, run with the checkout hidden. Exported for the shell in the
# mount namespace; they read only the throwaway root and $work.
installed_checks() {
  set -euo pipefail
  local pwhost=$root/usr/bin/pwhost docs=$root/usr/share/doc/pwhost status=0
  # run_plugin LABEL ENGINE PLUGIN: the header plugin's report must show its edits.
  run_plugin() {
    if env -u LD_LIBRARY_PATH "$pwhost" run --plugin "$3" --runtime "$2" \
      --scenario "$docs/examples/http_headers.yaml" --format json > "$work/$1.json" &&
      python3 - "$2" "$work/$1.json" <<'PYTHON'
import json, sys
engine, path = sys.argv[1], sys.argv[2]
report = json.load(open(path))
exchange = report["http"][0]
assert report["runtime"] == engine, report["runtime"]
assert report["errors"] == [] and exchange["error"] is None, (report["errors"], exchange["error"])
assert ["x-pwhost-plugin", "http_headers"] in exchange["request_headers"], exchange
assert ["x-powered-by", "pwhost"] in exchange["response_headers"], exchange
PYTHON
    then
      echo "  $1: the plugin ran"
    else
      echo "  $1: FAILED (report: $work/$1.json)" >&2
      status=1
    fi
  }
  local engines
  engines=$(env -u LD_LIBRARY_PATH "$pwhost" runtimes) || { echo "pwhost does not start" >&2; return 1; }
  local every="wasmtime wasmer-cranelift wasmer-singlepass wasmer-llvm wasmi wamr v8 null"
  if [ "$(echo $engines)" != "$every" ]; then
    echo "  the package's pwhost has engines: $(echo $engines); expected: $every" >&2
    status=1
  fi
  for engine in $engines; do
    if [ "$engine" = null ]; then
      run_plugin null null native:http_headers
      run_plugin null-sdk-library null "$work/libhttp_headers.so"
    else
      run_plugin "$engine" "$engine" "$docs/plugins/dist/rust/http_headers.wasm"
    fi
  done
  if (cd "$work" && env -u LD_LIBRARY_PATH timeout 120 traffic_server \
    -C "verify_global_plugin $root/usr/lib/trafficserver/modules/pwhost_ats.so") \
    > "$work/verify.log" 2>&1; then
    echo "  Traffic Server loads pwhost_ats.so"
  else
    echo "  Traffic Server cannot load pwhost_ats.so:" >&2
    cat "$work/verify.log" >&2
    status=1
  fi
  return $status
}
export -f installed_checks
export root work

echo "== the installed copy, build tree hidden"
if unshare --mount --propagation private true 2>/dev/null; then
  unshare --mount --propagation private bash -c \
    "mount -t tmpfs -o size=1m,mode=0755 pwhost-checkout-hidden '$checkout' && cd / && installed_checks" ||
    fail "the installed copy"
else
  # Without a mount namespace (an unprivileged container), the dynamic loader's resolution is
  # the evidence that the build tree is not used.
  echo "  (no mount namespace here: the checkout stays visible; checking what the loader resolves)"
  if env -u LD_LIBRARY_PATH ldd "$root/$binary" "$root/$plugin" | grep -E "not found|$checkout"; then
    fail "the installed binaries resolve libraries outside the package"
  fi
  (cd / && installed_checks) || fail "the installed copy"
fi

if [ "$failed" = 0 ]; then
  echo "install-test: $deb works installed"
fi
exit $failed
