use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use super::*;

/// How the test server answers one request.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: Vec<u8>,
    delay: Duration,
}

fn ok(body: &[u8]) -> Answer {
    Answer {
        status: 200,
        body: body.to_vec(),
        delay: Duration::ZERO,
    }
}

/// An HTTP server on 127.0.0.1 answering request `i` with `answers[i]` (the last one after),
/// each on a thread of its own; stopped when dropped.
struct TestServer {
    url: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(answers: Vec<Answer>) -> TestServer {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("a loopback port");
        let port = server.server_addr().to_ip().expect("an IP address").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&requests), Arc::clone(&stop));
        let url = format!("http://127.0.0.1:{port}/plugin.wasm");
        // A redirect (3xx) sends the client back here, to the next answer.
        let location = tiny_http::Header::from_bytes("Location", url.as_bytes()).expect("a header");
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let index = count.fetch_add(1, Ordering::Relaxed);
                let answer = answers[index.min(answers.len() - 1)].clone();
                let location = location.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(answer.delay);
                    let mut response =
                        tiny_http::Response::from_data(answer.body).with_status_code(answer.status);
                    if (300..400).contains(&answer.status) {
                        response.add_header(location);
                    }
                    let _ = request.respond(response);
                });
            }
        });
        TestServer {
            url,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Code unique to each test, so tests sharing the process's memory cache never meet.
fn code(test: &str) -> Vec<u8> {
    format!("\0asm\x01\0\0\0 code of {test}").into_bytes()
}

fn remote(url: &str, code: &[u8]) -> RemoteCode {
    RemoteCode {
        uri: url.to_string(),
        cluster: None,
        timeout: Duration::from_secs(5),
        sha256: sha256_hex(code),
        retries: 1,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
    }
}

fn forget_in_memory(sha256: &str) {
    memory().remove(sha256);
}

#[test]
fn fetched_code_is_checked_and_kept_on_disk_for_a_start_without_network() {
    let code = code("disk");
    let directory = tempfile::tempdir().unwrap();
    let cache = CodeCache::new(Some(directory.path().to_path_buf()));
    let server = TestServer::start(vec![ok(&code)]);
    let source = remote(&server.url, &code);
    assert_eq!(*load(&source, &cache, false).unwrap().code, code);
    assert_eq!(server.requests(), 1);
    let file = directory.path().join(format!("{}.wasm", source.sha256));
    assert_eq!(std::fs::read(&file).unwrap(), code);
    // Code found in memory marks its disk copy used too (the disk cache sweeps what no one
    // used for 30 days, and a long-running process reads memory only).
    let month_ago = std::time::SystemTime::now() - Duration::from_secs(31 * 24 * 3600);
    let set_modified = |when| {
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(when)
            .unwrap()
    };
    set_modified(month_ago);
    assert_eq!(*load(&source, &cache, false).unwrap().code, code);
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert!(
        modified > month_ago + Duration::from_secs(24 * 3600),
        "{modified:?}"
    );
    // A restart: nothing in memory, and no server.
    drop(server);
    forget_in_memory(&source.sha256);
    assert_eq!(*load(&source, &cache, false).unwrap().code, code);
}

#[test]
fn a_cached_file_that_does_not_match_its_name_is_not_used() {
    let code = code("torn");
    let directory = tempfile::tempdir().unwrap();
    let cache = CodeCache::new(Some(directory.path().to_path_buf()));
    let sha256 = sha256_hex(&code);
    std::fs::write(
        directory.path().join(format!("{sha256}.wasm")),
        &code[..code.len() / 2],
    )
    .unwrap();
    assert!(cache.get(&sha256).is_none());
    assert!(!directory.path().join(format!("{sha256}.wasm")).exists());
}

#[test]
fn a_404_is_final() {
    let code = code("404");
    let server = TestServer::start(vec![Answer {
        status: 404,
        body: b"not here".to_vec(),
        delay: Duration::ZERO,
    }]);
    let error = load(&remote(&server.url, &code), &CodeCache::default(), false).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("cannot fetch {} (1 attempt): HTTP status 404", server.url)
    );
    assert_eq!(server.requests(), 1);
}

