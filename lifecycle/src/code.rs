//! A plugin's code, read from where its configuration says, and the VM key it shares a VM by.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::{CodeSource, PluginConfig};

/// A plugin's code, ready for an engine.
#[derive(Clone, PartialEq, Eq)]
pub enum Code {
    /// A WebAssembly module.
    Wasm(Vec<u8>),
    /// For the null runtime: a compiled-in native plugin, by name (`inline_string`, as Envoy
    /// names its null-VM plugins).
    NativeName(String),
    /// For the null runtime: a native plugin library (`filename`).
    NativeLibrary {
        /// The library's file.
        path: PathBuf,
        /// The file's bytes when the configuration was read: what every VM of the plugin runs.
        bytes: Arc<Vec<u8>>,
        /// The path and the SHA-256 of `bytes`: a configuration update after a new build
        /// replaced the file loads the new build.
        identity: Vec<u8>,
    },
}

/// Sizes, not bytes: a module or a library may be a gigabyte, and messages show this.
impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Wasm(bytes) => write!(f, "a WebAssembly module of {} bytes", bytes.len()),
            Code::NativeName(name) => write!(f, "the compiled-in native plugin {name:?}"),
            Code::NativeLibrary { path, bytes, .. } => write!(
                f,
                "the native library {} ({} bytes)",
                path.display(),
                bytes.len()
            ),
        }
    }
}

impl Code {
    /// The bytes that identify the code: the module, the plugin's name, or the library's path
    /// and digest.
    pub fn identity(&self) -> &[u8] {
        match self {
            Code::Wasm(bytes) => bytes,
            Code::NativeName(name) => name.as_bytes(),
            Code::NativeLibrary { identity, .. } => identity,
        }
    }
}

/// Why code could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An environment variable named as the code source is not set.
    #[error("environment variable {0} (the code's source) is not set")]
    MissingVariable(String),
    /// Remote code is not read by this function (see the fetcher).
    #[error("remote code ({0}) has to be fetched first")]
    Remote(String),
}

/// The largest native plugin library read (an unstripped build with debug information can be
/// far larger than a WebAssembly module).
pub const MAX_NATIVE_LIBRARY_BYTES: u64 = 1 << 30;

/// Reads a plugin's local code for `engine` (pwhost's engine name). Relative file names are
/// taken from `base_dir` (the configuration's directory, as Traffic Server does).
pub fn read_local(source: &CodeSource, engine: &str, base_dir: &Path) -> Result<Code, CodeError> {
    let native = engine == "null";
    match source {
        CodeSource::File(path) => {
            let path = base_dir.join(path);
            if native {
                let bytes = crate::files::read_regular_file_up_to(&path, MAX_NATIVE_LIBRARY_BYTES)
                    .map_err(|source| CodeError::File {
                        path: path.clone(),
                        source,
                    })?;
                let mut identity = path.as_os_str().as_encoded_bytes().to_vec();
                identity.push(0);
                identity.extend_from_slice(sha256_hex(&bytes).as_bytes());
                return Ok(Code::NativeLibrary {
                    path,
                    bytes: Arc::new(bytes),
                    identity,
                });
            }
            crate::files::read_regular_file(&path)
                .map(Code::Wasm)
                .map_err(|source| CodeError::File { path, source })
        }
        CodeSource::Bytes(bytes) => Ok(Code::Wasm(bytes.clone())),
        CodeSource::String(text) if native => Ok(Code::NativeName(text.clone())),
        CodeSource::String(text) => Ok(Code::Wasm(text.clone().into_bytes())),
        CodeSource::EnvironmentVariable(name) => std::env::var_os(name)
            .map(|value| Code::Wasm(value.into_encoded_bytes()))
            .ok_or_else(|| CodeError::MissingVariable(name.clone())),
        CodeSource::Remote(remote) => Err(CodeError::Remote(remote.uri.clone())),
    }
}

/// Which VM a plugin runs in: plugins with equal keys share one compiled module and, per
/// thread, one VM copy. As Envoy's, a SHA-256 over the vm_id, the VM configuration and the code;
/// unlike Envoy's, also over the engine, the capability restriction and `allow_precompiled`, so
/// that plugins asking for different engines or capabilities never share a VM (Envoy lets the
/// first plugin's runtime and restriction win, so a restricted plugin could run in an
/// unrestricted VM), and a plugin that does not allow precompiled code never runs a module
/// loaded from a precompiled section (nor does a configuration update that turns it off).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmKey([u8; 32]);

