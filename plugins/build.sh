#!/usr/bin/env bash
# Builds the pwhost plugin corpus into plugins/dist/ (gitignored):
#   dist/rust/<name>.wasip1.wasm   Rust SDK plugins for wasm32-wasip1
#   dist/rust/<name>.wasm          the same plugins for wasm32-unknown-unknown
#   dist/native/lib<name>.so       the same plugins as native libraries, for the null runtime
#   dist/wat/<name>.wasm           hand-written WAT edge cases (plugins/wat/*.wat)
#   dist/wat/{malformed,not_wasm,empty}.wasm   invalid binaries for loader tests
#   dist/c/abi_0_1_0.wasm          ABI 0.1.0 plugin in C (plugins/c/), clang + wasi-libc
#   dist/assemblyscript/http_headers.wasm   AssemblyScript SDK plugin (ABI 0.2.0), only if npm exists
#
# Usage: bash plugins/build.sh          (from any directory; idempotent, no-op rebuild ~1-2 s)
#
# Needs these Debian/Ubuntu packages (apt-get install):
#   rustc-web cargo-web rust-web-src lld-19 wasi-libc wabt clang-19
# and, for the AssemblyScript plugin, nodejs + npm (any recent Node; skipped with a warning when
# npm is missing).
# i.e. /usr/bin/cargo + /usr/bin/rustc with the std sources (the wasm std is built from source
# with -Zbuild-std; RUSTC_BOOTSTRAP=1 unlocks that on a stable compiler), wasm-ld-19 as linker,
# wasi-libc's libc.a + crt1-command.o for wasm32-wasip1 and the C plugin, clang-19 to compile
# the C plugin (linked with wasm-ld-19 directly, so no compiler-rt package is needed), and
# wat2wasm / wasm-objdump from wabt. The first build also needs crates.io access (or a populated
# ~/.cargo/registry) for proxy-wasm, log, serde(_json), and registry.npmjs.org access (or a
# populated npm cache) for `npm ci` of assemblyscript 0.14.13 + @solo-io/proxy-runtime 0.1.8.
#
# Environment:
#   PWHOST_PLUGIN_TARGET_DIR  cargo target dir (default: plugins/rust/target), e.g. for CI caching
#   PWHOST_CARGO / PWHOST_RUSTC  override /usr/bin/cargo and /usr/bin/rustc
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dist="$here/dist"
target_dir="${PWHOST_PLUGIN_TARGET_DIR:-$here/rust/target}"
cargo="${PWHOST_CARGO:-/usr/bin/cargo}"
rustc="${PWHOST_RUSTC:-/usr/bin/rustc}"
wasi_libc_dir=/usr/lib/wasm32-wasi
linker=wasm-ld-19
clang=clang-19

# Debian's toolchain must win over a rustup one in ~/.cargo/bin (no wasm std there).
export PATH="/usr/bin:$PATH"

die() { echo "build.sh: $*" >&2; exit 1; }
for tool in "$cargo" "$rustc" "$linker" "$clang" wat2wasm wasm-objdump; do
    command -v "$tool" >/dev/null || die "missing '$tool' (apt-get install rustc-web cargo-web rust-web-src lld-19 wasi-libc wabt clang-19)"
done
for file in libc.a crt1-command.o; do
    [[ -f "$wasi_libc_dir/$file" ]] || die "missing $wasi_libc_dir/$file (apt-get install wasi-libc)"
done
[[ -d "$("$rustc" --print sysroot)/lib/rustlib/src/rust/library" ]] \
    || die "missing Rust std sources for -Zbuild-std (apt-get install rust-web-src)"

mkdir -p "$dist/rust" "$dist/wat" "$dist/c" "$dist/assemblyscript"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# copy_if_changed SRC DST: leaves DST (and its mtime) alone when the content is identical.
copy_if_changed() {
    if cmp -s "$1" "$2"; then
        printf '  unchanged  %s\n' "${2#"$here"/}"
    else
        cp "$1" "$2.partial"
        mv -f "$2.partial" "$2"
        printf '  built      %s (%s bytes)\n' "${2#"$here"/}" "$(wc -c <"$2")"
    fi
}

# require_exports WASM NAME...: dies unless WASM exports every NAME.
require_exports() {
    local wasm="$1" exports name
    shift
    exports="$(wasm-objdump -x -j Export "$wasm")"
    for name in "$@"; do
        [[ "$exports" == *"-> \"$name\""* ]] || die "$wasm does not export $name"
    done
}

# ---- Rust SDK plugins ------------------------------------------------------------------------
echo "== Rust plugins (wasm32-wasip1 + wasm32-unknown-unknown) -> dist/rust/"
(
    cd "$here/rust"
    # Flags from the caller's environment (e.g. CI's RUSTFLAGS=-Dwarnings for the host build)
    # would replace the per-target flags below and break the wasm link.
    unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
    RUSTC="$rustc" \
    RUSTC_BOOTSTRAP=1 \
    CARGO_TARGET_WASM32_WASIP1_LINKER="$linker" \
    CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="-L$wasi_libc_dir" \
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$linker" \
        "$cargo" build --release --locked \
        --target wasm32-wasip1 --target wasm32-unknown-unknown \
        -Zbuild-std=std,panic_abort \
        --target-dir "$target_dir"
)

