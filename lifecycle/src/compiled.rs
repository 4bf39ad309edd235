//! Machine code that need not be compiled again: precompiled sections carried in a module
//! (`vm_config.allow_precompiled`) and the compilation cache on disk.
//!
//! A precompiled section is a custom section named after the engine build that made it
//! ([`ArtifactIdentity::section_name`], e.g. `precompiled_wasmtime_48.0.8`); every other host
//! ignores it and compiles the bytecode, so the module stays portable. Its payload starts with
//! [`SECTION_MAGIC`] and the engine configuration it was made under, then the engine's artifact.
//! It is native code the host runs unchecked, so it is used only when the plugin's configuration
//! says `allow_precompiled: true` (trusting whoever produced the module), and only when made by
//! this engine build under this configuration; otherwise the bytecode is compiled.
//!
//! The compilation cache keeps artifacts this host compiled itself, keyed by engine, version,
//! configuration and the code's sha256, each file written whole (a temporary file renamed into
//! place, so concurrent writers and crashes never leave a torn entry) and checked against the
//! checksum in its header before it is loaded.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runtime_api::{ArtifactIdentity, CompiledModule, WasmRuntime};
use sha2::{Digest, Sha256};

use crate::code::sha256_hex;

/// The first bytes of a precompiled section's payload.
pub const SECTION_MAGIC: &[u8] = b"pwhost precompiled 1\n";

/// The first bytes of a compilation cache file; a SHA-256 of the artifact follows.
const CACHE_MAGIC: &[u8] = b"pwhost compiled 1\n";

/// Where a plugin's machine code came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompiledFrom {
    /// The module's bytecode was compiled.
    Bytecode,
    /// The module's precompiled section for this engine build was loaded.
    PrecompiledSection,
    /// The compilation cache had it.
    CompilationCache,
    /// Native code: a compiled-in plugin or a plugin library (the null runtime).
    Native,
}

impl CompiledFrom {
    /// A word for reports: `bytecode`, `precompiled_section`, `compilation_cache`, `native`.
    pub fn as_str(self) -> &'static str {
        match self {
            CompiledFrom::Bytecode => "bytecode",
            CompiledFrom::PrecompiledSection => "precompiled_section",
            CompiledFrom::CompilationCache => "compilation_cache",
            CompiledFrom::Native => "native",
        }
    }
}

/// The largest cache entry read back: far more than any engine makes of the largest module
/// taken (128 MiB of bytecode).
const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// A directory of artifacts this host compiled, for engines that can load them back.
///
/// The directory must be writable only by the user the host runs as: its files are loaded as
/// machine code (after their checksum is checked, which guards against torn or damaged files,
/// not against someone who can write there).
#[derive(Clone, Debug)]
pub struct CompilationCache {
    directory: PathBuf,
}

impl CompilationCache {
    /// A cache in `directory` (made when the first entry is written).
    pub fn new(directory: impl Into<PathBuf>) -> CompilationCache {
        CompilationCache {
            directory: directory.into(),
        }
    }

    /// The cache's directory.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The file of the artifact for `code_sha256` made by `identity`.
    pub fn entry_path(&self, identity: &ArtifactIdentity, code_sha256: &str) -> PathBuf {
        let mut key = Sha256::new();
        for part in [
            identity.engine,
            identity.version,
            &identity.configuration,
            code_sha256,
        ] {
            // Lengths first, so that no two different inputs run together into the same bytes.
            key.update((part.len() as u64).to_le_bytes());
            key.update(part.as_bytes());
        }
        self.directory.join(format!(
            "{}-{}",
            identity.engine,
            sha256_hex(&key.finalize())
        ))
    }

    /// Makes the directory if missing (readable and writable by this user only), and checks
    /// that no one else can write there, so that what is read from it is this host's own.
    fn open(&self) -> Result<(), String> {
        private_directory(&self.directory)
    }

