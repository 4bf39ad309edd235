//! With `all-engines`, the fuzz targets find V8's library next to themselves, where runtime-v8's
//! build script links it (see pwhost's build script).

fn main() {
    if std::env::var_os("CARGO_FEATURE_ALL_ENGINES").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,--enable-new-dtags,-rpath,$ORIGIN");
    }
}
