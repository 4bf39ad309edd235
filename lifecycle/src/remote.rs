//! Remote code (`vm_config.code.remote`): fetched over HTTP(S) with the configured timeout and
//! retries, its sha256 checked before anything is compiled, and kept by sha256 in memory (as
//! Envoy keeps it) and, when the embedder gives a directory, on disk, so that a restart without
//! network still starts.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::config::RemoteCode;

/// The largest module fetched (a bigger body is refused rather than read into memory).
pub const MAX_REMOTE_CODE_BYTES: u64 = 128 << 20;

/// Why remote code could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Every attempt failed; the last one for this reason.
    #[error("cannot fetch {uri} ({attempts} attempt{s}): {reason}", s = if *attempts == 1 { "" } else { "s" })]
    Failed {
        /// The URL.
        uri: String,
        /// How many attempts were made.
        attempts: u32,
        /// What went wrong the last time.
        reason: String,
    },
    /// The code fetched is not the code configured.
    #[error(
        "the code fetched from {uri} has sha256 {actual}, but the configuration says {expected}"
    )]
    Mismatch {
        /// The URL.
        uri: String,
        /// The configured digest.
        expected: String,
        /// The digest of what came.
        actual: String,
    },
    /// `nack_on_code_cache_miss`: the code is not cached, and is being fetched in the background
    /// for a later attempt, as Envoy does.
    #[error("{uri} is not in the code cache (nack_on_code_cache_miss): refused for now while it is fetched in the background")]
    CacheMiss {
        /// The URL.
        uri: String,
    },
    /// This build cannot fetch.
    #[error("this build cannot fetch remote code (the lifecycle crate's `remote` feature is off)")]
    Unsupported,
}

pub use crate::code::sha256_hex;

/// Remote code kept by sha256: in this process's memory, and in a directory if one is given.
#[derive(Clone, Debug, Default)]
pub struct CodeCache {
    directory: Option<PathBuf>,
}

/// The code fetched by this process, by sha256 (Envoy's in-memory remote code cache).
fn memory() -> &'static Mutex<HashMap<String, Arc<Vec<u8>>>> {
    static MEMORY: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
    MEMORY.get_or_init(Mutex::default)
}

impl CodeCache {
    /// A cache in this process's memory and, with `directory`, on disk there (made if missing).
    pub fn new(directory: Option<PathBuf>) -> CodeCache {
        CodeCache { directory }
    }

    fn file(&self, sha256: &str) -> Option<PathBuf> {
        // The digest was checked to be 64 hex digits when the configuration was parsed; be
        // sure anyway before it names a file.
        let hex = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then(|| {
            self.directory
                .as_ref()
                .map(|d| d.join(format!("{sha256}.wasm")))
        })
        .flatten()
    }

    /// The code with `sha256`, if cached (a cached file that does not hash to its name is
    /// ignored and removed).
    pub fn get(&self, sha256: &str) -> Option<Arc<Vec<u8>>> {
        if let Some(code) = memory().lock().ok()?.get(sha256) {
            return Some(Arc::clone(code));
        }
        let file = self.file(sha256)?;
        let bytes = std::fs::read(&file).ok()?;
        if sha256_hex(&bytes) != sha256 {
            let _ = std::fs::remove_file(&file);
            return None;
        }
        let code = Arc::new(bytes);
        if let Ok(mut memory) = memory().lock() {
            memory.insert(sha256.to_string(), Arc::clone(&code));
        }
        Some(code)
    }

    /// Keeps `code` (whose sha256 is `sha256`). The file is written whole or not at all (a
    /// temporary file renamed into place), so concurrent writers and crashes leave no torn
    /// file; a cache that cannot be written is only a cache, and the error is returned for the
    /// caller to report.
    pub fn put(&self, sha256: &str, code: Arc<Vec<u8>>) -> std::io::Result<()> {
        if let Ok(mut memory) = memory().lock() {
            memory.insert(sha256.to_string(), Arc::clone(&code));
        }
        let Some(file) = self.file(sha256) else {
            return Ok(());
        };
        write_atomically(&file, &code)
    }
}

