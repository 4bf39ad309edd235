//! Link settings of pwhost's executables (the CLI, tests, benches).

fn main() {
    if std::env::var_os("CARGO_FEATURE_NULL").is_some() {
        // Exports the Proxy-Wasm host functions, so that native proxy-wasm SDK libraries loaded
        // by the null runtime bind to them. Keep in sync with `native::LINK_ARG` (a build script
        // cannot depend on the crate).
        println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=proxy_*");
    }
    // Where V8's library is looked for before the system's, relative to the binary: the bundled
    // copy of an installation (`PREFIX/bin/pwhost`, `PREFIX/lib/pwhost/`), then the build tree's
    // (see runtime-v8's build script). Never a path of the build machine. A binary without V8
    // looks nothing up there.
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib/pwhost:$ORIGIN"
    );
}
