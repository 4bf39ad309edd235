//! State shared between VMs: shared data, shared queues, metrics and foreign functions.
//!
//! A [`SharedState`] is created by the embedder and handed to every VM that should see the same
//! data (typically all VMs of one process). It is thread-safe; VMs on different threads share it.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};

use rustc_hash::FxHashMap;

use crate::{ForeignFunction, Status};

/// Shared data, queues, metrics and foreign functions, shared by every VM created with the same
/// `SharedState`.
#[derive(Clone)]
pub struct SharedState {
    inner: Arc<Inner>,
}

impl Default for SharedState {
    /// A new shared state offering Envoy's foreign functions, with the default
    /// [`SharedLimits`].
    fn default() -> Self {
        SharedState::with_limits(SharedLimits::default())
    }
}

#[derive(Default)]
struct Inner {
    data: RwLock<SharedData>,
    queues: Mutex<QueueRegistry>,
    metrics: Mutex<MetricRegistry>,
    foreign_functions: RwLock<FxHashMap<String, ForeignFunction>>,
    limits: SharedLimits,
}

/// How much of the host's memory plugins may fill through shared data and shared queues.
///
/// What a plugin keeps there lives outside its VM, so no memory cap on the plugin sees it, and
/// it outlives the plugin: without a bound, a plugin setting new keys, enqueueing for a
/// consumer that never dequeues or registering new queues grows the proxy until the system
/// stops it. Envoy has no such bound. Each limit is per VM id (the namespace shared data and
/// queues live in, named by the configuration, not by plugins), so one plugin reaching one
/// leaves others their room. A queue's items count against the queue's VM id, whoever
/// enqueued them, until they are dequeued (or the process ends): a queue no VM reads any more
/// keeps its VM id's room. Past a limit, the call is `INTERNAL_FAILURE` (a name too long,
/// `BAD_ARGUMENT`; the plugin's log says why, once) and what is stored stays as it was. Each
/// entry and item counts [`SharedLimits::OVERHEAD_BYTES`] beside its bytes (a shared data
/// entry its VM id's too), so that empty ones are not free; the host's own bookkeeping of
/// small entries may still take more than that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedLimits {
    /// Bytes of shared data (keys, values and the VM id of each entry) in one VM id's
    /// namespace.
    pub data_bytes_per_vm_id: usize,
    /// Bytes of items waiting in one VM id's queues, all together.
    pub queue_bytes_per_vm_id: usize,
    /// Queues in one VM id's namespace (a queue, once registered, stays until the process
    /// ends, across configuration reloads).
    pub queues_per_vm_id: usize,
    /// Metric names one VM id may add to the process's [`MAX_METRICS`], for each module loaded
    /// in it ([`MAX_METRICS_PER_VM_ID`] by default): a plugin putting tag values in its names
    /// may need more.
    pub metric_names_per_vm_id: usize,
}

impl SharedLimits {
    /// What each shared data entry or queue item counts beside its own bytes: about what the
    /// host keeps for it (allocations, the map's slot).
    pub const OVERHEAD_BYTES: usize = 128;

    /// The longest queue name (`BAD_ARGUMENT` past it), so that the names a VM id's queues
    /// keep are bounded too.
    pub const QUEUE_NAME_BYTES: usize = 4096;
}

impl Default for SharedLimits {
    /// 256 MiB of shared data and 64 MiB of waiting queue items per VM id, 4,096 queues and
    /// 8,192 new metric names per VM id.
    fn default() -> Self {
        SharedLimits {
            data_bytes_per_vm_id: 256 << 20,
            queue_bytes_per_vm_id: 64 << 20,
            queues_per_vm_id: 4096,
            metric_names_per_vm_id: MAX_METRICS_PER_VM_ID,
        }
    }
}

/// Tells an embedder, on the enqueuing thread, that a VM has queue notifications waiting, so
/// that it has the VM's own thread call [`crate::Vm::dispatch_queue_ready`] (see
/// [`crate::Vm::set_queue_wake`]). It runs while an enqueue returns: it should only schedule
/// work (post to an event loop, signal a condition), never call into a VM.
pub type QueueWake = Arc<dyn Fn() + Send + Sync>;

/// Where a queue's "ready" notifications go: the root context that registered it, in its VM,
/// which delivers them on its own thread ([`crate::Vm::dispatch_queue_ready`]).
#[derive(Clone)]
pub(crate) struct QueueOwner {
    /// The VM's channel of (root context, queue token).
    pub(crate) notify: Sender<(u32, u32)>,
    /// The VM's wake-up, if its embedder set one; shared by all of the VM's queues, so one set
    /// after a queue was registered still covers it.
    pub(crate) wake: Arc<RwLock<Option<QueueWake>>>,
    /// The root context.
    pub(crate) root: u32,
}

impl std::fmt::Debug for QueueOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueOwner")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl QueueOwner {
    /// The owner of a new VM's queues: root context 1 until a registration says otherwise.
    pub(crate) fn new(notify: Sender<(u32, u32)>) -> QueueOwner {
        QueueOwner {
            notify,
            wake: Arc::default(),
            root: 1,
        }
    }
}

/// A registration of a queue, as the registry keeps it: it does not keep the VM's state alive,
/// so it tells when the VM that registered is gone.
struct Registration {
    notify: Sender<(u32, u32)>,
    /// The VM's wake-up cell, which only the VM's own state holds strongly.
    wake: Weak<RwLock<Option<QueueWake>>>,
    root: u32,
    /// Notifications sent that the VM has not taken from its channel yet
    /// ([`SharedState::queue_notices_taken`]). No more are sent while they cover every item
    /// waiting: a plugin enqueueing and dequeueing in a loop would otherwise fill the VM's
    /// channel without bound (and have one callback delivered per turn of its loop).
    outstanding: usize,
}

impl Registration {
    fn of(owner: QueueOwner) -> Registration {
        Registration {
            wake: Arc::downgrade(&owner.wake),
            notify: owner.notify,
            root: owner.root,
            outstanding: 0,
        }
    }

    fn vm_alive(&self) -> bool {
        self.wake.strong_count() > 0
    }

    /// Tells the VM of one more of the queue's `waiting` items; its wake-up (if the embedder set
    /// one) if it did, `None` if the notifications it has not taken yet already cover them,
    /// `Err` if the VM is gone.
    fn notify(&mut self, token: u32, waiting: usize) -> Result<Option<QueueWake>, ()> {
        let wake = self.wake.upgrade().ok_or(())?;
        if self.outstanding >= waiting {
            return Ok(None);
        }
        self.notify.send((self.root, token)).map_err(|_| ())?;
        self.outstanding += 1;
        let wake = wake.read().unwrap_or_else(PoisonError::into_inner).clone();
        Ok(wake)
    }
}

