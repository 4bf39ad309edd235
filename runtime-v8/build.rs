//! Builds the C++ shim between runtime-v8 and V8 as a shared library linked against the system's
//! V8 (Debian's libnode by default).
//!
//! * `PWHOST_V8_DIR`: a prefix with V8's headers in `include/node` or `include`, and its library
//!   in `lib/<multiarch>`, `lib64` or `lib`. Default: `../.deps/libnode/usr` (filled by
//!   `scripts/fetch-libnode.sh`).
//! * `PWHOST_V8_LIB`: the library's file name, or several separated by commas (a V8 component
//!   build: `libv8.so,libv8_libplatform.so,libv8_libbase.so`). Default: `libnode.so.108`.
//!
//! With libnode's headers (`node.h` present) the shim uses Node's platform; without, V8's
//! libplatform.
//!
//! Why a shared shim: an rpath given with `cargo:rustc-link-arg` applies only to this package's
//! own binaries and tests, never to the binaries of crates depending on it (pwhost, benches), and
//! nothing else a build script emits reaches their link lines except `rustc-link-lib` and
//! `rustc-link-search`. So the shim is linked here, where the link line is ours, with an rpath to
//! V8's directory and with its own absolute path as its soname. Every binary linking this crate
//! then records that absolute path as a dependency, and the dynamic loader finds the shim, and
//! through its rpath V8, without `LD_LIBRARY_PATH` and without any cooperation from the crates
//! that depend on this one.

use std::env;
use std::path::{Path, PathBuf};

const SHIM_NAME: &str = "pwhost_v8_shim";

fn main() {
    println!("cargo:rerun-if-env-changed=PWHOST_V8_DIR");
    println!("cargo:rerun-if-env-changed=PWHOST_V8_LIB");
    println!("cargo:rerun-if-changed=shim/pwhost_v8.cc");
    println!("cargo:rerun-if-changed=shim/pwhost_v8.h");

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let prefix = match env::var_os("PWHOST_V8_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => manifest_dir.join("../.deps/libnode/usr"),
    };
    let libraries = env::var("PWHOST_V8_LIB").unwrap_or_else(|_| "libnode.so.108".to_string());
    let libraries: Vec<&str> = libraries
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let Some(library) = libraries.first() else {
        fail("PWHOST_V8_LIB names no library");
    };

    let Some(include_dir) = ["include/node", "include"]
        .iter()
        .map(|dir| prefix.join(dir))
        .find(|dir| dir.join("v8.h").is_file())
    else {
        fail(&format!(
            "V8 headers not found: no v8.h in {}/include/node or {}/include.\n\
             Run `bash scripts/fetch-libnode.sh` (Debian's libnode, into .deps/libnode), or set \
             PWHOST_V8_DIR to a prefix containing include/ and lib/ of your own V8 build.",
            prefix.display(),
            prefix.display()
        ));
    };
    let multiarch = multiarch_dir();
    let Some(lib_dir) = [format!("lib/{multiarch}"), "lib64".into(), "lib".into()]
        .iter()
        .map(|dir| prefix.join(dir))
        .find(|dir| dir.join(library).exists())
    else {
        fail(&format!(
            "V8 library {library} not found in {prefix}/lib/{multiarch}, {prefix}/lib64 or \
             {prefix}/lib.\n\
             Run `bash scripts/fetch-libnode.sh`, or set PWHOST_V8_DIR (a prefix containing \
             include/ and lib/) and PWHOST_V8_LIB (the library's file name) for your own V8 build.",
            prefix = prefix.display()
        ));
    };
    let include_dir = absolute(&include_dir);
    let lib_dir = absolute(&lib_dir);
    // Node's platform (node.h) when building against libnode; V8's own libplatform otherwise.
    let node_platform = include_dir.join("node.h").is_file();

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .pic(true)
        .file("shim/pwhost_v8.cc")
        .include(&include_dir)
        .define(
            "PWHOST_V8_NODE_PLATFORM",
            if node_platform { "1" } else { "0" },
        )
        // V8's headers are not warning-clean under -Wextra; the shim's own code is kept clean
        // under -Wall.
        .flag_if_supported("-Wno-unused-parameter")
        .cargo_metadata(false);
    let objects = build.compile_intermediates();

    let shim = out_dir.join(format!("lib{SHIM_NAME}.so"));
    let compiler = build.get_compiler();
    let mut link = compiler.to_command();
    link.arg("-shared")
        .arg("-o")
        .arg(&shim)
        .args(&objects)
        .arg(format!("-L{}", lib_dir.display()))
        .args(libraries.iter().map(|name| format!("-l:{name}")))
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        // Dependents record this absolute path, so the loader needs no search path for the shim.
        .arg(format!("-Wl,-soname,{}", shim.display()))
        // Every V8 symbol the shim uses must exist in the library now, not fail at load time.
        .arg("-Wl,--no-undefined");
    let status = link
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run the C++ linker ({link:?}): {e}")));
    if !status.success() {
        fail(&format!("linking the V8 shim failed: {link:?}"));
    }

    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=dylib={SHIM_NAME}");
}

/// Debian's multiarch directory name for the target, e.g. `x86_64-linux-gnu`.
fn multiarch_dir() -> String {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env_name = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let arch = match arch.as_str() {
        "x86" => "i386",
        "arm" => "arm",
        other => other,
    };
    format!("{arch}-{os}-{env_name}")
}

fn absolute(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    println!(
        "cargo:warning={}",
        message.lines().next().unwrap_or(message)
    );
    std::process::exit(1);
}