    /// The artifact in `path`, if the file is there whole and undamaged, this user's own, and
    /// not over [`MAX_ARTIFACT_BYTES`] (a damaged or planted huge file is not read whole).
    fn read(path: &Path) -> Option<Vec<u8>> {
        let file = read_private(path, MAX_ARTIFACT_BYTES)?;
        let rest = file.strip_prefix(CACHE_MAGIC)?;
        let (checksum, artifact) = rest.split_at_checked(32)?;
        (Sha256::digest(artifact).as_slice() == checksum).then(|| artifact.to_vec())
    }

    /// Writes `artifact` to `path` whole or not at all.
    fn write(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        sweep(&self.directory);
        let mut file = tempfile::NamedTempFile::new_in(&self.directory)?;
        file.write_all(CACHE_MAGIC)?;
        file.write_all(&Sha256::digest(artifact))?;
        file.write_all(artifact)?;
        file.as_file().sync_all()?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// A module compiled (or loaded) by [`compile`].
pub struct Compiled<S> {
    /// The module.
    pub module: Arc<dyn CompiledModule<S>>,
    /// Where its machine code came from.
    pub from: CompiledFrom,
    /// What did not go as it could have (a precompiled section that does not fit, a cache
    /// entry that could not be read or written), for the embedder's log. None of it is an
    /// error: the bytecode is always there.
    pub warnings: Vec<String>,
}

/// Makes `directory` if missing (readable and writable by this user only), and checks that no
/// one else can write there, so that what is read from it is this host's own.
pub(crate) fn private_directory(directory: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(directory)
        .map_err(|e| format!("cannot make it: {e}"))?;
    private(directory)
}

/// The bytes of `path` if it is a regular file of this user's that no one else may write, of
/// at most `limit` bytes; `None` otherwise. Opened without following a symbolic link and
/// without waiting (a FIFO in its place would block the read for ever), then checked on the
/// open file, so that nothing can be swapped in between. A file read is marked used (its
/// modification time set to now), so that [`sweep`] keeps it.
pub(crate) fn read_private(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let (bytes, file) =
        crate::files::read_checked(path, limit, crate::files::Links::Refuse, |metadata| {
            owned_privately(metadata, path).map_err(std::io::Error::other)
        })
        .ok()?;
    // Marked used on the file read, not opened again by name.
    let _ = file.set_modified(std::time::SystemTime::now());
    Some(bytes)
}

/// How long a cache entry no one read stays (its modification time is when it was last written
/// or read): a cache keeping every version of every module, compiled for every engine, would
/// grow for as long as new versions come.
pub const UNUSED_ENTRY_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// How old a temporary file of a cache must be to count as left behind by a crash.
const LEFT_BEHIND_AGE: Duration = Duration::from_secs(3600);

/// Marks the cache entry `path` as just used (its modification time), for [`sweep`]; best
/// effort.
pub(crate) fn mark_used(path: &Path) {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NONBLOCK | libc::O_NOFOLLOW,
    );
    if let Ok(file) = options.open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Removes from a cache `directory` the temporary files a crash left behind (an hour old or
/// more) and the entries no one used for [`UNUSED_ENTRY_AGE`]; run before each write. Only
/// files named as the caches name theirs are touched: a directory given by mistake (a whole
/// `~/.cache`) loses nothing else.
pub(crate) fn sweep(directory: &Path) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        // Regular files only (never a directory, or what a link names).
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        let Some(age) = metadata.modified().ok().and_then(|m| m.elapsed().ok()) else {
            continue;
        };
        let oldest = match cache_file(&entry.file_name().to_string_lossy()) {
            Some(CacheFile::Temporary) => LEFT_BEHIND_AGE,
            Some(CacheFile::Entry) => UNUSED_ENTRY_AGE,
            None => continue,
        };
        if age >= oldest {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// What a file of a cache directory is, by its name.
#[derive(Debug, PartialEq)]
enum CacheFile {
    /// A file being written (`tempfile`'s `.tmpXXXXXX`), or left by a crash.
    Temporary,
    /// A compiled artifact (`ENGINE-SHA256`) or remote code (`SHA256.wasm`).
    Entry,
}

/// The kind of cache file `name` is, if it is one.
fn cache_file(name: &str) -> Option<CacheFile> {
    if let Some(random) = name.strip_prefix(".tmp") {
        return random
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
            .then_some(CacheFile::Temporary);
    }
    let stem = name.strip_suffix(".wasm").unwrap_or(name);
    let digest_at = stem.len().checked_sub(64)?;
    let (engine, digest) = stem.split_at_checked(digest_at)?;
    let hex = digest
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let engine_named = match (engine.strip_suffix('-'), name.ends_with(".wasm")) {
        // Remote code: the digest alone.
        (None, true) => engine.is_empty(),
        (Some(engine), false) => {
            !engine.is_empty()
                && engine
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }
        _ => false,
    };
    (hex && engine_named).then_some(CacheFile::Entry)
}

/// Whether `path` is this user's and writable by no one else (on Unix; elsewhere not checked).
fn private(path: &Path) -> Result<(), String> {
    let metadata = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    owned_privately(&metadata, path)
}

/// Whether `metadata` (of `path`) is this user's and writable by no one else.
fn owned_privately(metadata: &std::fs::Metadata, path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: `geteuid` has no preconditions and cannot fail.
        let user = unsafe { libc::geteuid() };
        if metadata.uid() != user {
            return Err(format!(
                "{} belongs to another user (uid {})",
                path.display(),
                metadata.uid()
            ));
        }
        if metadata.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is writable by other users (mode {:o})",
                path.display(),
                metadata.mode() & 0o777
            ));
        }
    }
    let _ = (metadata, path);
    Ok(())
}