struct Queue {
    items: VecDeque<Vec<u8>>,
    /// Its VM id's namespace (`QueueRegistry::namespaces`).
    namespace: usize,
    /// Who registered the queue, the newest last: the newest VM still alive is told. Earlier
    /// ones stay so that the queue falls back to them when a newer one goes away (e.g. the VM a
    /// configuration update started only to check it, then dropped when the update was refused).
    owners: Vec<Registration>,
}

/// Tells queue `token`'s owner (its newest registrant still alive) that it holds items, then
/// runs the owner's wake-up once the registry is unlocked (the wake-up may well enqueue or look
/// up queues itself). With no owner alive the items stay for a later one.
fn announce(mut registry: MutexGuard<'_, QueueRegistry>, token: u32) {
    let Some(queue) = (token as usize)
        .checked_sub(1)
        .and_then(|index| registry.queues.get_mut(index))
    else {
        return;
    };
    let mut wake = None;
    let waiting = queue.items.len();
    while let Some(owner) = queue.owners.last_mut() {
        match owner.notify(token, waiting) {
            Ok(owner_wake) => {
                wake = owner_wake;
                break;
            }
            Err(()) => {
                queue.owners.pop();
            }
        }
    }
    drop(registry);
    if let Some(wake) = wake {
        wake();
    }
}

#[derive(Default)]
struct QueueRegistry {
    /// Queue `token` is `queues[token - 1]`; tokens are never reused.
    queues: Vec<Queue>,
    by_name: FxHashMap<(String, String), u32>,
    /// Each VM id's queues, counted against [`SharedLimits`].
    namespaces: Vec<QueueNamespace>,
    namespace_of: FxHashMap<String, usize>,
}

/// What one VM id's queues hold, against [`SharedLimits`].
#[derive(Default)]
struct QueueNamespace {
    /// Its queues.
    queues: usize,
    /// What their waiting items count against [`SharedLimits::queue_bytes_per_vm_id`].
    waiting_bytes: usize,
}

#[derive(Clone)]
struct SharedValue {
    value: Vec<u8>,
    cas: u32,
}

/// Shared data of every vm_id, with one CAS counter for all keys (as proxy-wasm-cpp-host), so a
/// token of one key never matches another.
#[derive(Default)]
struct SharedData {
    entries: FxHashMap<(String, Vec<u8>), SharedValue>,
    last_cas: u32,
    /// What each VM id's entries count against [`SharedLimits::data_bytes_per_vm_id`].
    bytes_by_vm_id: FxHashMap<String, usize>,
}

/// What an entry or item of `bytes` counts against its limit.
fn counted(bytes: usize) -> usize {
    bytes.saturating_add(SharedLimits::OVERHEAD_BYTES)
}

impl SharedData {
    fn next_cas(&mut self) -> u32 {
        self.last_cas = self.last_cas.wrapping_add(1).max(1);
        self.last_cas
    }
}

/// The kind of a metric (`proxy_metric_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    /// A monotonically increasing count.
    Counter = 0,
    /// A value that goes up and down.
    Gauge = 1,
    /// A distribution of recorded values.
    Histogram = 2,
}

impl MetricType {
    /// The type for a raw guest argument.
    pub fn from_raw(raw: u64) -> Option<Self> {
        match raw {
            0 => Some(MetricType::Counter),
            1 => Some(MetricType::Gauge),
            2 => Some(MetricType::Histogram),
            _ => None,
        }
    }

    /// The spec's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        }
    }
}

/// A metric as reported to the embedder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    /// The name the plugin gave it.
    pub name: String,
    /// Its kind.
    pub metric_type: MetricType,
    /// Counter or gauge value; for a histogram, the last recorded value.
    pub value: i64,
    /// For a histogram, the distribution of what was recorded (in constant space: a
    /// proxy's histograms record on every request for as long as it runs).
    pub histogram: Option<Histogram>,
}

/// The upper bounds of a histogram's buckets: Envoy's default buckets.
pub const HISTOGRAM_BUCKETS: [u64; 19] = [
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    600_000,
    1_800_000,
    3_600_000,
    u64::MAX,
];

/// What a histogram recorded: how many values, their sum, and how many fell at or under each
/// bound of [`HISTOGRAM_BUCKETS`] (counts per bucket, not cumulative; the last bucket takes
/// everything above the one before).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Values recorded.
    pub count: u64,
    /// Their sum (saturating).
    pub sum: u64,
    /// Values per bucket.
    pub buckets: [u64; HISTOGRAM_BUCKETS.len()],
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.count = self.count.saturating_add(1);
        self.sum = self.sum.saturating_add(value);
        let bucket = HISTOGRAM_BUCKETS.partition_point(|&bound| bound < value);
        self.buckets[bucket.min(HISTOGRAM_BUCKETS.len() - 1)] += 1;
    }
}

/// Metrics, with Envoy's ids: each definition gets a new id (the same name and type share one
/// metric), whose two low bits are the type (first counter 4, gauge 5, histogram 6, then 8, 9,
/// 10, ...), so a call on a histogram id is refused before any lookup, as in Envoy.
#[derive(Default)]
struct MetricRegistry {
    metrics: Vec<Metric>,
    by_name: FxHashMap<(MetricType, String), usize>,
    /// Each id's metric (by index) and, for an id defined through the ABI, the VM that owns it
    /// (see [`SharedState::define_metric_for`]): only that VM reaches the metric by the id, as
    /// Envoy's ids belong to a VM.
    by_id: FxHashMap<u32, (usize, Option<Arc<str>>)>,
    /// The last id given for each metric (by index) to each owner, handed out again to that
    /// owner once `by_id` is full.
    last_id: FxHashMap<(usize, Option<Arc<str>>), u32>,
    /// How many ids were given out per type.
    defined: [u32; 3],
    /// How many names each owner (a module in a VM id) added, against
    /// [`SharedLimits::metric_names_per_vm_id`].
    added_by: FxHashMap<Arc<str>, usize>,
}

/// The type bits of a metric id.
const METRIC_TYPE_MASK: u32 = 3;

