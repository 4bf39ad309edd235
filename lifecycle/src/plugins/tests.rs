use std::sync::Mutex;

use abi::{HeadersAction, InMemoryHost};
use runtime_api::{RuntimeConfig, TrapKind};

use super::*;
use crate::test_support::{
    corpus, corpus_options, load, load_on, wat_base64, Wasmtime, WasmtimeWith,
};

fn config_plugin(name: &str, vm_id: &str, header: &str) -> String {
    format!(
        "- name: {name}\n  configuration: '{{\"header\": \"{header}\", \"value\": \"{name}\"}}'\n  vm_config: {{vm_id: {vm_id}, code: {{local: {{filename: rust/plugin_config.wasm}}}}}}\n"
    )
}

/// A clock that moves only when told: the clock, and what moves it on.
fn manual_clock() -> (Clock, impl Fn(Duration)) {
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock: Clock = {
        let now = Arc::clone(&now);
        Arc::new(move || *now.lock().unwrap())
    };
    (clock, move |by: Duration| *now.lock().unwrap() += by)
}

fn worker(plugins: Plugins) -> Worker {
    Worker::new(Arc::new(plugins), || Box::new(InMemoryHost::new()))
}

/// Runs request headers through `plugin` and returns them as the plugin left them.
fn request(worker: &mut Worker, plugin: PluginId) -> Result<Vec<(String, String)>, String> {
    let Admission::Run(held) = worker.admit(plugin) else {
        return Err("not admitted".into());
    };
    let result = run_request(worker, &held);
    worker.release(held);
    result
}

fn run_request(worker: &mut Worker, held: &StreamVm) -> Result<Vec<(String, String)>, String> {
    let plugin = held.plugin();
    let vm = worker.vm(held).expect("this worker's copy");
    let stream = vm
        .create_http_context_for(held.root())
        .map_err(|e| e.to_string())?;
    let host = vm.host_as::<InMemoryHost>().expect("in-memory host");
    host.stream(stream).request_headers.add(b":path", b"/");
    let action = vm.on_request_headers(stream, 1, true);
    let headers = vm
        .host_as::<InMemoryHost>()
        .expect("in-memory host")
        .stream(stream)
        .request_headers
        .to_string_pairs();
    match action {
        Ok(HeadersAction::Continue) => Ok(headers),
        Ok(other) => Err(format!("{other:?}")),
        Err(error) => {
            let _ = worker.failed(plugin, &error);
            Err(error.to_string())
        }
    }
}

/// A stream's handle names its VM copy in the whole process: used by mistake on another
/// worker, whose first copy sits in the same slot, it finds no VM there, and releasing it
/// there leaves that worker's copy as it was.
#[test]
fn a_streams_handle_finds_no_vm_on_another_worker() {
    let plugins = Arc::new(load(&config_plugin("a", "shared", "x-a")).unwrap());
    let mut one = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    let mut other = Worker::new(plugins, || Box::new(InMemoryHost::new()));
    let plugin = PluginId(0);
    let Admission::Run(theirs) = other.admit(plugin) else {
        panic!("admitted");
    };
    let Admission::Run(held) = one.admit(plugin) else {
        panic!("admitted");
    };
    assert!(other.vm(&held).is_none(), "no VM of the other worker");
    other.release(held);
    assert!(
        other.vm(&theirs).is_some(),
        "its own stream still has its VM"
    );
    other.release(theirs);
}

#[test]
fn plugins_with_one_vm_key_share_a_module_and_each_keeps_its_configuration() {
    let yaml = [
        config_plugin("a", "shared", "x-a"),
        config_plugin("b", "shared", "x-b"),
        config_plugin("c", "other", "x-c"),
    ]
    .concat();
    let plugins = load(&yaml).unwrap();
    assert_eq!(
        plugins.module_count(),
        2,
        "a and b share one VM, c has its own"
    );
    let mut worker = worker(plugins);
    for (plugin, header) in [(0, "x-a"), (1, "x-b"), (2, "x-c")] {
        let headers = request(&mut worker, PluginId(plugin)).unwrap();
        let own: Vec<_> = headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-"))
            .collect();
        assert_eq!(own.len(), 1, "{headers:?}");
        assert_eq!(own[0].0, header);
    }
}