impl VmKey {
    /// The key of `plugin`'s VM on `engine` with `code`.
    pub fn new(plugin: &PluginConfig, engine: &str, code: &Code) -> VmKey {
        let mut hash = Sha256::new();
        // An empty restriction is none, as in Envoy; names are length-prefixed, so that no
        // two different sets encode alike.
        let mut capabilities = Vec::new();
        if let Some(allowed) = plugin
            .allowed_capabilities
            .as_ref()
            .filter(|a| !a.is_empty())
        {
            capabilities.extend_from_slice(b"restricted");
            for name in allowed {
                capabilities.extend_from_slice(&(name.len() as u64).to_le_bytes());
                capabilities.extend_from_slice(name.as_bytes());
            }
        }
        // A plugin that does not allow precompiled code never shares a module loaded from a
        // precompiled section.
        let precompiled: &[u8] = if plugin.vm.allow_precompiled {
            b"allow_precompiled"
        } else {
            b""
        };
        // A VM has one environment: plugins that ask for different ones never share a VM
        // (Envoy would give the second plugin the first's, without a word).
        let mut environment = Vec::new();
        for (key, value) in plugin.vm.environment.resolve() {
            for part in [key, value] {
                environment.extend_from_slice(&(part.len() as u64).to_le_bytes());
                environment.extend_from_slice(part.as_bytes());
            }
        }
        for part in [
            plugin.vm.vm_id.as_bytes(),
            engine.as_bytes(),
            &plugin.vm.configuration,
            code.identity(),
            &capabilities,
            precompiled,
            &environment,
        ] {
            // Lengths first, so that no two different inputs run together into the same bytes.
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        VmKey(hash.finalize().into())
    }
}

impl fmt::Display for VmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02X}"))
    }
}

impl fmt::Debug for VmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmKey({self})")
    }
}