/// How many metric ids the process gives out before a definition of a metric defined before
/// gets that metric's last id again instead of a new one: a plugin defining metrics in a loop
/// (each definition a new id, as in Envoy) would otherwise grow the host's memory without a
/// limit, which no memory cap on the plugin sees.
const MAX_METRIC_IDS: usize = 1 << 20;

/// How many metrics (distinct names) the process keeps: a plugin defining new names in a loop
/// gets `INTERNAL_FAILURE` past it rather than growing the host's memory, and every scrape.
pub const MAX_METRICS: usize = 1 << 16;

/// How many of the process's metric names one VM id may add by default
/// ([`SharedLimits::metric_names_per_vm_id`]), for each module loaded in it (the owner of the
/// metric ids, [`SharedState::define_metric_for`]); defining a name another added does not
/// count. One plugin defining new names in a loop takes its own share, not every other
/// plugin's room under [`MAX_METRICS`].
pub const MAX_METRICS_PER_VM_ID: usize = 1 << 13;

/// The longest metric name (Envoy's stat names with their tags stay far below it).
pub const MAX_METRIC_NAME_BYTES: usize = 4096;

impl MetricRegistry {
    /// The metric of `id`, for `owner` (`None`: the embedder, which reaches every id).
    fn get_mut(&mut self, id: u32, owner: Option<&str>) -> Option<&mut Metric> {
        let (index, owned_by) = self.by_id.get(&id)?;
        if owner.is_some() && owned_by.as_deref() != owner {
            return None;
        }
        self.metrics.get_mut(*index)
    }

    /// Adds `offset` to a counter or gauge (see [`SharedState::increment_metric`]).
    fn increment(&mut self, owner: Option<&str>, id: u32, offset: i64) -> Status {
        if id & METRIC_TYPE_MASK >= MetricType::Histogram as u32 {
            return Status::BadArgument;
        }
        let Some(metric) = self.get_mut(id, owner) else {
            return Status::NotFound;
        };
        match metric.metric_type {
            MetricType::Counter if offset <= 0 => Status::BadArgument,
            MetricType::Counter | MetricType::Gauge => {
                metric.value = metric.value.saturating_add(offset);
                Status::Ok
            }
            MetricType::Histogram => Status::BadArgument,
        }
    }

    /// Records `value` (see [`SharedState::record_metric`]).
    fn record(&mut self, owner: Option<&str>, id: u32, value: u64) -> Status {
        let Some(metric) = self.get_mut(id, owner) else {
            return Status::NotFound;
        };
        let value_i64 = i64::try_from(value).unwrap_or(i64::MAX);
        match metric.metric_type {
            MetricType::Counter => metric.value = metric.value.saturating_add(value_i64),
            MetricType::Gauge => metric.value = value_i64,
            MetricType::Histogram => {
                metric.value = value_i64;
                metric
                    .histogram
                    .get_or_insert_with(Histogram::default)
                    .record(value);
            }
        }
        Status::Ok
    }

    /// A counter's or gauge's value (see [`SharedState::metric_value`]).
    fn value(&mut self, owner: Option<&str>, id: u32) -> Result<i64, Status> {
        if id & METRIC_TYPE_MASK >= MetricType::Histogram as u32 {
            return Err(Status::BadArgument);
        }
        self.get_mut(id, owner)
            .map(|m| m.value)
            .ok_or(Status::NotFound)
    }
}

impl SharedState {
    /// A new shared state: no data, queues or metrics, and Envoy's foreign functions
    /// (`compress`, `uncompress`, `set_envoy_filter_state`, `declare_property`,
    /// `clear_route_cache`, `verify_signature`, `sign`, `expr_create`, `expr_evaluate`,
    /// `expr_delete`).
    pub fn new() -> Self {
        SharedState::default()
    }

    /// [`SharedState::new`] with other limits on shared data and queues.
    pub fn with_limits(limits: SharedLimits) -> Self {
        let shared = SharedState {
            inner: Arc::new(Inner {
                limits,
                ..Inner::default()
            }),
        };
        crate::foreign::register(&shared);
        shared
    }

    /// The limits on shared data and queues.
    pub fn limits(&self) -> SharedLimits {
        self.inner.limits
    }

    /// The value and CAS token of a shared data key in `vm_id`'s namespace.
    pub fn get(&self, vm_id: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        let data = self
            .inner
            .data
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        data.entries
            .get(&(vm_id.to_string(), key.to_vec()))
            .map(|v| (v.value.clone(), v.cas))
    }

    /// Sets a shared data key. `cas` 0 sets unconditionally; otherwise it must equal the key's
    /// current CAS token, or the call fails with [`Status::CasMismatch`]. A missing key is set
    /// whatever `cas` says, as in proxy-wasm-cpp-host. [`Status::InternalFailure`] if the VM
    /// id's data would grow past [`SharedLimits::data_bytes_per_vm_id`].
    pub fn set(&self, vm_id: &str, key: &[u8], value: &[u8], cas: u32) -> Status {
        let mut data = self
            .inner
            .data
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let key = (vm_id.to_string(), key.to_vec());
        // Each entry keeps its own copy of the VM id.
        let entry_bytes = |value: usize| counted(vm_id.len() + key.1.len() + value);
        let mut replaced = 0;
        if let Some(current) = data.entries.get(&key) {
            if cas != 0 && cas != current.cas {
                return Status::CasMismatch;
            }
            replaced = entry_bytes(current.value.len());
        }
        let used = data.bytes_by_vm_id.get(vm_id).copied().unwrap_or(0);
        let after = used
            .saturating_sub(replaced)
            .saturating_add(entry_bytes(value.len()));
        if after > self.inner.limits.data_bytes_per_vm_id && after > used {
            return Status::InternalFailure;
        }
        match data.bytes_by_vm_id.get_mut(vm_id) {
            Some(bytes) => *bytes = after,
            None => {
                data.bytes_by_vm_id.insert(vm_id.to_string(), after);
            }
        }
        let cas = data.next_cas();
        data.entries.insert(
            key,
            SharedValue {
                value: value.to_vec(),
                cas,
            },
        );
        Status::Ok
    }

    /// Every shared data entry of `vm_id`, sorted by key.
    pub fn data_snapshot(&self, vm_id: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let data = self
            .inner
            .data
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut entries: Vec<_> = data
            .entries
            .iter()
            .filter(|((vm, _), _)| vm == vm_id)
            .map(|((_, k), v)| (k.clone(), v.value.clone()))
            .collect();
        entries.sort();
        entries
    }