#[test]
fn a_plugin_that_rejects_its_configuration_is_refused_at_load_by_name() {
    let yaml = "- name: picky\n  configuration: 'not json'\n  vm_config: {code: {local: {filename: rust/plugin_config.wasm}}}\n";
    let error = load(yaml).err().expect("refused").to_string();
    assert_eq!(
        error,
        "plugin \"picky\" rejected its configuration: its proxy_on_configure returned false"
    );
    let missing = "- {name: gone, vm_config: {code: {local: {filename: no/such.wasm}}}}";
    let error = load(missing).err().expect("refused").to_string();
    assert!(
        error.starts_with("[0].vm_config.code: cannot read "),
        "{error}"
    );
}

/// A plugin named `name` with `plugins/wat/<wat>.wat` as its code, as a list entry.
fn wat_plugin(name: &str, wat: &str) -> String {
    format!(
        "- {{name: {name}, vm_config: {{vm_id: {name}, code: {{local: {{inline_bytes: {}}}}}}}}}\n",
        wat_base64(wat)
    )
}

#[test]
fn a_plugin_whose_vm_start_returns_false_is_refused_at_load_and_never_configured() {
    let yaml = wat_plugin("cold", "refuse_vm_start");
    let shared = SharedState::new();
    let error = load_on(&yaml, &Wasmtime, shared.clone())
        .err()
        .expect("refused");
    assert!(
        matches!(&error, LoadError::Rejected { plugin, .. } if plugin == "cold"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "plugin \"cold\" rejected its configuration: its proxy_on_vm_start returned false"
    );
    // As in Envoy, a root context that refused its VM is not configured: the plugin's
    // proxy_on_configure would have set `configured`.
    assert_eq!(shared.get("cold", b"configured"), None);

    // (That it would have: configured by hand, the same code sets the key.)
    let config = crate::parse(&yaml).unwrap().http_filters.remove(0);
    let CodeSource::Bytes(wasm) = &config.vm.code else {
        panic!("inline bytes");
    };
    let runtime = Wasmtime.runtime("wasmtime").unwrap();
    let plugin = abi::Plugin::load(&*runtime, wasm, abi_config(&config), shared.clone()).unwrap();
    let mut vm = Vm::new(&plugin, Box::new(InMemoryHost::new())).unwrap();
    assert!(vm.configure().unwrap());
    assert_eq!(
        shared.get("cold", b"configured").map(|(value, _)| value),
        Some(b"yes".to_vec())
    );
}

#[test]
fn a_plugin_that_traps_in_vm_start_or_configure_is_refused_at_load_with_the_trap() {
    for (wat, callback) in [
        ("trap_in_vm_start", "proxy_on_vm_start"),
        ("trap_in_configure", "proxy_on_configure"),
    ] {
        let error = load(&wat_plugin(wat, wat)).err().expect("refused");
        assert!(
            matches!(&error, LoadError::Rejected { plugin, .. } if plugin == wat),
            "{error:?}"
        );
        let message = error.to_string();
        let expected = format!(
            "plugin \"{wat}\" rejected its configuration: {callback} trapped in context 1: "
        );
        assert!(message.starts_with(&expected), "{message}");
        assert!(message.contains("unreachable"), "{message}");
    }
}

#[test]
fn a_deployment_with_a_refusing_plugin_is_refused_whole_and_the_one_running_keeps_running() {
    let running = load(&config_plugin("kept", "v", "x-kept")).unwrap();
    // A good plugin, a plugin sharing its VM that rejects its configuration, and one that
    // traps: the first refusal is reported, naming the plugin whose root context refused,
    // not the first plugin of the VM.
    let update = [
        config_plugin("fine", "v", "x-fine"),
        "- name: picky\n  configuration: 'not json'\n  vm_config: {vm_id: v, code: {local: {filename: rust/plugin_config.wasm}}}\n".into(),
        wat_plugin("trap", "trap_in_configure"),
    ]
    .concat();
    let error = Plugins::load_replacing(
        &running,
        &crate::parse(&update).unwrap(),
        &Wasmtime,
        &corpus_options(),
    )
    .err()
    .expect("refused");
    assert_eq!(
        error.to_string(),
        "plugin \"picky\" rejected its configuration: its proxy_on_configure returned false"
    );
    // The deployment in force still admits streams and runs them as before.
    let mut worker = worker(running);
    let headers = request(&mut worker, PluginId(0)).unwrap();
    assert!(
        headers.contains(&("x-kept".into(), "kept".into())),
        "{headers:?}"
    );
    assert_eq!(
        worker.plugins().counters(PluginId(0)).snapshot(),
        Counters::default().snapshot(),
        "no failures"
    );
}

fn trapping(policy: &str) -> Plugins {
    load(&format!(
        "{{name: trap, {policy} vm_config: {{code: {{local: {{inline_bytes: {}}}}}}}}}",
        wat_base64("trap_in_request_headers")
    ))
    .unwrap()
}

#[test]
fn fail_closed_answers_every_later_stream_with_a_local_reply() {
    let mut worker = worker(trapping("failure_policy: FAIL_CLOSED,"));
    let plugin = PluginId(0);
    assert!(request(&mut worker, plugin)
        .unwrap_err()
        .contains("trapped"));
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    let counters = worker.plugins().counters(plugin).snapshot();
    assert_eq!(counters[0], ("failed_by_trap", 1));
    assert_eq!(
        counters[6],
        ("closed", 3),
        "the failing stream and the two after it"
    );
}

/// A configuration update keeps counting where the plugin of the same name and kind left
/// off (a proxy's metrics by plugin name would otherwise fall back to zero at each update);
/// a plugin new to the deployment starts from zero.
#[test]
fn a_configuration_update_carries_a_plugins_counters_by_name() {
    let policy = "failure_policy: FAIL_CLOSED,";
    let text = |names: &[&str]| {
        names
            .iter()
            .map(|name| {
                format!(
                    "- {{name: {name}, {policy} vm_config: {{code: {{local: {{inline_bytes: {}}}}}}}}}\n",
                    wat_base64("trap_in_request_headers")
                )
            })
            .collect::<String>()
    };
    let first = load(&text(&["trap"])).unwrap();
    let mut worker = worker(first);
    assert!(request(&mut worker, PluginId(0)).is_err());
    let update = Plugins::load_replacing(
        worker.plugins(),
        &crate::parse(&text(&["newcomer", "trap"])).unwrap(),
        &Wasmtime,
        &corpus_options(),
    )
    .unwrap();
    assert_eq!(
        update.counters(PluginId(1)).snapshot()[0],
        ("failed_by_trap", 1)
    );
    assert_eq!(update.counters(PluginId(1)).snapshot()[6], ("closed", 1));
    assert_eq!(
        update.counters(PluginId(0)).snapshot(),
        Counters::default().snapshot()
    );
}

#[test]
fn fail_open_passes_later_streams_on_without_the_plugin() {
    let mut worker = worker(trapping("fail_open: true,"));
    let plugin = PluginId(0);
    assert!(request(&mut worker, plugin).is_err());
    assert!(matches!(worker.admit(plugin), Admission::FailOpen));
    assert_eq!(
        worker.plugins().counters(plugin).snapshot()[5],
        ("bypassed", 2),
        "the failing stream and the one after it"
    );
}

/// Plugins sharing a VM keep their own failure policies, as in Envoy (each plugin's handle
/// stays on the VM it got): once the copy fails, the `FAIL_RELOAD` plugin gets a fresh copy
/// after its backoff, and the `FAIL_CLOSED` one, which ran on the failed copy, stays failed.
#[test]
fn plugins_sharing_a_vm_keep_their_own_failure_policies() {
    let (clock, advance) = manual_clock();
    let trap = wat_base64("trap_in_request_headers");
    let plugins = load(&format!(
        "- {{name: reloads, failure_policy: FAIL_RELOAD, reload_config: {{backoff: \
         {{base_interval: 1s, max_interval: 2s}}}}, vm_config: {{vm_id: shared, code: {{local: \
         {{inline_bytes: {trap}}}}}}}}}\n\
         - {{name: stays, failure_policy: FAIL_CLOSED, vm_config: {{vm_id: shared, code: \
         {{local: {{inline_bytes: {trap}}}}}}}}}\n"
    ))
    .unwrap();
    assert_eq!(plugins.module_count(), 1, "one VM for both");
    let mut worker = worker(plugins).with_clock(clock);
    let (reloads, stays) = (PluginId(0), PluginId(1));
    assert!(
        request(&mut worker, stays).is_err(),
        "the shared copy traps"
    );
    assert!(matches!(worker.admit(reloads), Admission::FailClosed));
    advance(Duration::from_secs(3));
    let Admission::Run(fresh) = worker.admit(reloads) else {
        panic!("the reloading plugin gets a fresh copy past its backoff");
    };
    worker.release(fresh);
    assert!(
        matches!(worker.admit(stays), Admission::FailClosed),
        "the plugin failing closed stays failed"
    );
    let closed = worker.plugins().counters(stays).snapshot()[6];
    assert_eq!(
        closed,
        ("closed", 2),
        "its failing stream and the one after"
    );
}

/// What a configuration takes but does nothing with is said at load: a capability name that
/// allows nothing, a service's failure policy, a remote code's cluster.
#[test]
fn what_a_configuration_takes_but_does_nothing_with_is_warned_of() {
    let plugins = load(
        "- {name: typo, capability_restriction_config: {allowed_capabilities: \
         {proxy_log: {}, proxy_lgo: {}, proxy_on_request_headers: {}}}, vm_config: {code: \
         {local: {filename: rust/http_headers.wasm}}}}\n",
    )
    .unwrap();
    assert_eq!(
        plugins.warnings(),
        [
            "plugin \"typo\": [0].capability_restriction_config.allowed_capabilities: \
             \"proxy_lgo\" is no host \
          function or callback of any Proxy-Wasm ABI version, so it allows nothing (misspelt?)"
        ]
    );
    assert!(abi::is_capability("fd_write") && abi::is_capability("proxy_on_tick"));
    assert!(abi::is_capability("proxy_get_configuration"), "ABI 0.1.0's");
    let service = load(
        "- name: envoy.bootstrap.wasm\n  typed_config:\n    \"@type\": \
         type.googleapis.com/envoy.extensions.wasm.v3.WasmService\n    singleton: true\n    \
         config: {name: ticker, failure_policy: FAIL_RELOAD, vm_config: {code: {local: \
         {filename: rust/timers.wasm}}}}\n",
    )
    .unwrap();
    let warnings = service.warnings().join("\n");
    assert!(
        warnings.contains("failure_policy: has no effect on a service"),
        "{warnings}"
    );
    // A remote code's cluster (the warning is made before the code is fetched).
    let remote = crate::parse(
        "- {name: fetched, vm_config: {code: {remote: {http_uri: {uri: \"http://127.0.0.1:1/x\", \
         cluster: code_server, timeout: 1s}, sha256: \
         0000000000000000000000000000000000000000000000000000000000000000}}}}\n",
    )
    .unwrap();
    let config = remote.plugins().next().expect("one plugin");
    assert_eq!(
        configuration_warnings(config, false),
        [
            "[0].vm_config.code.remote.http_uri.cluster: \"code_server\" is not used: the code is \
          fetched from the URL itself (no cluster, so none of its TLS or proxy settings)"
        ]
    );
}

#[test]
fn fail_reload_makes_a_fresh_copy_with_a_backoff_that_doubles_up_to_the_max_interval() {
    let (clock, advance) = manual_clock();
    let plugins = trapping(
        "failure_policy: FAIL_RELOAD, reload_config: {backoff: {base_interval: 1s, max_interval: 60s}},",
    );
    let max = Duration::from_secs(60);
    let mut worker = worker(plugins).with_clock(clock);
    let plugin = PluginId(0);
    let reloads = |worker: &Worker| worker.plugins().counters(plugin).snapshot()[4].1;
    // The first copy fails at once, and so does every fresh copy. Each reload waits, since
    // the copy was made, the base interval doubled per reload in a row, plus a jitter of up
    // to half of that; the doubling stops at the max interval, and no wait, jitter included,
    // goes past it.
    assert!(request(&mut worker, plugin).is_err());
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    let waits = [1, 2, 4, 8, 16, 32, 60, 60, 60].map(Duration::from_secs);
    for (reload, wait) in (1..).zip(waits) {
        let just_short = wait - Duration::from_millis(1);
        advance(just_short);
        assert!(
            matches!(worker.admit(plugin), Admission::FailClosed),
            "reload {reload} waits at least {wait:?}"
        );
        advance((wait + wait / 2).min(max) - just_short);
        assert!(
            request(&mut worker, plugin).is_err(),
            "reload {reload} by {:?}: a fresh copy, which traps again",
            (wait + wait / 2).min(max)
        );
        assert_eq!(reloads(&worker), reload);
    }

    // A copy that ran the max interval before it failed ends the run of reloads: it is
    // replaced at once (it was made longer ago than the base interval), and the next wait is
    // back at the start of the doubling.
    advance(max);
    let Admission::Run(healthy) = worker.admit(plugin) else {
        panic!("a fresh copy after the max interval");
    };
    worker.release(healthy);
    advance(max);
    assert!(request(&mut worker, plugin).is_err(), "it fails at last");
    assert!(request(&mut worker, plugin).is_err(), "replaced at once");
    advance(Duration::from_millis(1999));
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    advance(Duration::from_millis(1001));
    assert!(matches!(worker.admit(plugin), Admission::Run(_)));
    assert_eq!(reloads(&worker), waits.len() as u64 + 3);
}

/// The jitter of a reload's wait is drawn once per failure: under traffic, each stream's
/// admission asking again would otherwise reload at the shortest of many draws, about the
/// base interval every time, and the jitter would spread no reloads.
#[test]
fn a_reload_wait_is_drawn_once_per_failure_and_holds_under_traffic() {
    let (clock, advance) = manual_clock();
    let plugins = trapping(
        "failure_policy: FAIL_RELOAD, reload_config: {backoff: {base_interval: 1s, max_interval: 60s}},",
    );
    let mut worker = worker(plugins).with_clock(clock);
    let plugin = PluginId(0);
    assert!(request(&mut worker, plugin).is_err());
    assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    let wait = worker.reload[0]
        .wait
        .expect("drawn at the first admission after the failure");
    assert!(
        Duration::from_secs(1) <= wait && wait < Duration::from_millis(1500),
        "{wait:?}"
    );
    advance(wait - Duration::from_millis(1));
    for _ in 0..1000 {
        assert!(matches!(worker.admit(plugin), Admission::FailClosed));
    }
    advance(Duration::from_millis(1));
    assert!(
        request(&mut worker, plugin).is_err(),
        "reloaded once the drawn wait passed (the fresh copy traps again)"
    );
    assert_eq!(worker.plugins().counters(plugin).snapshot()[4].1, 1);
}

#[test]
fn a_reload_wait_is_never_below_the_doubled_base_nor_above_the_max_interval() {
    let (base, max) = (Duration::from_millis(300), Duration::from_secs(5));
    for attempts in 0..40 {
        let doubled = base.saturating_mul(1 << attempts.min(31)).min(max);
        for _ in 0..100 {
            let wait = backoff(base, max, attempts);
            assert!(
                doubled <= wait && wait <= max,
                "attempt {attempts}: {wait:?}"
            );
            assert!(wait < doubled + doubled / 2 || wait == max, "{wait:?}");
        }
    }
    // A max interval equal to the base leaves no room for jitter.
    assert_eq!(backoff(base, base, 0), base);
}

#[test]
fn a_plugin_running_past_its_call_deadline_is_failed_by_deadline_and_its_policy_applies() {
    let engines = WasmtimeWith(RuntimeConfig {
        call_deadline: Some(Duration::from_millis(50)),
        ..RuntimeConfig::default()
    });
    let cases = [
        ("FAIL_CLOSED", OnFailure::FailClosed, ("closed", 2)),
        ("FAIL_OPEN", OnFailure::FailOpen, ("bypassed", 2)),
    ];
    for (policy, on_failure, (answered, streams)) in cases {
        let yaml = format!(
            "{{name: spin, failure_policy: {policy}, vm_config: {{code: {{local: {{inline_bytes: {}}}}}}}}}",
            wat_base64("infinite_loop")
        );
        let mut worker = worker(load_on(&yaml, &engines, SharedState::new()).unwrap());
        let plugin = PluginId(0);
        let Admission::Run(held) = worker.admit(plugin) else {
            panic!("admitted");
        };
        let vm = worker.vm(&held).expect("this worker's copy");
        let stream = vm.create_http_context_for(held.root()).unwrap();
        // proxy_on_request_headers never returns: the deadline stops it.
        let error = vm.on_request_headers(stream, 0, true).unwrap_err();
        assert_eq!(
            error.trap().map(|trap| &trap.kind),
            Some(&TrapKind::DeadlineExceeded)
        );
        assert_eq!(worker.failed(plugin, &error), on_failure, "{policy}");
        worker.release(held);
        let later = worker.admit(plugin);
        match on_failure {
            OnFailure::FailClosed => assert!(matches!(later, Admission::FailClosed), "{policy}"),
            OnFailure::FailOpen => assert!(matches!(later, Admission::FailOpen), "{policy}"),
        }
        let counters = worker.plugins().counters(plugin).snapshot();
        assert_eq!(counters[0], ("failed_by_trap", 0), "{policy}");
        assert_eq!(counters[1], ("failed_by_deadline", 1), "{policy}");
        assert!(
            counters.contains(&(answered, streams)),
            "{policy}: the stream stopped and the one after it: {counters:?}"
        );
    }
}

#[test]
fn each_worker_thread_has_its_own_copy() {
    let plugins = Arc::new(trapping("failure_policy: FAIL_CLOSED,"));
    let mut here = Worker::new(Arc::clone(&plugins), || Box::new(InMemoryHost::new()));
    assert!(request(&mut here, PluginId(0)).is_err());
    assert!(matches!(here.admit(PluginId(0)), Admission::FailClosed));
    // The copy of another thread has not failed.
    let other = std::thread::spawn(move || {
        let mut there = Worker::new(plugins, || Box::new(InMemoryHost::new()));
        matches!(there.admit(PluginId(0)), Admission::Run(_))
    });
    assert!(other.join().unwrap());
}

#[test]
fn a_replaced_copy_stays_with_its_streams_and_goes_away_with_the_last() {
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock: Clock = {
        let now = Arc::clone(&now);
        Arc::new(move || *now.lock().unwrap())
    };
    let retired = Arc::new(Mutex::new(0));
    let plugins = trapping(
        "failure_policy: FAIL_RELOAD, reload_config: {backoff: {base_interval: 1s, max_interval: 60s}},",
    );
    let mut worker = worker(plugins).with_clock(clock).on_retire({
        let retired = Arc::clone(&retired);
        Box::new(move |_copy, _vm, _roots| *retired.lock().unwrap() += 1)
    });
    let plugin = PluginId(0);
    let Admission::Run(in_flight) = worker.admit(plugin) else {
        panic!("the first copy is admitted");
    };
    // Another stream fails the copy; after the backoff a new stream gets a fresh copy.
    assert!(request(&mut worker, plugin).is_err());
    *now.lock().unwrap() += Duration::from_secs(2);
    let Admission::Run(fresh) = worker.admit(plugin) else {
        panic!("a fresh copy after the backoff");
    };
    assert!(!worker.vm(&fresh).unwrap().is_failed());
    // The stream that started on the old copy still finds it (failed), not the fresh one;
    // only the fresh one is current, and the old one is visited as replaced.
    assert!(worker.vm(&in_flight).unwrap().is_failed());
    let mut current = Vec::new();
    worker.for_each_copy(|_, vm, _| current.push(vm.is_failed()));
    assert_eq!(current, [false]);
    let mut replaced = Vec::new();
    worker.for_each_replaced_copy(|_, vm| replaced.push(vm.is_failed()));
    assert_eq!(replaced, [true]);
    assert_eq!(*retired.lock().unwrap(), 0, "the old copy is still held");
    worker.release(in_flight);
    assert_eq!(*retired.lock().unwrap(), 1, "gone with its last stream");
    let mut replaced = 0;
    worker.for_each_replaced_copy(|_, _| replaced += 1);
    assert_eq!(replaced, 0);
    worker.release(fresh);
    assert_eq!(*retired.lock().unwrap(), 1, "the current copy stays");
    drop(worker);
    assert_eq!(*retired.lock().unwrap(), 2, "and goes with the worker");
}

#[test]
fn a_copy_that_cannot_start_on_a_thread_says_which_plugin_and_why() {
    // `Plugins::single` skips the check at load, so the refusal shows on the worker.
    let wasm = std::fs::read(corpus().join("rust/plugin_config.wasm")).unwrap();
    let config = crate::parse("- {name: picky, configuration: 'not json', vm_config: {code: {local: {inline_string: x}}}}")
        .unwrap()
        .http_filters
        .remove(0);
    let runtime = Wasmtime.runtime("wasmtime").unwrap();
    let loaded =
        abi::Plugin::load(&*runtime, &wasm, abi_config(&config), SharedState::new()).unwrap();
    let mut worker = worker(Plugins::single(config, loaded));
    let failure = worker.start(PluginId(0)).unwrap_err();
    assert_eq!(failure.plugin, PluginId(0));
    assert_eq!(failure.step, StartStep::Configure);
    assert_eq!(failure.to_string(), "its proxy_on_configure returned false");
    assert!(matches!(worker.admit(PluginId(0)), Admission::FailClosed));
    assert_eq!(
        worker.plugins().counters(PluginId(0)).snapshot()[3],
        ("failed_to_start", 1)
    );
}

#[test]
fn a_worker_is_woken_to_deliver_the_queue_notifications_of_its_copies() {
    let plugins = Arc::new(
        load("- name: queue\n  vm_config: {vm_id: q, code: {local: {filename: rust/shared_queue.wasm}}}\n")
            .unwrap(),
    );
    // Each copy registers the queue as it starts; the last to register owns the notifications.
    let mut producer = worker_of(&plugins);
    let Admission::Run(producing) = producer.admit(PluginId(0)) else {
        panic!("admitted");
    };
    let (wake_tx, wake_rx) = std::sync::mpsc::channel();
    let mut owner = worker_of(&plugins).on_queue_ready(Arc::new(move || {
        let _ = wake_tx.send(());
    }));
    let Admission::Run(owning) = owner.admit(PluginId(0)) else {
        panic!("admitted");
    };
    owner.release(owning);
    assert!(wake_rx.try_recv().is_err(), "nothing enqueued yet");

    // The producer's stream enqueues its path.
    run_request(&mut producer, &producing).unwrap();
    producer.release(producing);
    wake_rx.try_recv().expect("the owner's worker was woken");
    assert!(owner.dispatch_queue_ready().is_empty());
    let (_, vm, _) = owner.copy_of(PluginId(0)).expect("the owner's copy");
    let logs: Vec<String> = vm
        .host_as::<InMemoryHost>()
        .expect("in-memory host")
        .logs
        .iter()
        .map(|l| l.message.clone())
        .collect();
    assert!(logs.contains(&"dequeued: /".to_string()), "{logs:?}");
}

fn worker_of(plugins: &Arc<Plugins>) -> Worker {
    Worker::new(Arc::clone(plugins), || Box::new(InMemoryHost::new()))
}

#[test]
fn a_stream_failed_closed_has_envoys_details_naming_the_plugin() {
    assert_eq!(crate::fail_stream_details("auth"), "wasm_fail_stream{auth}");
    assert_eq!(
        crate::fail_stream_details("my auth\tplugin"),
        "wasm_fail_stream{my_auth_plugin}",
        "no whitespace in details, as Envoy"
    );
}

/// A copy's root contexts end with it (`proxy_on_done`, then `proxy_on_delete` if done), as a
/// plugin's do in proxy-wasm-cpp-host when its handle goes: at a configuration update, when a
/// worker ends. An embedder that ended them itself says so, and they are not ended twice.
#[test]
fn a_copy_going_away_ends_its_root_contexts_unless_the_embedder_did() {
    let logs_at_retire = |ended_by_embedder: bool| {
        let plugins =
            load("{name: cov, vm_config: {code: {local: {filename: rust/abi_coverage.wasm}}}}")
                .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut worker = worker(plugins).on_retire({
            let seen = Arc::clone(&seen);
            Box::new(move |_copy, vm, _roots| {
                let host = vm.host_as::<InMemoryHost>().expect("in-memory host");
                seen.lock()
                    .unwrap()
                    .extend(host.logs.iter().map(|log| log.message.clone()));
            })
        });
        let Admission::Run(held) = worker.admit(PluginId(0)) else {
            panic!("admitted");
        };
        worker.release(held);
        if ended_by_embedder {
            worker.roots_ended();
        }
        drop(worker);
        let seen = seen.lock().unwrap().clone();
        seen
    };
    // abi_coverage's root answers its first `proxy_on_done` with "pending".
    assert!(logs_at_retire(false).contains(&"root on_done: pending".to_string()));
    assert!(!logs_at_retire(true)
        .iter()
        .any(|m| m.starts_with("root on_done")));
}
