//! Remote code (`vm_config.code.remote`): fetched over HTTP(S) with the configured timeout and
//! retries, its sha256 checked before anything is compiled, and kept by sha256 in memory (as
//! Envoy keeps it) and, when the embedder gives a directory, on disk, so that a restart without
//! network still starts.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::config::RemoteCode;

/// The largest module fetched (a bigger body is refused rather than read into memory).
pub const MAX_REMOTE_CODE_BYTES: u64 = 128 << 20;

/// How long a failed background fetch (`nack_on_code_cache_miss`) is remembered: loads within
/// it are refused without fetching again (Envoy's negative caching), so a configuration
/// pushed again and again does not start a fetch each time.
pub const NEGATIVE_CACHING: Duration = Duration::from_secs(10);

/// Code that no load asked for this long leaves this process's memory (Envoy's time to live
/// for its remote code cache); a disk cache keeps it.
pub const UNUSED_TTL: Duration = Duration::from_secs(24 * 3600);

/// The most bytes of code this process keeps in memory; past it, the code no load asked for
/// longest is dropped (read again from the disk cache, or fetched, if wanted again). Envoy
/// bounds its cache by time only, so a control plane pushing a new module every few minutes
/// would pile gigabytes up within the day.
pub const MAX_CODE_IN_MEMORY_BYTES: usize = 512 << 20;

/// The longest one fetch takes, its retries and the waits between them included. A start or a
/// reload waits for the fetch, and a retry policy is the configuration's to set: without a
/// bound, `num_retries: 1000` with a 60 s timeout would hold a proxy's start for most of a day.
pub const MAX_FETCH_TIME: Duration = Duration::from_secs(300);

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
    /// `nack_on_code_cache_miss`: the code is not cached. It is being fetched in the background
    /// for a later attempt, as Envoy does, unless its last fetch failed within
    /// [`NEGATIVE_CACHING`].
    #[error("{}", cache_miss(uri, *fetching, last_failure.as_deref()))]
    CacheMiss {
        /// The URL.
        uri: String,
        /// A fetch is under way (started now or by an earlier load).
        fetching: bool,
        /// Why the last fetch failed, if it did.
        last_failure: Option<String>,
    },
    /// This build cannot fetch.
    #[error("this build cannot fetch remote code (the lifecycle crate's `remote` feature is off)")]
    Unsupported,
}

fn cache_miss(uri: &str, fetching: bool, last_failure: Option<&str>) -> String {
    let miss = format!("{uri} is not in the code cache (nack_on_code_cache_miss): refused");
    match (fetching, last_failure) {
        (true, None) => format!("{miss} for now while it is fetched in the background"),
        (true, Some(reason)) => format!(
            "{miss} for now while it is fetched in the background again (the last fetch \
             failed: {reason})"
        ),
        (false, reason) => format!(
            "{miss}: its last fetch failed under {} s ago ({}); a load after that fetches it \
             again",
            NEGATIVE_CACHING.as_secs(),
            reason.unwrap_or("no reason given")
        ),
    }
}

pub use crate::code::sha256_hex;

/// Remote code kept by sha256: in this process's memory, and in a directory if one is given.
#[derive(Clone, Debug, Default)]
pub struct CodeCache {
    directory: Option<PathBuf>,
}

/// Remote code as [`load`] has it.
#[derive(Debug)]
pub struct Fetched {
    /// The code, checked against its sha256.
    pub code: Arc<Vec<u8>>,
    /// What went wrong with the disk cache (not used, or not written), for the embedder's log.
    pub warnings: Vec<String>,
}

/// One sha256 in this process's memory (Envoy's code cache entry).
#[derive(Debug)]
struct Entry {
    /// The code, once fetched or read from disk.
    code: Option<Arc<Vec<u8>>>,
    /// A background fetch is under way.
    fetching: bool,
    /// Why the last background fetch failed, and when.
    failed: Option<(String, Instant)>,
    /// When a load last asked for it.
    used: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            code: None,
            fetching: false,
            failed: None,
            used: now,
        }
    }
}

