#!/usr/bin/env bash
# Checks that pwhost's Debian package works as installed software, away from the build tree:
#   1. its Depends: is what dpkg-shlibdeps finds the binaries and the bundled libnode need;
#   2. the binaries name libraries by file name only and have exactly their run paths, relative
#      to themselves;
#   3. installed into a throwaway root (dpkg -x), with the checkout hidden (an empty tmpfs over
#      it, in a mount namespace of its own): both binaries resolve libnode to the package's copy,
#      `pwhost run` runs the header plugin on every engine, and Traffic Server loads the plugin
#      (`traffic_server -C verify_global_plugin`).
#
#   bash scripts/install-test.sh [PACKAGE.deb]    # default: the newest in target/debian
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD

deb=${1:-$(ls -t target/debian/pwhost_*.deb 2>/dev/null | head -n 1 || true)}
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
  echo "install-test: no package (run scripts/package.sh first)" >&2
  exit 1
fi
work=$(mktemp -d)
chmod 755 "$work" # traffic_server reads the plugin as its own user
failed=0
# Reports of failed checks are kept for a look.
trap '[ "$failed" = 0 ] && rm -rf "$work"' EXIT
fail() {
  echo "install-test: FAILED: $*" >&2
  failed=1
}
root=$work/root
dpkg -x "$deb" "$root"
binary=usr/bin/pwhost
plugin=usr/lib/trafficserver/modules/pwhost_ats.so
libnode=usr/lib/pwhost/libnode.so.108
for file in "$binary" "$plugin" "$libnode"; do
  [ -f "$root/$file" ] || { echo "install-test: $deb has no /$file" >&2; exit 1; }
done

echo "== Depends: against dpkg-shlibdeps"
mkdir "$root/debian"
printf 'Source: pwhost\n\nPackage: pwhost\nArchitecture: any\n' > "$root/debian/control"
# Warnings about $ORIGIN in run paths and binaries outside a package build tree are expected.
needed=$(cd "$root" && dpkg-shlibdeps --ignore-missing-info -O -lusr/lib/pwhost \
  "$binary" "$plugin" "$libnode" 2> "$work/shlibdeps.log" | sed -n 's/^shlibs:Depends=//p' || true)
rm -r "$root/debian"
one_per_line() { tr ',' '\n' | sed 's/^ *//; s/ *$//' | sort; }
declared=$(dpkg-deb -f "$deb" Depends)
if [ -z "$needed" ]; then
  fail "dpkg-shlibdeps found nothing:"
  cat "$work/shlibdeps.log" >&2
elif ! diff <(echo "$declared" | one_per_line) <(echo "$needed" | one_per_line) >&2; then
  fail "Depends (<) is not what dpkg-shlibdeps finds (>); set depends in pwhost/Cargo.toml to: $needed"
fi

echo "== libraries by name, run paths relative to the binaries"
check_dynamic() { # FILE RUNPATH
  local dynamic
  dynamic=$(readelf -d "$root/$1")
  if echo "$dynamic" | grep '(NEEDED)' | grep -q '/'; then
    fail "$1 needs a library by its path"
  fi
  if ! echo "$dynamic" | grep -q "(RUNPATH) *Library runpath: \[$2\]\$"; then
    fail "$1's run path is not $2: $(echo "$dynamic" | grep -E '\((RPATH|RUNPATH)\)' || echo none)"
  else
    echo "  /$1: $2"
  fi
}
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader
check_dynamic "$binary" '$ORIGIN/../lib/pwhost:$ORIGIN'
# shellcheck disable=SC2016
check_dynamic "$plugin" '$ORIGIN/../../pwhost:$ORIGIN'

# The checks on the installed copy: a script of their own, so that it runs the same in a mount
# namespace, and reads only the throwaway root and the work directory.
cp plugins/dist/native/libhttp_headers.so "$work/" # a proxy-wasm SDK library for the null runtime
cat > "$work/checks.sh" <<'CHECKS'
#!/usr/bin/env bash
# checks.sh ROOT WORK: the installed copy in ROOT runs plugins; reports go to WORK.
set -uo pipefail
root=$1 work=$2
pwhost=$root/usr/bin/pwhost docs=$root/usr/share/doc/pwhost
status=0
unset LD_LIBRARY_PATH
for file in usr/bin/pwhost usr/lib/trafficserver/modules/pwhost_ats.so; do
  resolved=$(ldd "$root/$file" | sed -n 's/^\s*libnode\.so\.108 => \(\S*\).*/\1/p')
  if [ -z "$resolved" ] || [ "$(realpath -m "$resolved")" != "$(realpath "$root/usr/lib/pwhost/libnode.so.108")" ]; then
    echo "  /$file: libnode resolves to '$resolved', not the package's copy" >&2
    status=1
  fi
done
# run_plugin LABEL ENGINE PLUGIN: the header plugin's report (the text one: nothing beyond
# grep needed) must name the engine, show the plugin's edits both ways, and no error.
run_plugin() {
  local report=$work/$1.txt
  if "$pwhost" run --plugin "$3" --runtime "$2" --scenario "$docs/examples/http_headers.yaml" \
    --format text > "$report" 2> "$work/$1.err" &&
    grep -q "^runtime $2 " "$report" &&
    grep -qx '  > x-pwhost-plugin: http_headers' "$report" &&
    grep -qx '  < x-powered-by: pwhost' "$report" &&
    ! grep -qE '^ *(start )?error:' "$report"; then
    echo "  $1: the plugin ran"
  else
    echo "  $1: FAILED" >&2
    cat "$work/$1.err" "$report" >&2
    status=1
  fi
}
if ! engines=$("$pwhost" runtimes 2> "$work/runtimes.err"); then
  echo "  pwhost does not start:" >&2
  cat "$work/runtimes.err" >&2
  exit 1
fi
every="wasmtime wasmer-cranelift wasmer-singlepass wasmer-llvm wasmi wamr v8 null"
if [ "$(echo $engines)" != "$every" ]; then
  echo "  the package's pwhost has the engines $(echo $engines), not $every" >&2
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
if (cd "$work" && timeout 120 traffic_server -C \
  "verify_global_plugin $root/usr/lib/trafficserver/modules/pwhost_ats.so") > "$work/verify.log" 2>&1; then
  echo "  Traffic Server loads pwhost_ats.so"
else
  echo "  Traffic Server cannot load pwhost_ats.so:" >&2
  cat "$work/verify.log" >&2
  status=1
fi
exit $status
CHECKS

echo "== the installed copy, build tree hidden"
if unshare --mount --propagation private true 2>/dev/null; then
  # The checkout's path is passed as an argument, never spliced into the command.
  unshare --mount --propagation private bash -c \
    'mount -t tmpfs -o size=1m,mode=0755 pwhost-checkout-hidden "$1" && cd / && exec bash "$2" "$3" "$4"' \
    hide "$checkout" "$work/checks.sh" "$root" "$work" || fail "the installed copy"
else
  # No mount namespace here (an unprivileged container): the checkout stays visible, and what
  # the dynamic loader resolves (checked first) is the evidence that nothing comes from it.
  echo "  (no mount namespace here: the checkout stays visible)"
  (cd / && bash "$work/checks.sh" "$root" "$work") || fail "the installed copy"
fi

if [ "$failed" = 0 ]; then
  echo "install-test: $deb works installed"
else
  echo "install-test: reports are in $work" >&2
fi
exit $failed
