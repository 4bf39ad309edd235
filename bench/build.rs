//! Link settings of the benchmark executables: the Proxy-Wasm host functions exported, so that
//! the null runtime can load the native build of `lifecycle_bench`, and V8's library found (see
//! pwhost's build script).

fn main() {
    if std::env::var_os("CARGO_FEATURE_NULL").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=proxy_*");
    }
    // V8's library in the build tree (see pwhost's build script).
    println!("cargo:rustc-link-arg-bins=-Wl,--enable-new-dtags,-rpath,$ORIGIN");
}
