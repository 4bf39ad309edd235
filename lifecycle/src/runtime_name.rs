//! Runtime names: Envoy's (`envoy.wasm.runtime.v8`, ...), Traffic Server's
//! (`ats.wasm.runtime.wamr`, ...) and pwhost's own (`wasmtime`, `wasmer-llvm`, ...), each
//! standing for one of pwhost's engines.

/// The pwhost engine a configured runtime name stands for: Envoy's and Traffic Server's names
/// map to the engine of the same kind (`wavm`, an LLVM ahead-of-time compiler, to wasmer's LLVM
/// compiler); pwhost's names are themselves. `None` for a name pwhost does not know.
pub fn engine_of(runtime: &str) -> Option<&'static str> {
    const ENGINES: [&str; 8] = [
        "wasmtime",
        "wasmer-cranelift",
        "wasmer-singlepass",
        "wasmer-llvm",
        "wasmi",
        "wamr",
        "v8",
        "null",
    ];
    let engine = match runtime {
        "envoy.wasm.runtime.v8" | "ats.wasm.runtime.v8" => "v8",
        "envoy.wasm.runtime.wasmtime" | "ats.wasm.runtime.wasmtime" => "wasmtime",
        "envoy.wasm.runtime.wamr" | "ats.wasm.runtime.wamr" => "wamr",
        "envoy.wasm.runtime.wavm" => "wasmer-llvm",
        "envoy.wasm.runtime.null" => "null",
        own => return ENGINES.iter().find(|e| **e == own).copied(),
    };
    Some(engine)
}

/// Whether `runtime` names the null runtime (native plugins).
pub fn is_null(runtime: &str) -> bool {
    engine_of(runtime) == Some("null")
}

/// The engine to run `runtime` on, among those compiled in (`available`, in preference order):
/// the one it names, or for an empty name the first WebAssembly engine (as Envoy picks the
/// first engine of its build). An unknown name, or one not compiled in, is an error that lists
/// what this build has.
pub fn resolve(runtime: &str, available: &[&'static str]) -> Result<&'static str, String> {
    let listing = || available.join(", ");
    if runtime.is_empty() {
        return available
            .iter()
            .find(|e| **e != "null")
            .copied()
            .ok_or_else(|| {
                format!(
                    "this build has no WebAssembly engine (it has: {})",
                    listing()
                )
            });
    }
    match engine_of(runtime) {
        Some(engine) if available.contains(&engine) => Ok(engine),
        Some(engine) => Err(format!(
            "runtime {runtime:?} ({engine}) is not compiled into this build (it has: {})",
            listing()
        )),
        None => Err(format!(
            "unknown runtime {runtime:?} (this build has: {}; Envoy's envoy.wasm.runtime.* and \
             Traffic Server's ats.wasm.runtime.* names stand for them)",
            listing()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoys_and_traffic_servers_names_stand_for_pwhosts_engines() {
        assert_eq!(engine_of("envoy.wasm.runtime.v8"), Some("v8"));
        assert_eq!(engine_of("ats.wasm.runtime.wamr"), Some("wamr"));
        assert_eq!(engine_of("envoy.wasm.runtime.wavm"), Some("wasmer-llvm"));
        assert_eq!(engine_of("envoy.wasm.runtime.null"), Some("null"));
        assert_eq!(engine_of("wasmi"), Some("wasmi"));
        assert_eq!(engine_of("ats.wasm.runtime.wasmedge"), None);
    }

    #[test]
    fn a_runtime_not_compiled_in_lists_the_ones_that_are() {
        let available = ["wasmtime", "null"];
        assert_eq!(resolve("", &available), Ok("wasmtime"));
        assert_eq!(
            resolve("envoy.wasm.runtime.wasmtime", &available),
            Ok("wasmtime")
        );
        let error = resolve("envoy.wasm.runtime.v8", &available).unwrap_err();
        assert!(
            error.contains("not compiled into this build (it has: wasmtime, null)"),
            "{error}"
        );
        let error = resolve("runtme", &available).unwrap_err();
        assert!(error.contains("unknown runtime \"runtme\""), "{error}");
    }
}