/// A redirect is followed no more than Envoy's fetcher follows one: it is the answer, and final.
#[test]
fn a_redirect_is_not_followed() {
    let code = code("redirect");
    let server = TestServer::start(vec![
        Answer {
            status: 301,
            body: Vec::new(),
            delay: Duration::ZERO,
        },
        ok(&code),
    ]);
    let error = load(&remote(&server.url, &code), &CodeCache::default(), false).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("cannot fetch {} (1 attempt): HTTP status 301", server.url)
    );
    assert_eq!(server.requests(), 1);
}

/// `timeout: 0s` gives an attempt no time limit of its own (only a fetch's overall one), as
/// Envoy reads a zero timeout, instead of failing every attempt at once.
#[test]
fn a_zero_timeout_is_no_timeout_of_the_attempts_own() {
    let code = code("zero timeout");
    let server = TestServer::start(vec![Answer {
        delay: Duration::from_millis(200),
        ..ok(&code)
    }]);
    let source = RemoteCode {
        timeout: Duration::ZERO,
        ..remote(&server.url, &code)
    };
    let fetched = load(&source, &CodeCache::default(), false).expect("fetched");
    assert_eq!(*fetched.code, code);
    assert_eq!(server.requests(), 1);
}

#[test]
fn a_timeout_or_a_5xx_is_retried_as_the_retry_policy_says() {
    let code = code("retry");
    let slow = Answer {
        delay: Duration::from_secs(3),
        ..ok(&code)
    };
    let server = TestServer::start(vec![slow, ok(&code)]);
    let mut source = remote(&server.url, &code);
    source.timeout = Duration::from_millis(300);
    assert_eq!(
        *load(&source, &CodeCache::default(), false).unwrap().code,
        code
    );
    assert_eq!(server.requests(), 2, "the first attempt timed out");

    let code = self::code("5xx");
    let unavailable = Answer {
        status: 503,
        body: Vec::new(),
        delay: Duration::ZERO,
    };
    let server = TestServer::start(vec![unavailable.clone(), unavailable, ok(&code)]);
    let mut source = remote(&server.url, &code);
    source.retries = 1;
    let error = load(&source, &CodeCache::default(), false).unwrap_err();
    assert!(
        error.to_string().ends_with("(2 attempts): HTTP status 503"),
        "{error}"
    );
    source.retries = 2;
    assert_eq!(
        *load(&source, &CodeCache::default(), false).unwrap().code,
        code
    );
}

#[test]
fn code_that_is_not_what_the_configuration_says_names_both_digests() {
    let code = code("mismatch");
    let server = TestServer::start(vec![ok(b"something else")]);
    let mut source = remote(&server.url, &code);
    source.sha256 = sha256_hex(b"what was configured");
    let error = load(&source, &CodeCache::default(), false).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "the code fetched from {} has sha256 {}, but the configuration says {}",
            server.url,
            sha256_hex(b"something else"),
            source.sha256
        )
    );
}

