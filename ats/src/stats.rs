//! Plugin metrics as Traffic Server stats: once a second, on a task thread, every counter and
//! gauge the plugins defined (`proxy_define_metric`) and every plugin's failure counters (HTTP
//! filters, network filters and services) are
//! copied into Traffic Server's stats, where `traffic_ctl metric get` and the stats plugins see
//! them: `plugin.pwhost_ats.<metric name>` and `plugin.pwhost_ats.<plugin>.<counter>`, and
//! the plugin's own `plugin.pwhost_ats.live_stream_contexts` (the plugins' stream contexts of
//! transactions and TCP connections in flight).
//! A histogram's stat is its last recorded value.

use std::collections::{HashMap, HashSet};
use std::ffi::{c_int, c_void, CString};
use std::sync::Mutex;

use crate::{diag, sys, GLOBAL};

/// How often the stats are brought up to date.
const PERIOD_MS: sys::TSHRTime = 1000;

/// The stat ids made so far, by name (Traffic Server's stats cannot be removed).
static STATS: Mutex<Option<HashMap<String, c_int>>> = Mutex::new(None);

/// Starts the periodic copy.
pub(crate) fn start() {
    // SAFETY: the handler lives for the process; the continuation gets its own mutex, so two
    // copies never run at once.
    unsafe {
        let cont = sys::TSContCreate(Some(on_period), sys::TSMutexCreate());
        sys::TSContScheduleEveryOnPool(cont, PERIOD_MS, sys::TS_THREAD_POOL_TASK);
    }
}

unsafe extern "C" fn on_period(
    _cont: sys::TSCont,
    _event: sys::TSEvent,
    _data: *mut c_void,
) -> c_int {
    if std::panic::catch_unwind(publish).is_err() {
        diag::error("publishing the plugins' metrics panicked");
    }
    0
}

/// Copies the metrics of the plugins in force into Traffic Server's stats.
fn publish() {
    let Some(global) = GLOBAL.get() else {
        return;
    };
    let (_, plugins) = global.live.current();
    // pwhost's own stats first: a plugin metric of the same name does not replace them.
    let mut values: Vec<(String, i64)> = vec![(
        "plugin.pwhost_ats.live_stream_contexts".to_string(),
        crate::host::LIVE_STREAMS.load(std::sync::atomic::Ordering::Relaxed),
    )];
    let every_plugin = plugins
        .http_filters()
        .chain(plugins.network_filters())
        .chain(plugins.services());
    // Plugins of one name (a filter and its companion service, or two unnamed ones) count in
    // one stat: theirs added up.
    let mut counters: Vec<(String, i64)> = Vec::new();
    for plugin in every_plugin {
        let name = plugins.config(plugin).display_name();
        for (counter, value) in plugins.counters(plugin).snapshot() {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            let stat = format!("plugin.pwhost_ats.{name}.{counter}");
            match counters.iter_mut().find(|(known, _)| *known == stat) {
                Some((_, total)) => *total = total.saturating_add(value),
                None => counters.push((stat, value)),
            }
        }
    }
    values.extend(counters);
    values.extend(
        plugins
            .shared_state()
            .metrics_snapshot()
            .into_iter()
            .map(|metric| (format!("plugin.pwhost_ats.{}", metric.name), metric.value)),
    );
    let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    let stats = stats.get_or_insert_with(HashMap::new);
    let mut published = HashSet::new();
    for (name, value) in values {
        if !published.insert(name.clone()) {
            // Two metrics under one stat name (a counter and a gauge of one name, or a plugin
            // metric named as one of pwhost's): the first keeps it, rather than each overwriting
            // the other every second.
            warn_once(&format!(
                "two metrics are named {name}: only the first is published"
            ));
            continue;
        }
        let id = match stats.get(&name) {
            Some(id) => *id,
            None => {
                // A name Traffic Server refused is not tried (and warned about) again.
                let id = create(&name).unwrap_or(-1);
                stats.insert(name, id);
                id
            }
        };
        if id < 0 {
            continue;
        }
        // SAFETY: `id` was returned by Traffic Server for a stat of type INT.
        unsafe { sys::TSStatIntSet(id, value) };
    }
}

/// Logs `warning` as a Traffic Server warning, the first time only.
fn warn_once(warning: &str) {
    static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned
        .get_or_insert_with(HashSet::new)
        .insert(warning.to_string())
    {
        diag::warning(warning);
    }
}

/// Finds or creates the integer stat `name`.
fn create(name: &str) -> Option<c_int> {
    let Ok(c_name) = CString::new(name) else {
        diag::warning(&format!(
            "cannot create stat {name:?}: a NUL byte in its name"
        ));
        return None;
    };
    let mut id: c_int = -1;
    // SAFETY: `c_name` is a NUL-terminated string that lives through the calls.
    unsafe {
        if sys::TSStatFindName(c_name.as_ptr(), &mut id) == sys::TS_SUCCESS {
            return Some(id);
        }
        let id = sys::TSStatCreate(
            c_name.as_ptr(),
            sys::TS_RECORDDATATYPE_INT,
            sys::TS_STAT_NON_PERSISTENT,
            sys::TS_STAT_SYNC_SUM,
        );
        if id == sys::TS_ERROR as c_int {
            diag::warning(&format!("cannot create stat {name}"));
            return None;
        }
        Some(id)
    }
}