/// The SHA-256 of `bytes` in lowercase hex, as remote code's `sha256` is written.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `plugin`'s identity and configuration as the ABI takes them.
pub fn abi_config(plugin: &PluginConfig) -> abi::PluginConfig {
    abi::PluginConfig {
        name: plugin.name.clone(),
        root_id: plugin.root_id.clone(),
        vm_id: plugin.vm.vm_id.clone(),
        vm_configuration: plugin.vm.configuration.clone(),
        plugin_configuration: plugin.configuration.clone(),
        allowed_capabilities: plugin.allowed_capabilities.clone(),
        environment: plugin.vm.environment.resolve(),
        allow_on_headers_stop_iteration: plugin.allow_on_headers_stop_iteration,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(vm_id: &str, configuration: &str) -> PluginConfig {
        let yaml = format!(
            "{{vm_config: {{vm_id: {vm_id:?}, configuration: {configuration:?}, code: {{local: {{inline_bytes: AGFzbQEAAAA=}}}}}}}}"
        );
        crate::parse(&yaml).unwrap().http_filters.remove(0)
    }

    #[test]
    fn equal_vm_ids_configurations_code_and_engines_share_a_key() {
        let code = Code::Wasm(b"\0asm\x01\0\0\0".to_vec());
        let key = VmKey::new(&plugin("vm", "c"), "wasmtime", &code);
        assert_eq!(key, VmKey::new(&plugin("vm", "c"), "wasmtime", &code));
        assert_ne!(key, VmKey::new(&plugin("other", "c"), "wasmtime", &code));
        assert_ne!(key, VmKey::new(&plugin("vm", "d"), "wasmtime", &code));
        assert_ne!(key, VmKey::new(&plugin("vm", "c"), "wasmi", &code));
        assert_ne!(
            key,
            VmKey::new(&plugin("vm", "c"), "wasmtime", &Code::Wasm(vec![0]))
        );
        assert_ne!(
            VmKey::new(&plugin("ab", ""), "wasmtime", &code),
            VmKey::new(&plugin("a", "b"), "wasmtime", &code),
            "parts do not run together"
        );
        assert_eq!(key.to_string().len(), 64);
    }

    #[test]
    fn plugins_with_different_capability_restrictions_never_share_a_vm() {
        let code = Code::Wasm(b"\0asm\x01\0\0\0".to_vec());
        let restricted = |names: &[&str]| PluginConfig {
            allowed_capabilities: Some(names.iter().map(|n| n.to_string()).collect()),
            ..plugin("vm", "c")
        };
        let open = VmKey::new(&plugin("vm", "c"), "wasmtime", &code);
        let logs_only = VmKey::new(&restricted(&["proxy_log"]), "wasmtime", &code);
        assert_ne!(open, logs_only);
        assert_eq!(
            logs_only,
            VmKey::new(&restricted(&["proxy_log"]), "wasmtime", &code)
        );
        assert_ne!(
            logs_only,
            VmKey::new(&restricted(&["proxy_log", "fd_write"]), "wasmtime", &code)
        );
        assert_eq!(
            open,
            VmKey::new(&restricted(&[]), "wasmtime", &code),
            "an empty restriction is none"
        );
        assert_ne!(
            VmKey::new(&restricted(&["a,b"]), "wasmtime", &code),
            VmKey::new(&restricted(&["a", "b"]), "wasmtime", &code),
            "names do not run together"
        );
    }

    #[test]
    fn plugins_with_different_environments_never_share_a_vm() {
        let code = Code::Wasm(b"\0asm\x01\0\0\0".to_vec());
        let with = |pairs: &[(&str, &str)]| {
            let mut plugin = plugin("vm", "c");
            plugin.vm.environment.key_values = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            VmKey::new(&plugin, "wasmtime", &code)
        };
        assert_eq!(with(&[]), VmKey::new(&plugin("vm", "c"), "wasmtime", &code));
        assert_eq!(with(&[("MODE", "a")]), with(&[("MODE", "a")]));
        assert_ne!(with(&[("MODE", "a")]), with(&[("MODE", "b")]));
        assert_ne!(with(&[("MODE", "a")]), with(&[]));
        assert_ne!(
            with(&[("AB", "")]),
            with(&[("A", "B")]),
            "names and values do not run together"
        );
    }

    #[test]
    fn allowing_precompiled_code_is_part_of_the_key() {
        let code = Code::Wasm(b"\0asm\x01\0\0\0".to_vec());
        let mut trusting = plugin("vm", "c");
        trusting.vm.allow_precompiled = true;
        assert_ne!(
            VmKey::new(&trusting, "wasmtime", &code),
            VmKey::new(&plugin("vm", "c"), "wasmtime", &code)
        );
    }

    #[test]
    fn local_code_is_read_for_its_engine() {
        let dir = std::env::temp_dir();
        let source = CodeSource::String("http_headers".into());
        assert_eq!(
            read_local(&source, "null", &dir).unwrap(),
            Code::NativeName("http_headers".into())
        );
        assert_eq!(
            read_local(&source, "wasmtime", &dir).unwrap(),
            Code::Wasm(b"http_headers".to_vec())
        );
        let missing = CodeSource::File("no/such/file.wasm".into());
        let error = read_local(&missing, "wasmtime", &dir)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("cannot read "), "{error}");
        assert!(matches!(
            read_local(
                &CodeSource::EnvironmentVariable("PWHOST_NO_SUCH_VAR".into()),
                "wasmtime",
                &dir
            ),
            Err(CodeError::MissingVariable(_))
        ));
    }

    /// A native library is the same code while its bytes are: a configuration update after a
    /// new build replaced the file gets a new VM key, and so loads the new build.
    #[test]
    fn a_native_librarys_identity_follows_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("libplugin.so");
        let source = CodeSource::File("libplugin.so".into());
        let identity = |bytes: &[u8]| {
            std::fs::write(&file, bytes).unwrap();
            read_local(&source, "null", dir.path()).unwrap()
        };
        let first = identity(b"first build");
        assert!(matches!(&first, Code::NativeLibrary { path, bytes, .. }
            if *path == file && bytes.as_slice() == b"first build"));
        assert_eq!(identity(b"first build"), first);
        assert_ne!(identity(b"second build"), first);
        let missing = CodeSource::File("no/such/libplugin.so".into());
        assert!(read_local(&missing, "null", dir.path()).is_err());
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