/// The code fetched by this process, by sha256 (Envoy's in-memory remote code cache).
fn memory() -> MutexGuard<'static, HashMap<String, Entry>> {
    static MEMORY: OnceLock<Mutex<HashMap<String, Entry>>> = OnceLock::new();
    MEMORY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The entry of `sha256` in `memory`, made if missing.
fn entry_of<'m>(
    memory: &'m mut HashMap<String, Entry>,
    sha256: &str,
    now: Instant,
) -> &'m mut Entry {
    memory
        .entry(sha256.to_string())
        .or_insert_with(|| Entry::new(now))
}

/// Drops the entries no load asked for in [`UNUSED_TTL`] but `keep`'s and those being
/// fetched, as Envoy does on each load: code replaced by new versions does not stay for ever.
fn evict_unused(entries: &mut HashMap<String, Entry>, now: Instant, keep: &str) {
    entries.retain(|sha256, entry| {
        sha256 == keep || entry.fetching || now.saturating_duration_since(entry.used) < UNUSED_TTL
    });
}

/// Drops the code of the entries no load asked for longest, but `keep`'s, until the code kept
/// is at most `max_bytes` (an entry stays, without its code, for what it says of fetches).
fn evict_over(entries: &mut HashMap<String, Entry>, max_bytes: usize, keep: &str) {
    let mut kept: usize = entries
        .values()
        .filter_map(|entry| entry.code.as_ref())
        .map(|code| code.len())
        .sum();
    if kept <= max_bytes {
        return;
    }
    let mut by_use: Vec<(Instant, &String)> = entries
        .iter()
        .filter(|(sha256, entry)| entry.code.is_some() && *sha256 != keep)
        .map(|(sha256, entry)| (entry.used, sha256))
        .collect();
    by_use.sort_unstable();
    let oldest: Vec<String> = by_use
        .into_iter()
        .map(|(_, sha256)| sha256.clone())
        .collect();
    for sha256 in oldest {
        if kept <= max_bytes {
            break;
        }
        if let Some(code) = entries.get_mut(&sha256).and_then(|entry| entry.code.take()) {
            kept -= code.len();
        }
    }
}

impl CodeCache {
    /// A cache in this process's memory and, with `directory`, on disk there (made if
    /// missing, readable and writable by this user only).
    pub fn new(directory: Option<PathBuf>) -> CodeCache {
        CodeCache { directory }
    }

    /// The file of `sha256` in the directory, once the directory is made and checked to be
    /// this user's alone (as the compilation cache's); `Ok(None)` without a directory.
    fn file(&self, sha256: &str) -> Result<Option<PathBuf>, String> {
        let Some(directory) = &self.directory else {
            return Ok(None);
        };
        // The digest was checked to be 64 hex digits when the configuration was parsed; be
        // sure anyway before it names a file.
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        crate::compiled::private_directory(directory)
            .map_err(|e| format!("the code cache {} is not used: {e}", directory.display()))?;
        Ok(Some(directory.join(format!("{sha256}.wasm"))))
    }

    /// The code with `sha256`, if cached (a cached file that does not hash to its name is
    /// ignored and removed).
    pub fn get(&self, sha256: &str) -> Option<Arc<Vec<u8>>> {
        self.lookup(sha256, &mut Vec::new())
    }