/// Compiles `wasm` on `runtime`: from its precompiled section when `allow_precompiled` and one
/// fits this engine build, else from `cache` when it has the artifact, else from the bytecode
/// (keeping the result in `cache`). A precompiled section or cache entry that does not load is
/// skipped with a warning, never an error.
pub fn compile<S: Send + 'static>(
    runtime: &dyn WasmRuntime<S>,
    wasm: &[u8],
    allow_precompiled: bool,
    cache: Option<&CompilationCache>,
) -> Result<Compiled<S>, runtime_api::Error> {
    let mut warnings = Vec::new();
    let done = |module, from, warnings| Compiled {
        module,
        from,
        warnings,
    };
    let Some(identity) = runtime.artifact_identity() else {
        return Ok(done(
            runtime.compile(wasm)?,
            CompiledFrom::Bytecode,
            warnings,
        ));
    };
    if allow_precompiled {
        match precompiled_artifact(wasm, &identity) {
            Ok(Some(artifact)) => {
                // SAFETY: `allow_precompiled: true` is the configuration's statement that the
                // module's producer is trusted with native code, as Envoy's is (the section's
                // name and configuration line only select it; the engine checks its own header
                // again before loading anything).
                match unsafe { runtime.load_precompiled(artifact) } {
                    Ok(module) => {
                        return Ok(done(module, CompiledFrom::PrecompiledSection, warnings))
                    }
                    Err(error) => warnings.push(format!(
                        "section {} does not load ({error}); compiled the bytecode",
                        identity.section_name()
                    )),
                }
            }
            Ok(None) => {}
            Err(reason) => warnings.push(format!("{reason}; compiled the bytecode")),
        }
    }
    let Some(cache) = cache else {
        return Ok(done(
            runtime.compile(wasm)?,
            CompiledFrom::Bytecode,
            warnings,
        ));
    };
    if let Err(reason) = cache.open() {
        warnings.push(format!(
            "compilation cache {} not used: {reason}",
            cache.directory.display()
        ));
        return Ok(done(
            runtime.compile(wasm)?,
            CompiledFrom::Bytecode,
            warnings,
        ));
    }
    let path = cache.entry_path(&identity, &sha256_hex(wasm));
    if let Some(artifact) = CompilationCache::read(&path) {
        // SAFETY: the file is this host's own output of `serialize` for this engine build and
        // configuration (its name is derived from them): the directory and the file belong to
        // this user and no one else can write them (checked by `open` and `read`), and it is
        // whole and undamaged (its checksum matches).
        match unsafe { runtime.load_precompiled(&artifact) } {
            Ok(module) => return Ok(done(module, CompiledFrom::CompilationCache, warnings)),
            Err(error) => warnings.push(format!(
                "cached code {} does not load ({error}); compiled again",
                path.display()
            )),
        }
    }
    let module = runtime.compile(wasm)?;
    // A cache that cannot be written costs the next start a compilation, nothing more.
    match module.serialize() {
        Ok(artifact) => {
            if let Err(error) = cache.write(&path, &artifact) {
                warnings.push(format!(
                    "cannot write {} to the compilation cache: {error}",
                    path.display()
                ));
            }
        }
        Err(error) => warnings.push(format!("cannot serialize compiled code: {error}")),
    }
    Ok(done(module, CompiledFrom::Bytecode, warnings))
}