#[test]
fn nack_on_code_cache_miss_refuses_now_and_fills_the_cache_for_later() {
    let code = code("nack");
    let server = TestServer::start(vec![ok(&code)]);
    let source = remote(&server.url, &code);
    let cache = CodeCache::default();
    let error = load(&source, &cache, true).unwrap_err();
    assert!(matches!(error, FetchError::CacheMiss { .. }), "{error}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.get(&source.sha256).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(*load(&source, &cache, true).unwrap().code, code);
    assert_eq!(server.requests(), 1);
}

/// `load` with `nack_on_code_cache_miss` until its miss says no fetch is under way (at most
/// 10 s); that miss.
fn miss_once_fetched(source: &RemoteCode, cache: &CodeCache) -> FetchError {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let error = load(source, cache, true).unwrap_err();
        if !matches!(error, FetchError::CacheMiss { fetching: true, .. }) {
            return error;
        }
        assert!(Instant::now() < deadline, "still fetching: {error}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn nack_on_code_cache_miss_fetches_once_at_a_time_and_says_why_a_fetch_failed() {
    let code = code("nack-failing");
    // Code that is not the configured code, after 1 s (the three loads below come before).
    let server = TestServer::start(vec![Answer {
        delay: Duration::from_secs(1),
        ..ok(b"something else")
    }]);
    let source = remote(&server.url, &code);
    let cache = CodeCache::default();
    for _ in 0..3 {
        let error = load(&source, &cache, true).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} is not in the code cache (nack_on_code_cache_miss): refused for now while \
                 it is fetched in the background",
                server.url
            )
        );
    }
    // Refused again within 10 s of the failure, with its reason, without fetching again.
    let error = miss_once_fetched(&source, &cache);
    let message = error.to_string();
    assert!(
        message.contains("its last fetch failed under 10 s ago (the code fetched from")
            && message.contains("but the configuration says"),
        "{message}"
    );
    assert_eq!(server.requests(), 1, "one fetch for the four loads");
    // Past the 10 s, a load fetches again, and says why the last fetch failed.
    if let Some((_, at)) = memory()
        .get_mut(&source.sha256)
        .and_then(|entry| entry.failed.as_mut())
    {
        *at = Instant::now().checked_sub(NEGATIVE_CACHING).unwrap_or(*at);
    }
    let error = load(&source, &cache, true).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("fetched in the background again (the last fetch failed: the code fetched"),
        "{error}"
    );
    let _ = miss_once_fetched(&source, &cache);
    assert_eq!(server.requests(), 2);
}

#[test]
fn code_no_load_asked_for_in_a_day_leaves_memory_unless_it_is_wanted_or_coming() {
    let now = Instant::now();
    let entry = |used: Instant, fetching: bool| Entry {
        code: Some(Arc::new(Vec::new())),
        fetching,
        failed: None,
        used,
    };
    let mut entries: HashMap<String, Entry> = [
        ("old".to_string(), entry(now, false)),
        ("wanted".to_string(), entry(now, false)),
        ("coming".to_string(), entry(now, true)),
        ("recent".to_string(), entry(now + UNUSED_TTL, false)),
    ]
    .into_iter()
    .collect();
    evict_unused(
        &mut entries,
        now + UNUSED_TTL + Duration::from_secs(1),
        "wanted",
    );
    let mut left: Vec<&str> = entries.keys().map(String::as_str).collect();
    left.sort_unstable();
    assert_eq!(left, ["coming", "recent", "wanted"]);
}

/// A load that missed and then finds the code a background fetch brought meanwhile (the
/// fetch ended between its look and its request for a fetch) gets the code, and no second
/// fetch starts.
#[test]
fn a_miss_overtaken_by_its_fetch_gets_the_code_and_fetches_nothing() {
    let code = code("overtaken");
    let server = TestServer::start(vec![ok(&code)]);
    let source = remote(&server.url, &code);
    keep_in_memory(&source.sha256, &Arc::new(code.clone()));
    let fetched = fetch_in_background(&source, &CodeCache::default()).expect("the code");
    assert_eq!(*fetched, code);
    assert_eq!(server.requests(), 0);
    forget_in_memory(&source.sha256);
}