    /// As [`CodeCache::get`], noting in `warnings` a disk cache that cannot be used.
    fn lookup(&self, sha256: &str, warnings: &mut Vec<String>) -> Option<Arc<Vec<u8>>> {
        let now = Instant::now();
        let in_memory = memory().get_mut(sha256).and_then(|entry| {
            entry.used = now;
            entry.code.clone()
        });
        if let Some(code) = in_memory {
            // The disk copy is what a start without network needs: used too, so that the
            // disk cache's sweep keeps it however long this process runs.
            if let Ok(Some(file)) = self.file(sha256) {
                crate::compiled::mark_used(&file);
            }
            return Some(code);
        }
        let file = match self.file(sha256) {
            Ok(file) => file?,
            Err(warning) => {
                warnings.push(warning);
                return None;
            }
        };
        let Some(bytes) = crate::compiled::read_private(&file, MAX_REMOTE_CODE_BYTES) else {
            if std::fs::symlink_metadata(&file).is_ok() {
                warnings.push(format!(
                    "the cached code {} is not used: not a regular file of this user's that \
                     others cannot write, or over {MAX_REMOTE_CODE_BYTES} bytes",
                    file.display()
                ));
            }
            return None;
        };
        if sha256_hex(&bytes) != sha256 {
            let _ = std::fs::remove_file(&file);
            return None;
        }
        let code = Arc::new(bytes);
        keep_in_memory(sha256, &code);
        Some(code)
    }

    /// Keeps `code` (whose sha256 is `sha256`). The file is written whole or not at all (a
    /// temporary file renamed into place), so concurrent writers and crashes leave no torn
    /// file; a cache that cannot be written is only a cache, and the error is returned for the
    /// caller to report.
    pub fn put(&self, sha256: &str, code: Arc<Vec<u8>>) -> Result<(), String> {
        keep_in_memory(sha256, &code);
        let Some(file) = self.file(sha256)? else {
            return Ok(());
        };
        if let Some(directory) = file.parent() {
            crate::compiled::sweep(directory);
        }
        write_atomically(&file, &code)
            .map_err(|e| format!("the code could not be kept in {}: {e}", file.display()))
    }
}