/// The artifact in `wasm`'s precompiled section for `identity`: `None` if there is no such
/// section; an error if there is one, but made under another configuration or damaged.
pub fn precompiled_artifact<'a>(
    wasm: &'a [u8],
    identity: &ArtifactIdentity,
) -> Result<Option<&'a [u8]>, String> {
    let name = identity.section_name();
    let Some(payload) = custom_section(wasm, &name)? else {
        return Ok(None);
    };
    let body = payload
        .strip_prefix(SECTION_MAGIC)
        .ok_or_else(|| format!("section {name} is not a pwhost precompiled section"))?;
    let line_end = body
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| format!("section {name} is damaged"))?;
    let configuration = &body[..line_end];
    if configuration != identity.configuration.as_bytes() {
        // The line is the module's text: shown short and escaped.
        let shown: String = String::from_utf8_lossy(configuration)
            .chars()
            .take(64)
            .collect();
        return Err(format!(
            "section {name} was made under engine configuration {shown:?}, this host runs {:?}",
            identity.configuration
        ));
    }
    Ok(Some(&body[line_end + 1..]))
}

/// The payload of `wasm`'s first custom section called `name`.
pub fn custom_section<'a>(wasm: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| format!("not a WebAssembly module: {e}"))? {
            wasmparser::Payload::CustomSection(section) if section.name() == name => {
                return Ok(Some(section.data()));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Compiles `wasm` on `runtime` and returns the module with that engine build's precompiled
/// section added (replacing one of the same name); other hosts ignore the section.
pub fn precompile<S: Send + 'static>(
    runtime: &dyn WasmRuntime<S>,
    wasm: &[u8],
) -> Result<Vec<u8>, String> {
    let identity = runtime
        .artifact_identity()
        .ok_or_else(|| format!("the {} runtime cannot precompile modules", runtime.name()))?;
    let module = runtime.compile(wasm).map_err(|e| e.to_string())?;
    let artifact = module.serialize().map_err(|e| e.to_string())?;
    let mut payload = Vec::with_capacity(SECTION_MAGIC.len() + 64 + artifact.len());
    payload.extend_from_slice(SECTION_MAGIC);
    payload.extend_from_slice(identity.configuration.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(&artifact);
    with_custom_section(wasm, &identity.section_name(), &payload)
}

/// `wasm` with the custom section `name` holding `payload` at its end, and no other section of
/// that name.
pub fn with_custom_section(wasm: &[u8], name: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut module = wasm_encoder::Module::new();
    for item in wasmparser::Parser::new(0).parse_all(wasm) {
        let item = item.map_err(|e| format!("not a WebAssembly module: {e}"))?;
        match &item {
            wasmparser::Payload::Version { encoding, .. } => {
                if *encoding != wasmparser::Encoding::Module {
                    return Err("a component, not a core WebAssembly module".to_string());
                }
            }
            wasmparser::Payload::CustomSection(section) if section.name() == name => {}
            _ => {
                if let Some((id, range)) = item.as_section() {
                    module.section(&wasm_encoder::RawSection {
                        id,
                        data: &wasm[range.start as usize..range.end as usize],
                    });
                }
            }
        }
    }
    module.section(&wasm_encoder::CustomSection {
        name: name.into(),
        data: payload.into(),
    });
    Ok(module.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime_api::RuntimeConfig;
    use runtime_wasmtime::WasmtimeRuntime;

    /// A module that returns `value` from `answer`.
    fn module(value: i32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module (func (export "answer") (result i32) i32.const {value}) (@custom "note" "kept"))"#
        ))
        .unwrap()
    }

    fn wasmtime(config: RuntimeConfig) -> WasmtimeRuntime {
        WasmtimeRuntime::new(config).unwrap()
    }

    /// What `answer` returns in `module`.
    fn answer(module: &Arc<dyn CompiledModule<()>>) -> u64 {
        let linked = module.link(&[]).unwrap();
        let mut instance = linked.instantiate(()).unwrap();
        let function = instance.function("answer").unwrap();
        let mut results = [0];
        instance.call(function, &[], &mut results).unwrap();
        results[0]
    }

    /// Module `bytecode` carrying the precompiled section of module `artifact_of`: which of the
    /// two runs shows which was loaded.
    fn trojan(runtime: &WasmtimeRuntime, bytecode: &[u8], artifact_of: &[u8]) -> Vec<u8> {
        let precompiled = precompile::<()>(runtime, artifact_of).unwrap();
        let identity = WasmRuntime::<()>::artifact_identity(runtime).unwrap();
        let payload = custom_section(&precompiled, &identity.section_name())
            .unwrap()
            .unwrap()
            .to_vec();
        with_custom_section(bytecode, &identity.section_name(), &payload).unwrap()
    }

    #[test]
    fn precompile_adds_a_section_named_after_the_engine_build_and_keeps_the_module_valid() {
        let runtime = wasmtime(RuntimeConfig::default());
        let wasm = module(7);
        let precompiled = precompile::<()>(&runtime, &wasm).unwrap();
        wasmparser::Validator::new()
            .validate_all(&precompiled)
            .unwrap();
        let name = format!(
            "precompiled_wasmtime_{}",
            runtime_wasmtime::WASMTIME_VERSION
        );
        assert!(custom_section(&precompiled, &name).unwrap().is_some());
        assert_eq!(
            custom_section(&precompiled, "note").unwrap(),
            Some(&b"kept"[..])
        );
        // Again: the section is replaced, not added twice.
        let twice = precompile::<()>(&runtime, &precompiled).unwrap();
        let sections = wasmparser::Parser::new(0)
            .parse_all(&twice)
            .filter(|p| matches!(p, Ok(wasmparser::Payload::CustomSection(s)) if s.name() == name))
            .count();
        assert_eq!(sections, 1);
    }

    #[test]
    fn the_section_is_loaded_only_when_allowed() {
        let runtime = wasmtime(RuntimeConfig::default());
        let wasm = trojan(&runtime, &module(1), &module(2));
        let Compiled {
            module: allowed,
            from,
            ..
        } = compile::<()>(&runtime, &wasm, true, None).unwrap();
        assert_eq!(
            (answer(&allowed), from),
            (2, CompiledFrom::PrecompiledSection)
        );
        let Compiled {
            module: refused,
            from,
            ..
        } = compile::<()>(&runtime, &wasm, false, None).unwrap();
        assert_eq!((answer(&refused), from), (1, CompiledFrom::Bytecode));
    }

    #[test]
    fn a_section_made_under_another_configuration_is_skipped_for_the_bytecode() {
        // Made without deadline checks; this host runs with deadlines.
        let plain = wasmtime(RuntimeConfig::default());
        let wasm = trojan(&plain, &module(1), &module(2));
        let with_deadlines = wasmtime(RuntimeConfig {
            call_deadline: Some(std::time::Duration::from_secs(1)),
            ..RuntimeConfig::default()
        });
        let identity = WasmRuntime::<()>::artifact_identity(&with_deadlines).unwrap();
        let error = precompiled_artifact(&wasm, &identity).unwrap_err();
        assert!(error.contains("engine configuration"), "{error}");
        let Compiled {
            module,
            from,
            warnings,
        } = compile::<()>(&with_deadlines, &wasm, true, None).unwrap();
        assert_eq!((answer(&module), from), (1, CompiledFrom::Bytecode));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("compiled the bytecode"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_damaged_section_is_skipped_for_the_bytecode() {
        let runtime = wasmtime(RuntimeConfig::default());
        let identity = WasmRuntime::<()>::artifact_identity(&runtime).unwrap();
        let mut payload = SECTION_MAGIC.to_vec();
        payload.extend_from_slice(identity.configuration.as_bytes());
        payload.extend_from_slice(b"\nnot machine code");
        let wasm = with_custom_section(&module(1), &identity.section_name(), &payload).unwrap();
        let Compiled {
            module,
            from,
            warnings,
        } = compile::<()>(&runtime, &wasm, true, None).unwrap();
        assert_eq!((answer(&module), from), (1, CompiledFrom::Bytecode));
        assert!(warnings[0].contains("does not load"), "{warnings:?}");
    }

    #[test]
    fn a_second_compilation_comes_from_the_cache() {
        let directory = tempfile::tempdir().unwrap();
        let cache = CompilationCache::new(directory.path().join("compiled"));
        let runtime = wasmtime(RuntimeConfig::default());
        let Compiled {
            module: first,
            from,
            ..
        } = compile::<()>(&runtime, &module(5), false, Some(&cache)).unwrap();
        assert_eq!((answer(&first), from), (5, CompiledFrom::Bytecode));
        let Compiled {
            module: second,
            from,
            ..
        } = compile::<()>(&runtime, &module(5), false, Some(&cache)).unwrap();
        assert_eq!((answer(&second), from), (5, CompiledFrom::CompilationCache));
        // Other code, another entry.
        let Compiled {
            module: other,
            from,
            ..
        } = compile::<()>(&runtime, &module(6), false, Some(&cache)).unwrap();
        assert_eq!((answer(&other), from), (6, CompiledFrom::Bytecode));
        // Another configuration, another entry.
        let with_deadlines = wasmtime(RuntimeConfig {
            call_deadline: Some(std::time::Duration::from_secs(1)),
            ..RuntimeConfig::default()
        });
        let Compiled { from, .. } =
            compile::<()>(&with_deadlines, &module(5), false, Some(&cache)).unwrap();
        assert_eq!(from, CompiledFrom::Bytecode);
        let entries = std::fs::read_dir(cache.directory()).unwrap().count();
        assert_eq!(entries, 3, "one file per entry, no temporary files left");
    }

    #[test]
    fn a_torn_or_damaged_cache_entry_is_compiled_again_and_replaced() {
        let directory = tempfile::tempdir().unwrap();
        let cache = CompilationCache::new(directory.path());
        let runtime = wasmtime(RuntimeConfig::default());
        compile::<()>(&runtime, &module(5), false, Some(&cache)).unwrap();
        let identity = WasmRuntime::<()>::artifact_identity(&runtime).unwrap();
        let path = cache.entry_path(&identity, &sha256_hex(&module(5)));
        let whole = std::fs::read(&path).unwrap();
        // Torn: cut short.
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        let Compiled {
            module: module_again,
            from,
            warnings,
        } = compile::<()>(&runtime, &module(5), false, Some(&cache)).unwrap();
        assert!(warnings.is_empty(), "a torn entry is a miss: {warnings:?}");
        assert_eq!((answer(&module_again), from), (5, CompiledFrom::Bytecode));
        assert_eq!(std::fs::read(&path).unwrap(), whole, "rewritten whole");
        // Damaged: one byte of the artifact flipped.
        let mut damaged = whole.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        std::fs::write(&path, &damaged).unwrap();
        let Compiled { from, .. } =
            compile::<()>(&runtime, &module(5), false, Some(&cache)).unwrap();
        assert_eq!(from, CompiledFrom::Bytecode);
    }

    #[cfg(unix)]
    #[test]
    fn a_cache_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().unwrap();
        let shared = directory.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let cache = CompilationCache::new(&shared);
        let runtime = wasmtime(RuntimeConfig::default());
        for _ in 0..2 {
            let Compiled { from, warnings, .. } =
                compile::<()>(&runtime, &module(5), false, Some(&cache)).unwrap();
            assert_eq!(from, CompiledFrom::Bytecode);
            assert!(
                warnings[0].contains("writable by other users"),
                "{warnings:?}"
            );
        }
        assert_eq!(
            std::fs::read_dir(&shared).unwrap().count(),
            0,
            "nothing written"
        );
        // A cache directory it makes is this user's alone.
        let made = CompilationCache::new(directory.path().join("made/compiled"));
        compile::<()>(&runtime, &module(5), false, Some(&made)).unwrap();
        let mode = std::fs::metadata(made.directory())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    /// A cache keeps what was used lately: before each write, temporary files a crash left
    /// (an hour old) and entries no one read or wrote for 30 days go; a read marks an entry
    /// used. Directories and recent files stay.
    #[test]
    fn a_cache_drops_what_no_one_used_for_30_days_and_what_a_crash_left() {
        use std::time::SystemTime;
        let dir = tempfile::tempdir().unwrap();
        let aged = |name: &str, age: Duration| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            // Private, as the caches write theirs (and as a read asks, whatever the umask).
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(SystemTime::now() - age).unwrap();
            path
        };
        let hour = Duration::from_secs(3600);
        let month = UNUSED_ENTRY_AGE + hour;
        let digest = |n: u8| sha256_hex(&[n]);
        let old_temporary = aged(".tmpOLD123", 2 * hour);
        let new_temporary = aged(".tmpNEW123", Duration::ZERO);
        let unused = aged(&format!("wasmtime-{}", digest(1)), month);
        let unused_code = aged(&format!("{}.wasm", digest(2)), month);
        let used = aged(&format!("wasmer-cranelift-{}", digest(3)), month);
        let recent = aged(&format!("{}.wasm", digest(4)), 24 * hour);
        // Not named as a cache names its files: never touched, however old.
        let foreign = aged("notes.txt", month);
        let not_quite = aged(&format!("{}.so", digest(5)), month);
        std::fs::create_dir(dir.path().join("a-directory")).unwrap();
        // Reading marks the entry used (as a cache hit does).
        assert!(read_private(&used, 1024).is_some());
        sweep(dir.path());
        let gone = [&old_temporary, &unused, &unused_code];
        let kept = [&new_temporary, &used, &recent, &foreign, &not_quite];
        for path in gone {
            assert!(!path.exists(), "{} should be gone", path.display());
        }
        for path in kept {
            assert!(path.exists(), "{} should be kept", path.display());
        }
        assert!(dir.path().join("a-directory").exists());
    }

    #[test]
    fn only_files_named_as_the_caches_name_theirs_are_cache_files() {
        let digest = sha256_hex(b"x");
        for (name, kind) in [
            (".tmpA1b2C3".to_string(), Some(CacheFile::Temporary)),
            (".tmp-x".to_string(), None),
            (format!("wasmtime-{digest}"), Some(CacheFile::Entry)),
            (format!("wasmer-llvm-{digest}"), Some(CacheFile::Entry)),
            (format!("{digest}.wasm"), Some(CacheFile::Entry)),
            (digest.clone(), None),
            (format!("-{digest}"), None),
            (format!("wasmtime-{digest}.wasm"), None),
            (format!("wasmtime-{}", digest.to_uppercase()), None),
            (format!("a b-{digest}"), None),
            ("wasmtime-short".to_string(), None),
        ] {
            assert_eq!(cache_file(&name), kind, "{name}");
        }
    }

    #[test]
    fn concurrent_writers_leave_one_whole_entry() {
        let directory = tempfile::tempdir().unwrap();
        let cache = CompilationCache::new(directory.path());
        let runtime = Arc::new(wasmtime(RuntimeConfig::default()));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| compile::<()>(&*runtime, &module(9), false, Some(&cache)).unwrap());
            }
        });
        let entries: Vec<_> = std::fs::read_dir(cache.directory()).unwrap().collect();
        assert_eq!(entries.len(), 1);
        let Compiled { module, from, .. } =
            compile::<()>(&*runtime, &module(9), false, Some(&cache)).unwrap();
        assert_eq!((answer(&module), from), (9, CompiledFrom::CompilationCache));
    }

    #[test]
    fn a_module_that_is_not_wasm_cannot_be_precompiled() {
        let runtime = wasmtime(RuntimeConfig::default());
        assert!(precompile::<()>(&runtime, b"not wasm").is_err());
        assert!(with_custom_section(b"\0asm\x0d\0\x01\0", "x", b"").is_err());
    }
}