/// Writes `bytes` to `file` through a temporary file in the same directory renamed into place.
pub(crate) fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let directory = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory)?;
    let mut temporary = tempfile::NamedTempFile::new_in(directory)?;
    temporary.write_all(bytes)?;
    temporary.as_file().sync_all()?;
    temporary.persist(file).map_err(|e| e.error)?;
    Ok(())
}

/// The code `remote` names: from the cache, else fetched (and cached). With `nack_on_miss`
/// (Envoy's `nack_on_code_cache_miss`), a miss is refused and fetched in the background.
pub fn load(
    remote: &RemoteCode,
    cache: &CodeCache,
    nack_on_miss: bool,
) -> Result<Arc<Vec<u8>>, FetchError> {
    if let Some(code) = cache.get(&remote.sha256) {
        return Ok(code);
    }
    if nack_on_miss {
        let (remote, cache) = (remote.clone(), cache.clone());
        let uri = remote.uri.clone();
        // Detached: bounded by the fetch's own timeout and retries.
        let _ = std::thread::Builder::new()
            .name("wasm-code-fetch".into())
            .spawn(move || {
                if let Ok(code) = fetch(&remote) {
                    let _ = cache.put(&remote.sha256, code);
                }
            });
        return Err(FetchError::CacheMiss { uri });
    }
    let code = fetch(remote)?;
    // A cache that cannot be written costs a fetch next time, nothing more.
    let _ = cache.put(&remote.sha256, Arc::clone(&code));
    Ok(code)
}

#[cfg_attr(not(feature = "remote"), allow(dead_code))]
/// The wait before retry `retry` (0 for the first): Envoy's jittered exponential backoff, a
/// random time below `base · 2^retry`, at most `max`.
fn retry_wait(remote: &RemoteCode, retry: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = remote
        .backoff_base
        .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
        .min(remote.backoff_max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX).max(1);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_nanos(random % nanos)
}

/// Fetches `remote` with its timeout per attempt and its retries (after connection failures,
/// timeouts and 5xx answers; a 4xx answer is final), and checks its sha256.
#[cfg(feature = "remote")]
pub fn fetch(remote: &RemoteCode) -> Result<Arc<Vec<u8>>, FetchError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(remote.timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let attempts = remote.retries.saturating_add(1);
    let mut reason = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            std::thread::sleep(retry_wait(remote, attempt - 1));
        }
        let retry = match agent.get(&remote.uri).call() {
            Ok(mut response) => {
                let status = response.status().as_u16();
                if status == 200 {
                    let body = response
                        .body_mut()
                        .with_config()
                        .limit(MAX_REMOTE_CODE_BYTES)
                        .read_to_vec();
                    match body {
                        Ok(code) => return checked(remote, code),
                        Err(ureq::Error::BodyExceedsLimit(limit)) => {
                            return Err(FetchError::Failed {
                                uri: remote.uri.clone(),
                                attempts: attempt + 1,
                                reason: format!("the code is larger than {limit} bytes"),
                            })
                        }
                        Err(error) => {
                            reason = format!("reading the body: {error}");
                            true
                        }
                    }
                } else {
                    reason = format!("HTTP status {status}");
                    status >= 500
                }
            }
            Err(error) => {
                reason = error.to_string();
                true
            }
        };
        if !retry {
            return Err(FetchError::Failed {
                uri: remote.uri.clone(),
                attempts: attempt + 1,
                reason,
            });
        }
    }
    Err(FetchError::Failed {
        uri: remote.uri.clone(),
        attempts,
        reason,
    })
}

/// Without the `remote` feature, nothing is fetched.
#[cfg(not(feature = "remote"))]
pub fn fetch(_remote: &RemoteCode) -> Result<Arc<Vec<u8>>, FetchError> {
    Err(FetchError::Unsupported)
}

/// `code` if it hashes to the configured sha256.
#[cfg_attr(not(feature = "remote"), allow(dead_code))]
fn checked(remote: &RemoteCode, code: Vec<u8>) -> Result<Arc<Vec<u8>>, FetchError> {
    let actual = sha256_hex(&code);
    if !actual.eq_ignore_ascii_case(&remote.sha256) {
        return Err(FetchError::Mismatch {
            uri: remote.uri.clone(),
            expected: remote.sha256.clone(),
            actual,
        });
    }
    Ok(Arc::new(code))
}

#[cfg(test)]
mod tests;