    fn queues(&self) -> MutexGuard<'_, QueueRegistry> {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers queue `name` in `vm_id`'s namespace for `owner` and returns its token.
    /// Registering an existing name again keeps its items and token and moves the notifications
    /// to the new owner (as in proxy-wasm-cpp-host, the last registration wins), who is told at
    /// once of items already waiting: items left for an earlier owner (a VM copy that failed or
    /// was replaced before it dequeued them) would otherwise wait for the next enqueue. When the
    /// new owner's VM goes away, the notifications go back to the newest earlier owner alive.
    /// A new name past [`SharedLimits::queues_per_vm_id`] is [`Status::InternalFailure`], a
    /// name longer than [`SharedLimits::QUEUE_NAME_BYTES`] [`Status::BadArgument`].
    pub(crate) fn register_queue(
        &self,
        vm_id: &str,
        name: &str,
        owner: QueueOwner,
    ) -> Result<u32, Status> {
        let mut registry = self.queues();
        let key = (vm_id.to_string(), name.to_string());
        let mut owner = Registration::of(owner);
        if let Some(token) = registry.by_name.get(&key).copied() {
            let queue = &mut registry.queues[token as usize - 1];
            // This VM's notifications not taken yet still count: registering again (in a loop)
            // must not send more than its waiting items need.
            owner.outstanding = queue
                .owners
                .iter()
                .filter(|earlier| earlier.wake.ptr_eq(&owner.wake))
                .map(|earlier| earlier.outstanding)
                .max()
                .unwrap_or(0);
            // Gone VMs, and this VM's earlier registration (another root context's), go.
            queue
                .owners
                .retain(|earlier| earlier.vm_alive() && !earlier.wake.ptr_eq(&owner.wake));
            queue.owners.push(owner);
            if !queue.items.is_empty() {
                announce(registry, token);
            }
            return Ok(token);
        }
        if name.len() > SharedLimits::QUEUE_NAME_BYTES {
            return Err(Status::BadArgument);
        }
        let namespace = match registry.namespace_of.get(vm_id) {
            Some(&namespace) => namespace,
            None => {
                registry.namespaces.push(QueueNamespace::default());
                let namespace = registry.namespaces.len() - 1;
                registry.namespace_of.insert(vm_id.to_string(), namespace);
                namespace
            }
        };
        let queues = &mut registry.namespaces[namespace].queues;
        if *queues >= self.inner.limits.queues_per_vm_id {
            return Err(Status::InternalFailure);
        }
        *queues += 1;
        registry.queues.push(Queue {
            items: VecDeque::new(),
            namespace,
            owners: vec![owner],
        });
        let token = registry.queues.len() as u32;
        registry.by_name.insert(key, token);
        Ok(token)
    }

    /// Takes `owner`'s VM off every queue it registered (it failed, or is going away) and tells
    /// the owner each queue falls back to of the items waiting there, which this VM may have
    /// been told of and will never dequeue.
    pub(crate) fn release_queues(&self, owner: &QueueOwner) {
        let vm = Arc::downgrade(&owner.wake);
        let mut registry = self.queues();
        let mut waiting = Vec::new();
        for (index, queue) in registry.queues.iter_mut().enumerate() {
            let owned = queue
                .owners
                .last()
                .is_some_and(|last| last.wake.ptr_eq(&vm));
            queue
                .owners
                .retain(|registered| !registered.wake.ptr_eq(&vm));
            if owned && !queue.items.is_empty() && !queue.owners.is_empty() {
                waiting.push(index as u32 + 1);
            }
        }
        drop(registry);
        for token in waiting {
            announce(self.queues(), token);
        }
    }

    /// Notes that the VM of `owner` took notifications `taken` (root context, queue token) from
    /// its channel, to deliver them: they no longer count as outstanding (see
    /// `Registration::outstanding`).
    pub(crate) fn queue_notices_taken(&self, owner: &QueueOwner, taken: &[(u32, u32)]) {
        let vm = Arc::downgrade(&owner.wake);
        let mut registry = self.queues();
        for (_, token) in taken.iter().filter(|(root, _)| *root != 0) {
            let Some(queue) = token
                .checked_sub(1)
                .and_then(|index| registry.queues.get_mut(index as usize))
            else {
                continue;
            };
            if let Some(registration) = queue.owners.iter_mut().find(|r| r.wake.ptr_eq(&vm)) {
                registration.outstanding = registration.outstanding.saturating_sub(1);
            }
        }
    }

    /// The token of queue `name` in `vm_id`'s namespace.
    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.queues()
            .by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    /// Appends an item to a queue and tells its owner, unless the notifications its owner has
    /// not taken yet cover every item waiting. [`Status::InternalFailure`] if the
    /// waiting items of the queue's VM id would grow past
    /// [`SharedLimits::queue_bytes_per_vm_id`].
    pub fn enqueue(&self, token: u32, item: &[u8]) -> Status {
        let limit = self.inner.limits.queue_bytes_per_vm_id;
        let mut registry = self.queues();
        let QueueRegistry {
            queues, namespaces, ..
        } = &mut *registry;
        let Some(queue) = token
            .checked_sub(1)
            .and_then(|i| queues.get_mut(i as usize))
        else {
            return Status::NotFound;
        };
        let waiting = &mut namespaces[queue.namespace].waiting_bytes;
        let after = waiting.saturating_add(counted(item.len()));
        if after > limit {
            return Status::InternalFailure;
        }
        *waiting = after;
        queue.items.push_back(item.to_vec());
        announce(registry, token);
        Status::Ok
    }

    /// Takes the oldest item of a queue: [`Status::Empty`] if there is none, [`Status::NotFound`]
    /// if there is no such queue.
    pub fn dequeue(&self, token: u32) -> Result<Vec<u8>, Status> {
        let mut registry = self.queues();
        let QueueRegistry {
            queues, namespaces, ..
        } = &mut *registry;
        let queue = token
            .checked_sub(1)
            .and_then(|i| queues.get_mut(i as usize))
            .ok_or(Status::NotFound)?;
        let item = queue.items.pop_front().ok_or(Status::Empty)?;
        let waiting = &mut namespaces[queue.namespace].waiting_bytes;
        *waiting = waiting.saturating_sub(counted(item.len()));
        // A drained queue gives back the slots a burst grew it to (a deque keeps them), or the
        // limit on waiting items would not bound what queues hold.
        let capacity = queue.items.capacity();
        if capacity > 64 && queue.items.len() <= capacity / 4 {
            queue.items.shrink_to(capacity / 2);
        }
        Ok(item)
    }

