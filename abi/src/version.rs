//! ABI versions and their detection.

use std::fmt;

use runtime_api::{Export, ExternKind};

use crate::LoadError;

/// A Proxy-Wasm ABI version, declared by the module through an exported marker function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_1_0`.
    V0_1_0,
    /// `proxy_abi_version_0_2_0`.
    V0_2_0,
    /// `proxy_abi_version_0_2_1`.
    V0_2_1,
}

const MARKER_PREFIX: &str = "proxy_abi_version_";

impl AbiVersion {
    /// The version as written in the spec, e.g. `0.2.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }

    fn from_marker(name: &str) -> Option<Self> {
        match name.strip_prefix(MARKER_PREFIX)? {
            "0_1_0" => Some(AbiVersion::V0_1_0),
            "0_2_0" => Some(AbiVersion::V0_2_0),
            "0_2_1" => Some(AbiVersion::V0_2_1),
            _ => None,
        }
    }

    /// Finds the module's ABI version from its exports: exactly one known marker function.
    pub fn detect(exports: &[Export]) -> Result<Self, LoadError> {
        let mut found = None;
        for export in exports.iter().filter(|e| e.name.starts_with(MARKER_PREFIX)) {
            if !matches!(export.kind, ExternKind::Function(_)) {
                continue;
            }
            let version = AbiVersion::from_marker(&export.name)
                .ok_or_else(|| LoadError::UnknownAbiVersion(export.name.clone()))?;
            if let Some(previous) = found.replace(version) {
                if previous != version {
                    return Err(LoadError::ConflictingAbiVersions(previous, version));
                }
            }
        }
        found.ok_or(LoadError::MissingAbiVersion)
    }
}

impl fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(name: &str) -> Export {
        Export {
            name: name.into(),
            kind: ExternKind::Function(Default::default()),
        }
    }

    #[test]
    fn detects_each_known_marker() {
        assert_eq!(
            AbiVersion::detect(&[marker("proxy_abi_version_0_1_0")]).unwrap(),
            AbiVersion::V0_1_0
        );
        assert_eq!(
            AbiVersion::detect(&[marker("proxy_abi_version_0_2_0")]).unwrap(),
            AbiVersion::V0_2_0
        );
        assert_eq!(
            AbiVersion::detect(&[marker("proxy_abi_version_0_2_1")]).unwrap(),
            AbiVersion::V0_2_1
        );
    }

    #[test]
    fn rejects_unknown_missing_and_conflicting_markers() {
        assert!(matches!(
            AbiVersion::detect(&[marker("proxy_abi_version_0_3_0")]),
            Err(LoadError::UnknownAbiVersion(name)) if name == "proxy_abi_version_0_3_0"
        ));
        assert!(matches!(
            AbiVersion::detect(&[marker("malloc")]),
            Err(LoadError::MissingAbiVersion)
        ));
        assert!(matches!(
            AbiVersion::detect(&[
                marker("proxy_abi_version_0_2_0"),
                marker("proxy_abi_version_0_2_1")
            ]),
            Err(LoadError::ConflictingAbiVersions(..))
        ));
    }
}
