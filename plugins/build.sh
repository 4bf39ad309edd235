#!/usr/bin/env bash
# Builds the pwhost plugin corpus into plugins/dist/ (gitignored):
#   dist/rust/<name>.wasip1.wasm   Rust SDK plugins for wasm32-wasip1
#   dist/rust/<name>.wasm          the same plugins for wasm32-unknown-unknown
#   dist/wat/<name>.wasm           hand-written WAT edge cases (plugins/wat/*.wat)
#   dist/wat/{malformed,not_wasm,empty}.wasm   invalid binaries for loader tests
#
# Usage: bash plugins/build.sh          (from any directory; idempotent, no-op rebuild ~1-2 s)
#
# Needs these Debian/Ubuntu packages (apt-get install):
#   rustc-web cargo-web rust-web-src lld-19 wasi-libc wabt
# i.e. /usr/bin/cargo + /usr/bin/rustc with the std sources (the wasm std is built from source
# with -Zbuild-std; RUSTC_BOOTSTRAP=1 unlocks that on a stable compiler), wasm-ld-19 as linker,
# wasi-libc's libc.a for wasm32-wasip1, and wat2wasm / wasm-objdump from wabt. The first build
# also needs crates.io access (or a populated ~/.cargo/registry) for proxy-wasm, log, serde(_json).
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

# Debian's toolchain must win over a rustup one in ~/.cargo/bin (no wasm std there).
export PATH="/usr/bin:$PATH"

die() { echo "build.sh: $*" >&2; exit 1; }
for tool in "$cargo" "$rustc" "$linker" wat2wasm wasm-objdump; do
    command -v "$tool" >/dev/null || die "missing '$tool' (apt-get install rustc-web cargo-web rust-web-src lld-19 wasi-libc wabt)"
done
[[ -f "$wasi_libc_dir/libc.a" ]] || die "missing $wasi_libc_dir/libc.a (apt-get install wasi-libc)"
[[ -d "$("$rustc" --print sysroot)/lib/rustlib/src/rust/library" ]] \
    || die "missing Rust std sources for -Zbuild-std (apt-get install rust-web-src)"

mkdir -p "$dist/rust" "$dist/wat"

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
        exports="$(wasm-objdump -x -j Export "$src")"
        [[ "$exports" == *'"proxy_abi_version_0_2_1"'* ]] \
            || die "$src does not export proxy_abi_version_0_2_1"
        copy_if_changed "$src" "$out"
    done
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
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
printf '\0asm\x01\0\0\0\xff' >"$scratch/malformed.wasm"
printf 'this is not a wasm module\n' >"$scratch/not_wasm.wasm"
: >"$scratch/empty.wasm"
for name in malformed not_wasm empty; do
    copy_if_changed "$scratch/$name.wasm" "$dist/wat/$name.wasm"
done

echo "== done: $(find "$dist" -name '*.wasm' | wc -l) modules in ${dist#"$here"/}/"
