//! Compiled and linked modules.

use std::sync::Arc;

use runtime_api::{
    resolve_imports, CompiledModule, Error, Export, ExportedFunctions, ExternKind, FunctionType,
    HostFunction, Import, Instance, LinkedModule, ValType, MAX_ARGS,
};

use crate::instance::{StopConfig, WasmerInstance};
use crate::stop::{START_EXPORT, STOP_FLAG_EXPORT};

/// A module compiled by wasmer, with the engine that compiled (or loaded) it.
pub struct WasmerModule {
    engine: wasmer::Engine,
    module: wasmer::Module,
    /// How the module was compiled, recorded in front of its precompiled artifact.
    header: ArtifactHeader,
    imports: Vec<Import>,
    exports: Vec<Export>,
    functions: Arc<ExportedFunctions<ExportedFunction>>,
    stop: StopConfig,
    /// Why every instantiation fails, if the module's memory cannot fit the memory cap.
    refusal: Option<String>,
    /// The memory cap in bytes, if any.
    memory_limit: Option<usize>,
}

/// An exported function the host may call.
pub(crate) struct ExportedFunction {
    pub(crate) ty: FunctionType,
}

/// The callable exports of `module`, resolved once per module.
fn exported_functions(module: &wasmer::Module) -> ExportedFunctions<ExportedFunction> {
    module
        .exports()
        .filter_map(|e| {
            let wasmer::ExternType::Function(wasmer_ty) = e.ty() else {
                return None;
            };
            let ty = function_type(wasmer_ty);
            ty.is_callable()
                .then(|| (e.name().to_string(), ExportedFunction { ty }))
        })
        .collect()
}

impl WasmerModule {
    pub(crate) fn new(
        engine: wasmer::Engine,
        module: wasmer::Module,
        header: ArtifactHeader,
        stop: StopConfig,
        max_memory_bytes: Option<u64>,
    ) -> Self {
        let imports = module
            .imports()
            .map(|i| Import {
                module: i.module().to_string(),
                name: i.name().to_string(),
                kind: extern_kind(i.ty()),
            })
            .collect();
        let exports = module
            .exports()
            .filter(|e| e.name() != STOP_FLAG_EXPORT && e.name() != START_EXPORT)
            .map(|e| Export {
                name: e.name().to_string(),
                kind: extern_kind(e.ty()),
            })
            .collect();
        let functions = Arc::new(exported_functions(&module));
        let refusal = memory_over_cap(&module, max_memory_bytes);
        WasmerModule {
            engine,
            module,
            header,
            imports,
            exports,
            functions,
            stop,
            refusal,
            memory_limit: max_memory_bytes.map(|max| usize::try_from(max).unwrap_or(usize::MAX)),
        }
    }
}

/// The instantiation error of a module whose memory needs more than `max_memory_bytes` from the
/// start, worded as the other engines word it. wasmer's own error (from the capped tunables, which
/// still enforce the cap) would bury the reason under three layers of prefixes.
fn memory_over_cap(module: &wasmer::Module, max_memory_bytes: Option<u64>) -> Option<String> {
    let max = max_memory_bytes?;
    let minimum = module
        .info()
        .memories
        .values()
        .map(|memory| memory.minimum.0)
        .max()?;
    (u64::from(minimum) * wasmer::WASM_PAGE_SIZE as u64 > max)
        .then(|| format!("memory minimum size of {minimum} pages exceeds memory limits"))
}

fn val_type(ty: &wasmer::Type) -> ValType {
    match ty {
        wasmer::Type::I32 => ValType::I32,
        wasmer::Type::I64 => ValType::I64,
        wasmer::Type::F32 => ValType::F32,
        wasmer::Type::F64 => ValType::F64,
        _ => ValType::Other,
    }
}

fn function_type(ty: &wasmer::FunctionType) -> FunctionType {
    FunctionType {
        params: ty.params().iter().map(val_type).collect(),
        results: ty.results().iter().map(val_type).collect(),
    }
}

