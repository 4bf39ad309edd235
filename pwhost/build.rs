//! Exports the Proxy-Wasm host functions from pwhost's executables (the CLI, tests, benches), so
//! that native proxy-wasm SDK libraries loaded by the null runtime bind to them.

fn main() {
    if std::env::var_os("CARGO_FEATURE_NULL").is_some() {
        // Keep in sync with `native::LINK_ARG` (a build script cannot depend on the crate).
        println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=proxy_*");
    }
}