/// Puts `code` in memory as `sha256`'s, ending a background fetch of it.
fn keep_in_memory(sha256: &str, code: &Arc<Vec<u8>>) {
    let now = Instant::now();
    let mut memory = memory();
    let entry = entry_of(&mut memory, sha256, now);
    entry.code = Some(Arc::clone(code));
    entry.fetching = false;
    entry.failed = None;
    entry.used = now;
    evict_over(&mut memory, MAX_CODE_IN_MEMORY_BYTES, sha256);
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
/// (Envoy's `nack_on_code_cache_miss`), a miss is refused and fetched in the background: one
/// fetch at a time per sha256, none within [`NEGATIVE_CACHING`] of a failed one.
pub fn load(
    remote: &RemoteCode,
    cache: &CodeCache,
    nack_on_miss: bool,
) -> Result<Fetched, FetchError> {
    evict_unused(&mut memory(), Instant::now(), &remote.sha256);
    let mut warnings = Vec::new();
    if let Some(code) = cache.lookup(&remote.sha256, &mut warnings) {
        return Ok(Fetched { code, warnings });
    }
    if nack_on_miss {
        return fetch_in_background(remote, cache).map(|code| Fetched { code, warnings });
    }
    let code = fetch(remote)?;
    // A cache that cannot be written costs a fetch next time, nothing more.
    if let Err(warning) = cache.put(&remote.sha256, Arc::clone(&code)) {
        warnings.push(warning);
    }
    Ok(Fetched { code, warnings })
}

/// Starts fetching `remote` on a thread of its own unless a fetch is under way or the last one
/// failed within [`NEGATIVE_CACHING`]; the miss to report. The code, if a fetch brought it
/// since the caller looked.
fn fetch_in_background(remote: &RemoteCode, cache: &CodeCache) -> Result<Arc<Vec<u8>>, FetchError> {
    let now = Instant::now();
    let uri = remote.uri.clone();
    let mut memory = memory();
    let entry = entry_of(&mut memory, &remote.sha256, now);
    entry.used = now;
    if let Some(code) = &entry.code {
        return Ok(Arc::clone(code));
    }
    let last_failure = entry.failed.as_ref().map(|(reason, _)| reason.clone());
    if entry.fetching {
        return Err(FetchError::CacheMiss {
            uri,
            fetching: true,
            last_failure,
        });
    }
    if let Some((_, at)) = &entry.failed {
        if now.saturating_duration_since(*at) < NEGATIVE_CACHING {
            return Err(FetchError::CacheMiss {
                uri,
                fetching: false,
                last_failure,
            });
        }
    }
    entry.fetching = true;
    drop(memory);
    let (source, cache) = (remote.clone(), cache.clone());
    // Detached: bounded by the fetch's own timeout and retries.
    let spawned = std::thread::Builder::new()
        .name("wasm-code-fetch".into())
        .spawn(move || {
            let fetched = std::panic::catch_unwind(|| fetch(&source));
            match fetched {
                // A disk cache that cannot be written costs a fetch after a restart.
                Ok(Ok(code)) => drop(cache.put(&source.sha256, code)),
                Ok(Err(error)) => fetch_failed(&source.sha256, error.to_string()),
                Err(_) => fetch_failed(&source.sha256, "the fetch panicked".into()),
            }
        });
    Err(match spawned {
        Ok(_) => FetchError::CacheMiss {
            uri,
            fetching: true,
            last_failure,
        },
        Err(error) => {
            let reason = format!("no thread could be started to fetch it: {error}");
            fetch_failed(&remote.sha256, reason.clone());
            FetchError::CacheMiss {
                uri,
                fetching: false,
                last_failure: Some(reason),
            }
        }
    })
}

/// Notes that the background fetch of `sha256` ended without its code, and why.
fn fetch_failed(sha256: &str, reason: String) {
    let now = Instant::now();
    let mut memory = memory();
    let entry = entry_of(&mut memory, sha256, now);
    entry.fetching = false;
    entry.failed = Some((reason, now));
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
/// timeouts and 5xx answers; a 4xx answer is final), and checks its sha256; gives up after
/// [`MAX_FETCH_TIME`] in all.
pub fn fetch(remote: &RemoteCode) -> Result<Arc<Vec<u8>>, FetchError> {
    fetch_within(remote, MAX_FETCH_TIME)
}

/// [`fetch`], giving up after `overall` in all: an attempt's timeout is cut to the time left,
/// and no retry starts whose wait would end past it.
#[cfg(feature = "remote")]
fn fetch_within(remote: &RemoteCode, overall: Duration) -> Result<Arc<Vec<u8>>, FetchError> {
    // No redirect is followed, as Envoy's fetcher follows none: a redirect is its status.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    // A timeout of 0 is none of the attempt's own (as Envoy reads a zero timeout): only the
    // overall limit holds.
    let per_attempt = match remote.timeout.is_zero() {
        true => overall,
        false => remote.timeout,
    };
    let started = Instant::now();
    let attempts = remote.retries.saturating_add(1);
    let mut reason = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            let wait = retry_wait(remote, attempt - 1);
            // A retry needs time for an attempt worth making, not a timeout of nothing whose
            // failure would hide the reason of the one before.
            let needed = wait.saturating_add(per_attempt.min(Duration::from_secs(1)));
            if started.elapsed().saturating_add(needed) >= overall {
                return Err(FetchError::Failed {
                    uri: remote.uri.clone(),
                    attempts: attempt,
                    reason: format!(
                        "{reason}; no more retries, as a fetch may take at most {overall:?}"
                    ),
                });
            }
            std::thread::sleep(wait);
        }
        let time_left = overall.saturating_sub(started.elapsed());
        let timeout = per_attempt.min(time_left);
        let request = agent
            .get(&remote.uri)
            .config()
            .timeout_global(Some(timeout))
            .build();
        // Why this attempt fails, with a word if the overall limit cut its time short.
        let cut_short = |reason: String| match timeout < per_attempt {
            true => format!(
                "{reason} (after {timeout:?}, what was left of the {overall:?} a fetch may take)"
            ),
            false => reason,
        };
        let retry = match request.call() {
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
                            reason = cut_short(format!("reading the body: {error}"));
                            true
                        }
                    }
                } else {
                    reason = format!("HTTP status {status}");
                    status >= 500
                }
            }
            Err(error) => {
                reason = cut_short(error.to_string());
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
fn fetch_within(_remote: &RemoteCode, _overall: Duration) -> Result<Arc<Vec<u8>>, FetchError> {
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