for manifest in "$here"/rust/*/Cargo.toml; do
    name="$(basename "$(dirname "$manifest")")"
    for pair in "wasm32-wasip1:$name.wasip1.wasm" "wasm32-unknown-unknown:$name.wasm"; do
        triple="${pair%%:*}"
        out="$dist/rust/${pair#*:}"
        src="$target_dir/$triple/release/$name.wasm"
        [[ -f "$src" ]] || die "cargo did not produce $src"
        require_exports "$src" proxy_abi_version_0_2_1
        copy_if_changed "$src" "$out"
    done
done

# ---- The same Rust SDK plugins as native shared libraries, for the null runtime -----------------
echo "== Rust plugins (native cdylib for the host) -> dist/native/"
mkdir -p "$dist/native"
(
    cd "$here/rust"
    unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
    RUSTC="$rustc" "$cargo" build --release --locked --target-dir "$target_dir/native"
)
for manifest in "$here"/rust/*/Cargo.toml; do
    name="$(basename "$(dirname "$manifest")")"
    src="$target_dir/native/release/lib$name.so"
    [[ -f "$src" ]] || die "cargo did not produce $src"
    copy_if_changed "$src" "$dist/native/lib$name.so"
done

# ---- WAT edge cases --------------------------------------------------------------------------
echo "== WAT modules -> dist/wat/"
for wat in "$here"/wat/*.wat; do
    out="$dist/wat/$(basename "${wat%.wat}").wasm"
    if [[ "$out" -nt "$wat" ]]; then
        printf '  unchanged  %s\n' "${out#"$here"/}"
        continue
    fi
    wat2wasm "$wat" -o "$out.partial"
    mv -f "$out.partial" "$out"
    printf '  built      %s (%s bytes)\n' "${out#"$here"/}" "$(wc -c <"$out")"
done

# Invalid binaries for loader tests (a correct host rejects each with an error, never crashes):
#   malformed.wasm  valid magic + version, then an unknown section id 0xff
#   not_wasm.wasm   text, bad magic
#   empty.wasm      zero bytes
printf '\0asm\x01\0\0\0\xff' >"$scratch/malformed.wasm"
printf 'this is not a wasm module\n' >"$scratch/not_wasm.wasm"
: >"$scratch/empty.wasm"
for name in malformed not_wasm empty; do
    copy_if_changed "$scratch/$name.wasm" "$dist/wat/$name.wasm"
done

# ---- C plugins (ABI 0.1.0) ---------------------------------------------------------------
# WASI command modules: wasi-libc's crt1-command.o provides `_start`, libc.a `malloc`. Linked
# with wasm-ld directly rather than through the clang driver, which would run binaryen's
# wasm-opt when one happens to be on PATH (making the output machine-dependent).
echo "== C plugins (clang + wasi-libc) -> dist/c/"
for src in "$here"/c/*.c; do
    name="$(basename "${src%.c}")"
    "$clang" --target=wasm32-wasi -Oz -Wall -Wextra -Werror -c "$src" -o "$scratch/$name.o" \
        || die "clang failed for $src"
    "$linker" -m wasm32 -L"$wasi_libc_dir" "$wasi_libc_dir/crt1-command.o" "$scratch/$name.o" \
        -lc --export=malloc --strip-debug -o "$scratch/$name.wasm" \
        || die "$linker failed for $src"
    require_exports "$scratch/$name.wasm" proxy_abi_version_0_1_0 _start malloc memory
    copy_if_changed "$scratch/$name.wasm" "$dist/c/$name.wasm"
done

# ---- AssemblyScript plugin (ABI 0.2.0) -------------------------------------------------------
# `npm ci` only when node_modules is older than the lock file, `asc` only when the sources changed
# since the last asc run (stamp file), so a no-op rebuild does not pay npm's or asc's start-up.
echo "== AssemblyScript plugin -> dist/assemblyscript/"
as_dir="$here/assemblyscript"
as_out="$dist/assemblyscript/http_headers.wasm"
if ! command -v npm >/dev/null; then
    echo "  WARNING: npm not found; skipping ${as_out#"$here"/} (apt-get install nodejs npm)" >&2
else
    if [[ ! "$as_dir/node_modules/.package-lock.json" -nt "$as_dir/package-lock.json" ]]; then
        (cd "$as_dir" && npm ci --no-audit --no-fund --prefer-offline) \
            || die "npm ci failed in $as_dir"
    fi
    as_stamp="$as_dir/node_modules/.pwhost-asc-stamp"   # newer than the inputs = up to date
    if [[ -f "$as_out" && "$as_stamp" -nt "$as_dir/assembly/index.ts" \
          && "$as_stamp" -nt "$as_dir/node_modules/.package-lock.json" ]]; then
        printf '  unchanged  %s\n' "${as_out#"$here"/}"
    else
        (cd "$as_dir" && ./node_modules/.bin/asc assembly/index.ts -b "$scratch/http_headers.wasm" \
            --use abort=abort_proc_exit --optimize) \
            || die "asc failed for $as_dir/assembly/index.ts"
        require_exports "$scratch/http_headers.wasm" proxy_abi_version_0_2_0 malloc memory
        copy_if_changed "$scratch/http_headers.wasm" "$as_out"
        touch "$as_stamp"
    fi
fi

echo "== done: $(find "$dist" -name '*.wasm' | wc -l) modules in ${dist#"$here"/}/"
