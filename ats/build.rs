//! Generates the Traffic Server API bindings from the installed `ts/ts.h` (Debian's
//! `trafficserver-dev`), so that they always match the Traffic Server the plugin is built for,
//! and gives the plugin its run path.

use std::path::PathBuf;

fn main() {
    // Where V8's library is looked for before the system's, relative to the plugin: the bundled
    // copy of an installation (modules in `/usr/lib/trafficserver/modules`, the copy in
    // `/usr/lib/pwhost`), then the build tree's (see runtime-v8's build script).
    println!(
        "cargo:rustc-link-arg-cdylib=-Wl,--enable-new-dtags,-rpath,$ORIGIN/../../pwhost:$ORIGIN"
    );
    let include = std::env::var_os("TS_INCLUDE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    println!("cargo:rerun-if-env-changed=TS_INCLUDE_DIR");
    let header = include.join("ts/ts.h");
    println!("cargo:rerun-if-changed={}", header.display());
    if !header.exists() {
        panic!(
            "{} not found: install Traffic Server's headers (apt-get install trafficserver-dev, \
             as scripts/setup.sh does) or point TS_INCLUDE_DIR at the directory holding ts/ts.h",
            header.display()
        );
    }
    let bindings = bindgen::Builder::default()
        .header_contents(
            "pwhost_ats.h",
            "#include <ts/ts.h>\n#include <ts/remap.h>\n",
        )
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("_?TS.*")
        .allowlist_type("TS.*")
        .allowlist_var("TS.*")
        // Defined by this plugin, not called.
        .blocklist_function("TSPluginInit")
        .blocklist_function("TSRemap.*")
        // Events and hook ids arrive from Traffic Server as plain integers: constants, never
        // Rust enums (an unknown value in a Rust enum would be undefined behaviour).
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| panic!("cannot generate bindings for {}: {e}", header.display()));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("ts.rs"))
        .expect("cannot write the Traffic Server bindings");
}
