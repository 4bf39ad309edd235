//! Host functions: engine-free descriptions that every engine can register.

use crate::{Caller, Error, ExternKind, Import, Signature, Trap};

/// The implementation of a host function.
///
/// Arguments arrive in 64-bit slots (`i32` arguments zero-extended from their unsigned value); the
/// function writes its result, if its signature has one, into slot 0. Returning `Err` stops the
/// guest with that trap; Proxy-Wasm host functions report ordinary failures as status codes and
/// trap only when the guest must not continue (e.g. `proc_exit`).
pub type HostCallback<S> = fn(&mut dyn Caller<S>, &mut [u64]) -> Result<(), Trap>;

/// A host function as an import module/name, a signature and an implementation.
pub struct HostFunction<S> {
    /// The import module name, e.g. `env` or `wasi_snapshot_preview1`.
    pub module: &'static str,
    /// The import field name, e.g. `proxy_log`.
    pub name: &'static str,
    /// Its WebAssembly signature.
    pub signature: Signature,
    /// Its implementation.
    pub callback: HostCallback<S>,
}

impl<S> Clone for HostFunction<S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for HostFunction<S> {}

impl<S> std::fmt::Debug for HostFunction<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}{}", self.module, self.name, self.signature)
    }
}

/// Matches a module's imports against the host functions, in import order.
///
/// Every engine links through this one function, so every engine rejects the same modules with
/// the same messages: an import the host does not provide, a signature that differs, or a
/// non-function import.
pub fn resolve_imports<'h, S>(
    imports: &[Import],
    host: &'h [HostFunction<S>],
) -> Result<Vec<&'h HostFunction<S>>, Error> {
    imports
        .iter()
        .map(|import| {
            let ExternKind::Function(ty) = &import.kind else {
                return Err(Error::UnsupportedImport {
                    module: import.module.clone(),
                    name: import.name.clone(),
                    kind: import.kind.describe().to_string(),
                });
            };
            let function = host
                .iter()
                .find(|f| f.module == import.module && f.name == import.name)
                .ok_or_else(|| Error::UnknownImport {
                    module: import.module.clone(),
                    name: import.name.clone(),
                })?;
            if !function.signature.matches(ty) {
                return Err(Error::ImportSignatureMismatch {
                    module: import.module.clone(),
                    name: import.name.clone(),
                    expected: function.signature.to_string(),
                    found: ty.to_string(),
                });
            }
            Ok(function)
        })
        .collect()
}
