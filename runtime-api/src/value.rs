//! Value and function types, as far as the engine interface needs them.

use std::fmt;

/// The type of a WebAssembly value.
///
/// Proxy-Wasm only uses `i32` and `i64`; the other variants exist so that a module with unusual
/// imports or exports can be described (and rejected with a clear message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValType {
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// Any other type (vectors, references).
    Other,
}

impl fmt::Display for ValType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValType::I32 => "i32",
            ValType::I64 => "i64",
            ValType::F32 => "f32",
            ValType::F64 => "f64",
            ValType::Other => "other",
        })
    }
}

/// A function signature known at compile time, as host functions declare it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    /// Parameter types, in order.
    pub params: &'static [ValType],
    /// Result types, in order (Proxy-Wasm uses none or one).
    pub results: &'static [ValType],
}

impl Signature {
    /// A signature with the given parameters and results.
    pub const fn new(params: &'static [ValType], results: &'static [ValType]) -> Self {
        Signature { params, results }
    }

    /// Whether a function type read from a module is exactly this signature.
    pub fn matches(&self, ty: &FunctionType) -> bool {
        self.params == ty.params.as_slice() && self.results == ty.results.as_slice()
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_signature(f, self.params, self.results)
    }
}

/// A function type read from a module (an import or an export).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FunctionType {
    /// Parameter types, in order.
    pub params: Vec<ValType>,
    /// Result types, in order.
    pub results: Vec<ValType>,
}

impl FunctionType {
    /// Whether the host can call a guest function of this type through
    /// [`crate::Instance::call`]: at most [`crate::MAX_ARGS`] parameters and one result, all
    /// integers (what the Proxy-Wasm callbacks need).
    pub fn is_callable(&self) -> bool {
        let integer = |t: &ValType| matches!(t, ValType::I32 | ValType::I64);
        self.params.len() <= crate::MAX_ARGS
            && self.results.len() <= 1
            && self.params.iter().chain(&self.results).all(integer)
    }
}

/// Bit `i` set where `types[i]` is `i64`: how engines that pass values as 64-bit slots know which
/// slots to read whole (bits for the first 32 types only, which covers [`crate::MAX_ARGS`]).
pub fn i64_mask(types: &[ValType]) -> u32 {
    types
        .iter()
        .take(32)
        .enumerate()
        .filter(|(_, t)| **t == ValType::I64)
        .fold(0, |mask, (i, _)| mask | (1 << i))
}

impl fmt::Display for FunctionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_signature(f, &self.params, &self.results)
    }
}

fn write_signature(
    f: &mut fmt::Formatter<'_>,
    params: &[ValType],
    results: &[ValType],
) -> fmt::Result {
    f.write_str("(")?;
    for (i, p) in params.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{p}")?;
    }
    f.write_str(") -> (")?;
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{r}")?;
    }
    f.write_str(")")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(params: &[ValType], results: &[ValType]) -> FunctionType {
        FunctionType {
            params: params.to_vec(),
            results: results.to_vec(),
        }
    }

    #[test]
    fn only_integer_functions_of_few_arguments_and_one_result_are_callable() {
        use ValType::{F32, I32, I64};
        assert!(function(&[], &[]).is_callable());
        assert!(function(&[I32, I64], &[I64]).is_callable());
        assert!(function(&[I32; crate::MAX_ARGS], &[I32]).is_callable());
        assert!(!function(&[I32; crate::MAX_ARGS + 1], &[]).is_callable());
        assert!(!function(&[], &[I32, I32]).is_callable());
        assert!(!function(&[F32], &[]).is_callable());
        assert!(!function(&[], &[F32]).is_callable());
    }

    #[test]
    fn the_i64_mask_marks_the_positions_of_i64_values() {
        use ValType::{I32, I64};
        assert_eq!(i64_mask(&[]), 0);
        assert_eq!(i64_mask(&[I32, I64, I32, I64]), 0b1010);
    }
}
