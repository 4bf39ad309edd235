//! The campaign binary (built with V8 by `all-engines`) finds V8's library next to itself,
//! where runtime-v8's build script links it (see pwhost's build script).

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--enable-new-dtags,-rpath,$ORIGIN");
}
