//! Exports the Proxy-Wasm host functions from the benchmark executables, so that the null
//! runtime can load the native build of `lifecycle_bench` (see pwhost's build script).

fn main() {
    if std::env::var_os("CARGO_FEATURE_NULL").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=proxy_*");
    }
}