    /// Offers `function` to plugins under `name` (replacing any function of that name).
    pub fn register_foreign_function(&self, name: &str, function: ForeignFunction) {
        self.inner
            .foreign_functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), function);
    }

    /// The foreign function called `name`.
    pub fn foreign_function(&self, name: &[u8]) -> Option<ForeignFunction> {
        let name = std::str::from_utf8(name).ok()?;
        self.inner
            .foreign_functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn metrics(&self) -> std::sync::MutexGuard<'_, MetricRegistry> {
        self.inner
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Defines a metric and returns a new id for it; a name defined before with the same type
    /// is the same metric. A name over [`MAX_METRIC_NAME_BYTES`] is `BAD_ARGUMENT`, a new one
    /// past [`MAX_METRICS`] `INTERNAL_FAILURE`.
    pub fn define_metric(&self, metric_type: MetricType, name: &str) -> Result<u32, Status> {
        self.define(None, metric_type, name)
    }

    /// [`SharedState::define_metric`], the id owned by `owner` if given.
    fn define(
        &self,
        owner: Option<&str>,
        metric_type: MetricType,
        name: &str,
    ) -> Result<u32, Status> {
        if name.len() > MAX_METRIC_NAME_BYTES {
            return Err(Status::BadArgument);
        }
        let share = self.inner.limits.metric_names_per_vm_id;
        let mut registry = self.metrics();
        let key = (metric_type, name.to_string());
        let index = match registry.by_name.get(&key) {
            Some(index) => *index,
            None if registry.metrics.len() >= MAX_METRICS => return Err(Status::InternalFailure),
            None if owner.is_some_and(|owner| {
                registry.added_by.get(owner).copied().unwrap_or(0) >= share
            }) =>
            {
                return Err(Status::InternalFailure)
            }
            None => {
                if let Some(owner) = owner {
                    *registry.added_by.entry(owner.into()).or_default() += 1;
                }
                registry.metrics.push(Metric {
                    name: name.to_string(),
                    metric_type,
                    value: 0,
                    histogram: (metric_type == MetricType::Histogram).then(Histogram::default),
                });
                let index = registry.metrics.len() - 1;
                registry.by_name.insert(key, index);
                index
            }
        };
        let owner: Option<Arc<str>> = owner.map(Into::into);
        let last = (index, owner.clone());
        if registry.by_id.len() >= MAX_METRIC_IDS {
            if let Some(&id) = registry.last_id.get(&last) {
                return Ok(id);
            }
        }
        let kind = metric_type as u32;
        let defined = &mut registry.defined[kind as usize];
        *defined = defined.wrapping_add(1);
        let id = (*defined << 2) | kind;
        registry.by_id.insert(id, (index, owner));
        registry.last_id.insert(last, id);
        Ok(id)
    }

    /// As [`SharedState::define_metric`], for the plugins of the VM `owner` names (its module
    /// and VM id: see [`crate::Vm::new`]): the id reaches the metric only for them (the `*_for`
    /// calls), as Envoy's metric ids belong to a VM, so one plugin cannot change another's
    /// metrics by guessing their ids. (The same name is the same metric for every VM, as in
    /// Envoy's stats.)
    pub fn define_metric_for(
        &self,
        owner: &str,
        metric_type: MetricType,
        name: &str,
    ) -> Result<u32, Status> {
        self.define(Some(owner), metric_type, name)
    }

    /// How many metric names `owner` added (see [`SharedLimits::metric_names_per_vm_id`]).
    pub fn metric_names_added_by(&self, owner: &str) -> usize {
        self.metrics().added_by.get(owner).copied().unwrap_or(0)
    }

    /// [`SharedState::increment_metric`] of `owner`'s id (`NOT_FOUND` for another VM's).
    pub fn increment_metric_for(&self, owner: &str, id: u32, offset: i64) -> Status {
        self.metrics().increment(Some(owner), id, offset)
    }

    /// [`SharedState::record_metric`] of `owner`'s id (`NOT_FOUND` for another VM's).
    pub fn record_metric_for(&self, owner: &str, id: u32, value: u64) -> Status {
        self.metrics().record(Some(owner), id, value)
    }

    /// [`SharedState::metric_value`] of `owner`'s id (`NOT_FOUND` for another VM's).
    pub fn metric_value_for(&self, owner: &str, id: u32) -> Result<i64, Status> {
        self.metrics().value(Some(owner), id)
    }

    /// Adds `offset` to a counter or gauge, as Envoy: a counter only goes up (an offset of 0 or
    /// less is [`Status::BadArgument`]); a histogram cannot be incremented (its id is refused
    /// before any lookup).
    pub fn increment_metric(&self, id: u32, offset: i64) -> Status {
        self.metrics().increment(None, id, offset)
    }

    /// Records `value`, as Envoy: adds it to a counter, sets a gauge, records it into a histogram.
    pub fn record_metric(&self, id: u32, value: u64) -> Status {
        self.metrics().record(None, id, value)
    }

    /// A counter's or gauge's current value: `Err(BadArgument)` for a histogram's id (which has
    /// no single value), `Err(NotFound)` for no such metric, as Envoy answers.
    pub fn metric_value(&self, id: u32) -> Result<i64, Status> {
        self.metrics().value(None, id)
    }

    /// Every metric, in definition order.
    pub fn metrics_snapshot(&self) -> Vec<Metric> {
        self.metrics().metrics.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_keeps_its_distribution_in_constant_space() {
        let shared = SharedState::new();
        let id = shared
            .define_metric(MetricType::Histogram, "latency_ms")
            .unwrap();
        for value in 0..100_000u64 {
            assert_eq!(shared.record_metric(id, value % 100), Status::Ok);
        }
        assert_eq!(shared.record_metric(id, u64::MAX), Status::Ok);
        let metric = &shared.metrics_snapshot()[0];
        let histogram = metric.histogram.as_ref().expect("a histogram");
        assert_eq!(histogram.count, 100_001);
        assert_eq!(histogram.sum, u64::MAX, "the sum saturates");
        // 0 and 1 fall in the first bucket (<= 1), 2..=5 in the second, 51..=99 under 100.
        assert_eq!(histogram.buckets[0], 2 * 1000);
        assert_eq!(histogram.buckets[1], 4 * 1000);
        assert_eq!(histogram.buckets[5], 49 * 1000);
        assert_eq!(histogram.buckets[18], 1);
        assert_eq!(histogram.buckets.iter().sum::<u64>(), histogram.count);
        assert_eq!(metric.value, i64::MAX, "the last value, saturated");
    }

    #[test]
    fn shared_data_cas_follows_the_spec() {
        let shared = SharedState::new();
        assert_eq!(
            shared.set("vm", b"k", b"v1", 7),
            Status::Ok,
            "a missing key is set whatever the cas"
        );
        let (value, cas) = shared.get("vm", b"k").unwrap();
        assert_eq!(value, b"v1");
        assert_eq!(shared.set("vm", b"k", b"v2", cas + 1), Status::CasMismatch);
        assert_eq!(shared.set("vm", b"k", b"v2", cas), Status::Ok);
        assert_eq!(
            shared.set("vm", b"k", b"v3", cas),
            Status::CasMismatch,
            "the token changed on set"
        );
        assert_eq!(shared.get("vm", b"k").unwrap().0, b"v2");
        assert_eq!(
            shared.get("other-vm", b"k"),
            None,
            "keys are scoped by vm_id"
        );
    }

    #[test]
    fn cas_tokens_never_collide_across_keys() {
        let shared = SharedState::new();
        assert_eq!(shared.set("vm", b"a", b"1", 0), Status::Ok);
        assert_eq!(shared.set("vm", b"b", b"1", 0), Status::Ok);
        let (_, a) = shared.get("vm", b"a").unwrap();
        let (_, b) = shared.get("vm", b"b").unwrap();
        assert_ne!(a, b);
        assert_eq!(shared.set("vm", b"b", b"2", a), Status::CasMismatch);
    }

    /// Limits of one entry or item of `bytes` each.
    fn room_for(entries: usize, bytes: usize) -> usize {
        entries * (bytes + SharedLimits::OVERHEAD_BYTES)
    }

    #[test]
    fn shared_data_past_its_vm_ids_limit_is_refused_and_left_as_it_was() {
        let shared = SharedState::with_limits(SharedLimits {
            // Two entries of a 1-byte key and a 99-byte value (and the 2-byte VM id).
            data_bytes_per_vm_id: room_for(2, 102),
            ..SharedLimits::default()
        });
        let value = [7u8; 99];
        assert_eq!(shared.set("vm", b"a", &value, 0), Status::Ok);
        assert_eq!(shared.set("vm", b"b", &value, 0), Status::Ok);
        assert_eq!(shared.set("vm", b"c", b"", 0), Status::InternalFailure);
        assert_eq!(shared.get("vm", b"c"), None);
        // A larger value for a key is refused, and the old one stays; an equal one is not.
        let (_, cas) = shared.get("vm", b"a").unwrap();
        assert_eq!(
            shared.set("vm", b"a", &[1; 100], 0),
            Status::InternalFailure
        );
        assert_eq!(shared.get("vm", b"a"), Some((value.to_vec(), cas)));
        assert_eq!(shared.set("vm", b"a", &[1; 99], 0), Status::Ok);
        // A smaller value makes room; another VM id has room of its own.
        assert_eq!(shared.set("vm", b"b", b"", 0), Status::Ok);
        assert_eq!(shared.set("vm", b"a", &[1; 99 + 99], 0), Status::Ok);
        assert_eq!(shared.set("vx", b"a", &value, 0), Status::Ok);
        assert_eq!(shared.set("vx", b"b", &value, 0), Status::Ok);
        // A full VM id still answers a stale CAS as a mismatch.
        assert_eq!(shared.set("vx", b"b", b"", 1), Status::CasMismatch);
    }

    #[test]
    fn a_vm_ids_queues_past_their_limit_refuse_items_until_some_are_dequeued() {
        let shared = SharedState::with_limits(SharedLimits {
            queue_bytes_per_vm_id: room_for(3, 10),
            queues_per_vm_id: 2,
            ..SharedLimits::default()
        });
        let (notify, _notifications) = std::sync::mpsc::channel();
        let owner = QueueOwner::new(notify);
        let first = shared.register_queue("vm", "q", owner.clone()).unwrap();
        let second = shared.register_queue("vm", "r", owner.clone()).unwrap();
        // The VM id's two queues share its room.
        assert_eq!(shared.enqueue(first, &[1; 10]), Status::Ok);
        assert_eq!(shared.enqueue(second, &[2; 10]), Status::Ok);
        assert_eq!(shared.enqueue(first, &[3; 10]), Status::Ok);
        assert_eq!(shared.enqueue(second, b""), Status::InternalFailure);
        assert_eq!(shared.dequeue(second), Ok(vec![2; 10]));
        assert_eq!(shared.dequeue(second), Err(Status::Empty));
        assert_eq!(shared.enqueue(second, b"later"), Status::Ok);
        // Queues past the VM id's limit: a new name is refused, a known one is not, and
        // another VM id has room of its own.
        assert_eq!(
            shared.register_queue("vm", "third", owner.clone()),
            Err(Status::InternalFailure)
        );
        assert_eq!(shared.register_queue("vm", "q", owner.clone()), Ok(first));
        let other = shared.register_queue("other", "q", owner.clone()).unwrap();
        for _ in 0..3 {
            assert_eq!(shared.enqueue(other, &[1; 10]), Status::Ok);
        }
        // A name past the longest is refused outright.
        let long = "q".repeat(SharedLimits::QUEUE_NAME_BYTES + 1);
        assert_eq!(
            shared.register_queue("other", &long, owner),
            Err(Status::BadArgument)
        );
    }

    #[test]
    fn a_drained_queue_gives_back_what_a_burst_grew_it_to() {
        let shared = SharedState::new();
        let (notify, _notifications) = std::sync::mpsc::channel();
        let token = shared
            .register_queue("vm", "q", QueueOwner::new(notify))
            .unwrap();
        for _ in 0..100_000 {
            assert_eq!(shared.enqueue(token, b""), Status::Ok);
        }
        while shared.dequeue(token).is_ok() {}
        let capacity = shared.queues().queues[token as usize - 1].items.capacity();
        assert!(capacity <= 128, "{capacity} slots kept");
        assert_eq!(shared.queues().namespaces[0].waiting_bytes, 0);
    }

    #[test]
    fn queues_are_scoped_by_vm_id_and_notify_their_owner() {
        let shared = SharedState::new();
        let (notify, notifications) = std::sync::mpsc::channel();
        // The owner's VM state, alive for the test.
        let owner = QueueOwner::new(notify);
        let token = shared
            .register_queue("vm", "events", owner.clone())
            .unwrap();
        assert_eq!(shared.resolve_queue("vm", "events"), Some(token));
        assert_eq!(shared.resolve_queue("other-vm", "events"), None);
        assert_eq!(shared.dequeue(token), Err(Status::Empty));
        assert_eq!(shared.enqueue(token, b"one"), Status::Ok);
        assert_eq!(shared.enqueue(token, b"two"), Status::Ok);
        assert_eq!(
            notifications.try_iter().collect::<Vec<_>>(),
            vec![(1, token), (1, token)]
        );
        assert_eq!(shared.dequeue(token).unwrap(), b"one");
        assert_eq!(shared.dequeue(token).unwrap(), b"two");
        assert_eq!(shared.enqueue(token + 1, b"x"), Status::NotFound);
        assert_eq!(shared.dequeue(0), Err(Status::NotFound));
        drop(owner);
    }

    #[test]
    fn notifications_not_yet_taken_cover_the_waiting_items_and_no_more() {
        let shared = SharedState::new();
        let (notify, notifications) = std::sync::mpsc::channel();
        let owner = QueueOwner::new(notify);
        let token = shared.register_queue("vm", "q", owner.clone()).unwrap();
        // A plugin enqueueing and dequeueing in a loop: one notification covers its one item.
        for _ in 0..100_000 {
            assert_eq!(shared.enqueue(token, b"x"), Status::Ok);
            assert_eq!(shared.dequeue(token).unwrap(), b"x");
        }
        // Registering again in a loop sends no more either.
        for _ in 0..1000 {
            shared.register_queue("vm", "q", owner.clone()).unwrap();
        }
        assert_eq!(shared.enqueue(token, b"waiting"), Status::Ok);
        for _ in 0..1000 {
            shared.register_queue("vm", "q", owner.clone()).unwrap();
        }
        assert_eq!(shared.dequeue(token).unwrap(), b"waiting");
        let taken: Vec<_> = notifications.try_iter().collect();
        assert_eq!(taken, vec![(1, token)]);
        // Taken by the VM, it no longer covers anything: each item enqueued is told.
        shared.queue_notices_taken(&owner, &taken);
        for item in [b"a", b"b", b"c"] {
            assert_eq!(shared.enqueue(token, item), Status::Ok);
        }
        assert_eq!(notifications.try_iter().count(), 3);
        // Two taken while three wait: the next item is told again.
        shared.queue_notices_taken(&owner, &[(1, token), (1, token)]);
        assert_eq!(shared.enqueue(token, b"d"), Status::Ok);
        assert_eq!(notifications.try_iter().count(), 1);
        drop(owner);
    }

    #[test]
    fn items_told_to_a_vm_that_fails_or_goes_away_are_told_to_the_owner_after_it() {
        let shared = SharedState::new();
        let (running_notify, running) = std::sync::mpsc::channel();
        let running_vm = QueueOwner::new(running_notify);
        let token = shared
            .register_queue("vm", "events", running_vm.clone())
            .unwrap();
        let (newest_notify, newest) = std::sync::mpsc::channel();
        let newest_vm = QueueOwner::new(newest_notify);
        shared
            .register_queue("vm", "events", newest_vm.clone())
            .unwrap();
        assert_eq!(shared.enqueue(token, b"one"), Status::Ok);
        assert_eq!(newest.try_iter().count(), 1, "told the newest VM only");
        assert_eq!(running.try_iter().count(), 0);
        // The newest VM fails (or goes away) before it dequeues.
        shared.release_queues(&newest_vm);
        assert_eq!(
            running.try_iter().collect::<Vec<_>>(),
            vec![(1, token)],
            "the item is not left waiting for the next enqueue"
        );
        assert_eq!(shared.enqueue(token, b"two"), Status::Ok);
        assert_eq!(
            newest.try_iter().count(),
            0,
            "a released VM is told nothing more"
        );
        assert_eq!(running.try_iter().count(), 1);
        drop(running_vm);
    }

    #[test]
    fn a_queue_goes_back_to_its_earlier_owner_when_the_newest_vm_goes_away() {
        let shared = SharedState::new();
        let (running_notify, running) = std::sync::mpsc::channel();
        let running_vm = QueueOwner::new(running_notify);
        let token = shared
            .register_queue("vm", "events", running_vm.clone())
            .unwrap();
        // A VM started only to check a configuration update registers the same queue, and is
        // dropped when the update is refused.
        let (checked_notify, checked) = std::sync::mpsc::channel();
        let checked_vm = QueueOwner::new(checked_notify);
        assert_eq!(
            shared.register_queue("vm", "events", checked_vm.clone()),
            Ok(token)
        );
        assert_eq!(shared.enqueue(token, b"one"), Status::Ok);
        assert_eq!(
            checked.try_iter().count(),
            1,
            "the newest registrant is told"
        );
        assert_eq!(running.try_iter().count(), 0);
        drop(checked_vm);
        drop(checked);
        assert_eq!(shared.enqueue(token, b"two"), Status::Ok);
        assert_eq!(
            running.try_iter().collect::<Vec<_>>(),
            vec![(1, token)],
            "the running VM is told again"
        );
        // A VM registering again (another root context) replaces its own registration only.
        let again = QueueOwner {
            root: 2,
            ..running_vm.clone()
        };
        shared.register_queue("vm", "events", again).unwrap();
        assert_eq!(shared.queues().queues[token as usize - 1].owners.len(), 1);
        assert_eq!(shared.enqueue(token, b"three"), Status::Ok);
        assert_eq!(
            running.try_iter().collect::<Vec<_>>(),
            vec![(2, token), (2, token)],
            "told at registration of the items waiting, then of the new one"
        );
        drop(running_vm);
        assert_eq!(
            shared.enqueue(token, b"four"),
            Status::Ok,
            "with no owner alive the items wait"
        );
        assert_eq!(shared.dequeue(token).unwrap(), b"one");
    }

    #[test]
    fn foreign_functions_are_found_by_name() {
        let shared = SharedState::new();
        shared.register_foreign_function(
            "reverse",
            Arc::new(|_, args: &[u8]| Ok(args.iter().rev().copied().collect())),
        );
        assert!(shared.foreign_function(b"reverse").is_some());
        assert!(shared.foreign_function(b"missing").is_none());
        for envoy in ["compress", "set_envoy_filter_state", "declare_property"] {
            assert!(
                shared.foreign_function(envoy.as_bytes()).is_some(),
                "{envoy}"
            );
        }
    }

    #[test]
    fn an_embedder_may_replace_a_built_in_foreign_function() {
        let shared = SharedState::new();
        let built_in = shared
            .foreign_function(b"compress")
            .expect("Envoy's compress");
        let own: ForeignFunction = Arc::new(|_, args: &[u8]| Ok(args.to_vec()));
        shared.register_foreign_function("compress", own.clone());
        let found = shared.foreign_function(b"compress").expect("compress");
        assert!(Arc::ptr_eq(&found, &own), "the embedder's function answers");
        assert!(!Arc::ptr_eq(&found, &built_in));
        assert!(
            shared.foreign_function(b"uncompress").is_some(),
            "the other built-ins stay"
        );
    }

    #[test]
    fn a_plugin_defining_a_metric_in_a_loop_gets_a_bounded_number_of_ids() {
        let shared = SharedState::new();
        let first = shared
            .define_metric(MetricType::Counter, "requests")
            .unwrap();
        let mut last = first;
        for _ in 1..MAX_METRIC_IDS {
            last = shared
                .define_metric(MetricType::Counter, "requests")
                .unwrap();
        }
        assert_ne!(
            last, first,
            "a new id for every definition while there is room"
        );
        // The table is full: the metric's last id again, and the table stays as it is.
        for _ in 0..5 {
            assert_eq!(
                shared
                    .define_metric(MetricType::Counter, "requests")
                    .unwrap(),
                last
            );
        }
        assert_eq!(shared.metrics().by_id.len(), MAX_METRIC_IDS);
        assert_eq!(shared.increment_metric(last, 2), Status::Ok);
        assert_eq!(
            shared.metric_value(first),
            Ok(2),
            "every id is the one metric"
        );
        // Another VM defining the name gets an id it can use, not the full table's last one.
        let theirs = shared
            .define_metric_for("b", MetricType::Counter, "requests")
            .unwrap();
        assert_eq!(shared.increment_metric_for("b", theirs, 1), Status::Ok);
        // A metric never defined before still gets an id of its own.
        let other = shared.define_metric(MetricType::Gauge, "level").unwrap();
        assert_eq!(shared.record_metric(other, 9), Status::Ok);
        assert_eq!(shared.metric_value(other), Ok(9));
    }

    #[test]
    fn a_plugin_defining_new_metric_names_in_a_loop_is_refused_past_the_limit() {
        let shared = SharedState::new();
        for index in 0..MAX_METRICS {
            shared
                .define_metric(MetricType::Counter, &format!("m{index}"))
                .unwrap();
        }
        assert_eq!(
            shared.define_metric(MetricType::Counter, "one more"),
            Err(Status::InternalFailure)
        );
        // A metric defined before is still defined again.
        assert!(shared.define_metric(MetricType::Counter, "m7").is_ok());
        assert_eq!(shared.metrics().metrics.len(), MAX_METRICS);
        let long = "x".repeat(MAX_METRIC_NAME_BYTES + 1);
        assert_eq!(
            SharedState::new().define_metric(MetricType::Gauge, &long),
            Err(Status::BadArgument)
        );
    }

    #[test]
    fn a_metric_id_reaches_its_metric_only_for_the_vm_that_defined_it() {
        let shared = SharedState::new();
        let mine = shared
            .define_metric_for("a", MetricType::Counter, "requests")
            .unwrap();
        let gauge = shared
            .define_metric_for("a", MetricType::Gauge, "level")
            .unwrap();
        assert_eq!(shared.increment_metric_for("a", mine, 2), Status::Ok);
        // Another VM guessing the ids.
        assert_eq!(shared.increment_metric_for("b", mine, 1), Status::NotFound);
        assert_eq!(shared.record_metric_for("b", gauge, 0), Status::NotFound);
        assert_eq!(shared.metric_value_for("b", mine), Err(Status::NotFound));
        assert_eq!(shared.metric_value_for("a", mine), Ok(2));
        // Defining the same name is the same metric, by an id of its own.
        let theirs = shared
            .define_metric_for("b", MetricType::Counter, "requests")
            .unwrap();
        assert_eq!(shared.increment_metric_for("b", theirs, 1), Status::Ok);
        assert_eq!(shared.metric_value_for("a", mine), Ok(3));
        // Envoy's order of answers stays: a histogram's id is refused before any lookup.
        assert_eq!(shared.increment_metric_for("b", 6, 1), Status::BadArgument);
    }

    #[test]
    fn metrics_follow_envoys_ids_and_rules() {
        let shared = SharedState::new();
        let counter = shared
            .define_metric(MetricType::Counter, "requests")
            .unwrap();
        assert_eq!(counter, 4, "Envoy's first counter id");
        let again = shared
            .define_metric(MetricType::Counter, "requests")
            .unwrap();
        assert_ne!(again, counter, "a new id for every definition, as in Envoy");
        assert_eq!(shared.increment_metric(again, 1), Status::Ok);
        assert_eq!(shared.metric_value(counter), Ok(1), "the same metric");
        assert_eq!(shared.increment_metric(counter, 1), Status::Ok);
        assert_eq!(shared.increment_metric(counter, 2), Status::Ok);
        assert_eq!(shared.increment_metric(counter, -1), Status::BadArgument);
        assert_eq!(shared.increment_metric(counter, 0), Status::BadArgument);
        assert_eq!(shared.record_metric(counter, 3), Status::Ok, "adds");
        assert_eq!(shared.metric_value(counter), Ok(7));
        let gauge = shared.define_metric(MetricType::Gauge, "level").unwrap();
        assert_eq!(shared.record_metric(gauge, 10), Status::Ok);
        assert_eq!(shared.increment_metric(gauge, -3), Status::Ok);
        assert_eq!(shared.increment_metric(gauge, 0), Status::Ok);
        assert_eq!(shared.metric_value(gauge), Ok(7));
        let histogram = shared
            .define_metric(MetricType::Histogram, "latency")
            .unwrap();
        assert_eq!(shared.record_metric(histogram, 12), Status::Ok);
        assert_eq!(shared.increment_metric(histogram, 1), Status::BadArgument);
        assert_eq!(shared.metric_value(histogram), Err(Status::BadArgument));
        assert_eq!(shared.increment_metric(97, 1), Status::NotFound);
        assert_eq!(shared.metric_value(97), Err(Status::NotFound));
        assert_eq!(
            shared.metric_value(98),
            Err(Status::BadArgument),
            "a histogram's id"
        );
    }
}