fn extern_kind(ty: &wasmer::ExternType) -> ExternKind {
    match ty {
        wasmer::ExternType::Function(f) => ExternKind::Function(function_type(f)),
        wasmer::ExternType::Memory(_) => ExternKind::Memory,
        wasmer::ExternType::Table(_) => ExternKind::Table,
        wasmer::ExternType::Global(_) => ExternKind::Global,
        _ => ExternKind::Other,
    }
}

impl<S: Send + 'static> CompiledModule<S> for WasmerModule {
    fn imports(&self) -> &[Import] {
        &self.imports
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn link(&self, host: &[HostFunction<S>]) -> Result<Arc<dyn LinkedModule<S>>, Error> {
        let resolved: Vec<HostFunction<S>> = resolve_imports(&self.imports, host)?
            .into_iter()
            .copied()
            .collect();
        if let Some(function) = resolved
            .iter()
            .find(|f| f.signature.params.len() > MAX_ARGS || f.signature.results.len() > 1)
        {
            return Err(Error::Config(format!(
                "host function {function:?} has too many parameters or results"
            )));
        }
        Ok(Arc::new(WasmerLinkedModule {
            engine: self.engine.clone(),
            module: self.module.clone(),
            host: resolved,
            functions: self.functions.clone(),
            stop: self.stop.clone(),
            refusal: self.refusal.clone(),
            memory_limit: self.memory_limit,
        }))
    }

    fn serialize(&self) -> Result<Vec<u8>, Error> {
        let artifact = self
            .module
            .serialize()
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut bytes = Vec::with_capacity(ArtifactHeader::LEN + artifact.len());
        self.header.write(&mut bytes);
        bytes.extend_from_slice(&artifact);
        Ok(bytes)
    }
}

/// What pwhost records in front of wasmer's own artifact: which compiler produced it and which
/// stop checks its code carries, so that an artifact is never run by a runtime it does not fit
/// (wasmer checks only its own format version and the target).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ArtifactHeader {
    /// The compiler's tag (see `Compiler::artifact_tag`).
    pub(crate) compiler: u8,
    /// The tag of the stop checks compiled in, if any (see [`crate::stop::CheckStyle::tag`]).
    pub(crate) checks: Option<u8>,
}

impl ArtifactHeader {
    const MAGIC: &'static [u8; 14] = b"pwhost-wasmer\x01";
    const LEN: usize = Self::MAGIC.len() + 2;

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(Self::MAGIC);
        out.push(self.compiler);
        out.push(self.checks.unwrap_or(0));
    }

    /// The header and the wasmer artifact behind it.
    pub(crate) fn split(bytes: &[u8]) -> Result<(Self, &[u8]), Error> {
        let not_ours = || Error::InvalidModule("not a pwhost wasmer artifact".to_string());
        let (magic, rest) = bytes
            .split_at_checked(Self::MAGIC.len())
            .ok_or_else(not_ours)?;
        if magic != Self::MAGIC {
            return Err(not_ours());
        }
        let [compiler, checks, artifact @ ..] = rest else {
            return Err(not_ours());
        };
        let header = ArtifactHeader {
            compiler: *compiler,
            checks: (*checks != 0).then_some(*checks),
        };
        Ok((header, artifact))
    }
}

/// A module with its host functions resolved in import order, instantiated once per VM copy.
pub struct WasmerLinkedModule<S: 'static> {
    engine: wasmer::Engine,
    module: wasmer::Module,
    host: Vec<HostFunction<S>>,
    functions: Arc<ExportedFunctions<ExportedFunction>>,
    stop: StopConfig,
    /// Why every instantiation fails (see [`WasmerModule`]).
    refusal: Option<String>,
    memory_limit: Option<usize>,
}

impl<S: Send + 'static> LinkedModule<S> for WasmerLinkedModule<S> {
    fn instantiate(&self, state: S) -> Result<Box<dyn Instance<S>>, Error> {
        if let Some(refusal) = &self.refusal {
            return Err(Error::Instantiation(refusal.clone()));
        }
        Ok(Box::new(WasmerInstance::new(
            &self.engine,
            &self.module,
            &self.host,
            self.functions.clone(),
            &self.stop,
            self.memory_limit,
            state,
        )?))
    }
}
