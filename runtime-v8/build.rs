//! Builds the C++ shim between runtime-v8 and V8 into a static library, linked into every binary
//! that uses this crate, against the system's V8 (Debian's libnode by default).
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
//! Binaries record V8's library by its file name only (`NEEDED libnode.so.108`), never by a path
//! of the build machine, so the dynamic loader looks for it where a packaged program's libraries
//! are: the directories the binary's own run path names relative to itself, then the system's
//! (Debian's `libnode108`). pwhost's executables name `$ORIGIN/../lib/pwhost` (`/usr/lib/pwhost`
//! for `/usr/bin/pwhost`, where the Debian package bundles libnode) and the Traffic Server plugin
//! `$ORIGIN/../../pwhost` (the same directory from `/usr/lib/trafficserver/modules`), both then
//! `$ORIGIN`. A build script cannot give its dependents' binaries a run path (an rpath from
//! `cargo:rustc-link-arg` applies to this package's own targets only), so the build scripts of
//! the crates that make binaries (pwhost, pwhost-ats, pwhost-bench, the fuzz targets) add it.
//!
//! For binaries run from the build tree, the library is linked (as a symbolic link) into the
//! profile's output directories, `target/<profile>/` and its `deps/`: next to `pwhost` and the
//! Traffic Server plugin, found through `$ORIGIN`, and where `cargo run` and `cargo test` point
//! the loader for every binary they start. This writes outside `OUT_DIR`, as few build scripts
//! should, for a build tree that runs without `LD_LIBRARY_PATH`; it assumes Cargo's default
//! layout (`OUT_DIR` three levels below the profile's directory) and, if a link is removed, puts
//! it back only when this script runs again.

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
    // A static library, named in this crate's link metadata: it reaches the link line of every
    // binary depending on the crate, V8's library (and the C++ runtime) after it.
    build.compile(SHIM_NAME);
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static={SHIM_NAME}");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    for name in &libraries {
        // By file name (`-l:libnode.so.108`): Debian installs no unversioned `libnode.so`.
        println!("cargo:rustc-link-lib=dylib:+verbatim={name}");
    }
    println!("cargo:rustc-link-lib=dylib=stdc++");

    link_into_profile_dir(&out_dir, &lib_dir, &libraries);
}

/// Links V8's libraries into the profile's output directory (`OUT_DIR` is
/// `<profile dir>/build/runtime-v8-<hash>/out`) and its `deps/` (where test builds leave
/// libraries such as the Traffic Server plugin), where binaries of the build tree find them (see
/// the module docs). A failure only warns: the build itself does not need the links.
fn link_into_profile_dir(out_dir: &Path, lib_dir: &Path, libraries: &[&str]) {
    let Some(profile_dir) = out_dir.ancestors().nth(3) else {
        return;
    };
    let dirs = [profile_dir.to_path_buf(), profile_dir.join("deps")];
    for (dir, name) in dirs
        .iter()
        .flat_map(|dir| libraries.iter().map(move |name| (dir, name)))
    {
        let link = dir.join(name);
        let target = lib_dir.join(name);
        if std::fs::read_link(&link).is_ok_and(|current| current == target) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
            println!(
                "cargo:warning=cannot link {} to {}: {e}; binaries run from the build tree need \
                 LD_LIBRARY_PATH={}",
                link.display(),
                target.display(),
                lib_dir.display()
            );
        }
    }
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