/// Code kept in memory is bounded in bytes: past the limit, the code no load asked for
/// longest goes first, never the code being kept now, and its entry stays (what it says of
/// fetches is kept).
#[test]
fn code_in_memory_past_its_byte_limit_leaves_the_least_recently_used_first() {
    let now = Instant::now();
    let entry = |bytes: usize, used: Instant| Entry {
        code: Some(Arc::new(vec![0; bytes])),
        fetching: false,
        failed: None,
        used,
    };
    let mut entries: HashMap<String, Entry> = [
        ("oldest".to_string(), entry(40, now)),
        ("older".to_string(), entry(40, now + Duration::from_secs(1))),
        (
            "recent".to_string(),
            entry(40, now + Duration::from_secs(2)),
        ),
        ("new".to_string(), entry(40, now)),
    ]
    .into_iter()
    .collect();
    evict_over(&mut entries, 100, "new");
    let mut with_code: Vec<&str> = entries
        .iter()
        .filter(|(_, entry)| entry.code.is_some())
        .map(|(sha256, _)| sha256.as_str())
        .collect();
    with_code.sort_unstable();
    assert_eq!(with_code, ["new", "recent"]);
    assert_eq!(entries.len(), 4, "entries stay without their code");
    // Under the limit nothing goes.
    evict_over(&mut entries, 100, "new");
    assert_eq!(entries.values().filter(|e| e.code.is_some()).count(), 2);
}

#[cfg(unix)]
#[test]
fn a_cache_file_that_is_a_fifo_or_a_link_is_not_read_and_a_shared_directory_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let code = code("hostile-disk");
    let sha256 = sha256_hex(&code);
    let directory = tempfile::tempdir().unwrap();
    let cache = CodeCache::new(Some(directory.path().to_path_buf()));
    let file = directory.path().join(format!("{sha256}.wasm"));
    // A FIFO would block a plain read for ever.
    let path = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let mut warnings = Vec::new();
    assert!(cache.lookup(&sha256, &mut warnings).is_none());
    assert!(
        warnings.len() == 1 && warnings[0].contains("is not used: not a regular file"),
        "{warnings:?}"
    );
    // A link to a file with the right code is not followed.
    std::fs::remove_file(&file).unwrap();
    let elsewhere = directory.path().join("elsewhere");
    std::fs::write(&elsewhere, &code).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    assert!(cache.get(&sha256).is_none());
    // A directory others may write to is not used, and the load says so.
    std::fs::remove_file(&file).unwrap();
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let server = TestServer::start(vec![ok(&code)]);
    let fetched = load(&remote(&server.url, &code), &cache, false).unwrap();
    assert_eq!(*fetched.code, code);
    assert!(
        fetched
            .warnings
            .iter()
            .any(|w| w.contains("is not used") && w.contains("is writable by other users")),
        "{:?}",
        fetched.warnings
    );
    assert!(!file.exists());
}

#[test]
fn an_unreachable_server_is_an_error_after_the_retries() {
    let code = code("unreachable");
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/plugin.wasm");
    let error = load(&remote(&url, &code), &CodeCache::default(), false).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot fetch {url} (2 attempts): ")),
        "{error}"
    );
}

/// A retry policy cannot hold a start or a reload for hours: the fetch gives up at its overall
/// limit, cutting the attempt under way short and starting no retry past it.
#[test]
fn a_fetch_gives_up_at_its_overall_limit_whatever_the_retry_policy() {
    let code = code("overall limit");
    let never_in_time = Answer {
        delay: Duration::from_secs(3),
        ..ok(&code)
    };
    let server = TestServer::start(vec![never_in_time]);
    let mut source = remote(&server.url, &code);
    source.timeout = Duration::from_secs(60);
    source.retries = 1000;
    let started = Instant::now();
    let error = fetch_within(&source, Duration::from_millis(400)).unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let FetchError::Failed {
        attempts, reason, ..
    } = &error
    else {
        panic!("{error}");
    };
    assert_eq!(*attempts, 1, "{error}");
    assert!(
        reason.ends_with(
            " what was left of the 400ms a fetch may take); no more retries, as a fetch may \
             take at most 400ms"
        ),
        "{error}"
    );
    assert_eq!(server.requests(), 1);

    // With no retry left, the attempt the limit cut short says so too.
    source.retries = 0;
    let error = fetch_within(&source, Duration::from_millis(400)).unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with(" what was left of the 400ms a fetch may take)"),
        "{error}"
    );
}
