//! Resident memory of extra VM copies, and what the process holds over a soak run (Linux only:
//! reads `/proc/self`).
//!
//! [`measure`] creates VMs, keeps them alive, and compares the process's resident set before and
//! after. Guest linear memories are found in `/proc/self/smaps` by their shape (see
//! [`guest_memory_resident_kib`]), so the report separates what the guests' own memory costs
//! from what each instance costs the host (store, instance, tables, host state, allocator).

use std::fs;

/// What [`measure`] found.
#[derive(Clone, Debug)]
pub struct MemoryReport {
    /// How many VMs were alive at the second reading.
    pub vms: usize,
    /// The resident set before creating them, in KiB.
    pub rss_before_kib: u64,
    /// The resident set with all of them alive, in KiB.
    pub rss_after_kib: u64,
    /// How much of that growth is resident guest linear memory, in KiB.
    pub guest_resident_kib: u64,
    /// One guest's linear memory size (`memory.size`), in KiB: the address space it may touch.
    pub guest_memory_size_kib: u64,
}

impl MemoryReport {
    /// The resident growth per VM, guest memory included, in KiB.
    pub fn per_vm_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.vms as f64
    }

    /// Resident guest linear memory per VM, in KiB.
    pub fn guest_resident_per_vm_kib(&self) -> f64 {
        self.guest_resident_kib as f64 / self.vms as f64
    }

    /// The resident growth per VM beyond its guest's linear memory, in KiB: what an extra
    /// instance costs the host.
    pub fn per_vm_beyond_guest_kib(&self) -> f64 {
        self.per_vm_kib() - self.guest_resident_per_vm_kib()
    }
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} VMs: RSS {} -> {} KiB, {:.1} KiB/VM resident in total, of which {:.1} KiB/VM \
             guest linear memory (memory.size {} KiB) and {:.1} KiB/VM beyond it",
            self.vms,
            self.rss_before_kib,
            self.rss_after_kib,
            self.per_vm_kib(),
            self.guest_resident_per_vm_kib(),
            self.guest_memory_size_kib,
            self.per_vm_beyond_guest_kib(),
        )
    }
}

/// The process's resident set in KiB (`VmRSS` of `/proc/self/status`).
pub fn rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// What the process holds at one moment: its resident set and the threads, open files and
/// memory mappings a leak would add to, compared across a soak run.
#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    /// The resident set in KiB.
    pub rss_kib: u64,
    /// Threads (`/proc/self/task`).
    pub threads: usize,
    /// Open file descriptors (`/proc/self/fd`).
    pub files: usize,
    /// Memory mappings (`/proc/self/maps`).
    pub mappings: usize,
}

impl Footprint {
    /// The process's footprint now.
    pub fn now() -> Footprint {
        let count = |dir: &str| fs::read_dir(dir).map_or(0, |entries| entries.count());
        let mappings = fs::read_to_string("/proc/self/maps").map_or(0, |maps| maps.lines().count());
        Footprint {
            rss_kib: rss_kib(),
            threads: count("/proc/self/task"),
            files: count("/proc/self/fd"),
            mappings,
        }
    }

    /// How much the resident set grew since `earlier`, in percent (negative if it shrank).
    pub fn rss_growth_percent(&self, earlier: &Footprint) -> f64 {
        (self.rss_kib as f64 - earlier.rss_kib as f64) / earlier.rss_kib as f64 * 100.0
    }

    /// Whether threads, open files or mappings grew since `earlier`.
    pub fn leaked_since(&self, earlier: &Footprint) -> bool {
        self.threads > earlier.threads
            || self.files > earlier.files
            || self.mappings > earlier.mappings
    }
}

/// One mapping of `/proc/self/smaps`.
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    rss_kib: u64,
}

fn mappings() -> Vec<Mapping> {
    let smaps = fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                out.push(Mapping {
                    start,
                    end,
                    perms: fields.next().unwrap_or_default().to_string(),
                    rss_kib: 0,
                });
                continue;
            }
        }
        if first == "Rss:" {
            if let (Some(last), Some(Ok(kib))) = (out.last_mut(), fields.next().map(str::parse)) {
                last.rss_kib = kib;
            }
        }
    }
    out
}

/// The resident KiB of every guest linear memory in the process.
///
/// wasmtime (on-demand allocator, 64-bit defaults) reserves each linear memory as a multi-GiB
/// region: an inaccessible guard, the accessible pages (one or more read-write mappings: the
/// copy-on-write data image sits between anonymous parts), then the inaccessible rest of the
/// reservation. So a run of adjacent read-write mappings between two inaccessible ones, the
/// second of at least 1 GiB, is taken as a linear memory.
pub fn guest_memory_resident_kib() -> u64 {
    const GIB: u64 = 1 << 30;
    let maps = mappings();
    let inaccessible = |m: &Mapping| m.perms.starts_with("---");
    let mut total = 0;
    let mut i = 0;
    while i < maps.len() {
        if !inaccessible(&maps[i]) {
            i += 1;
            continue;
        }
        // A run of read-write mappings directly after this inaccessible one.
        let mut j = i + 1;
        let mut run = 0;
        while j < maps.len() && maps[j].perms.starts_with("rw") && maps[j].start == maps[j - 1].end
        {
            run += maps[j].rss_kib;
            j += 1;
        }
        if j > i + 1
            && j < maps.len()
            && inaccessible(&maps[j])
            && maps[j].start == maps[j - 1].end
            && maps[j].end - maps[j].start >= GIB
        {
            total += run;
        }
        i = j.max(i + 1);
    }
    total
}

/// Resident KiB of the mappings overlapping `[base, base + len)`.
pub fn region_resident_kib(base: *const u8, len: usize) -> u64 {
    let (start, end) = (base as u64, base as u64 + len as u64);
    mappings()
        .iter()
        .filter(|m| m.start < end && start < m.end)
        .map(|m| m.rss_kib)
        .sum()
}

/// Creates `count` VMs with `make`, keeps them alive and reports the resident growth.
/// `memory_size` gives one VM's guest memory size in bytes. The VMs are returned alive, for
/// further checks.
///
/// `warm_up` VMs are created first and kept alive too: they absorb one-time lazy
/// initialisation and the heap that compiling the module freed (resident already, so VMs
/// placed there would look free). The report is therefore the marginal cost of one more VM.
/// For the same reason, measure one kind of VM per process.
pub fn measure<T>(
    count: usize,
    warm_up: usize,
    mut make: impl FnMut() -> T,
    memory_size: impl Fn(&mut T) -> usize,
) -> (MemoryReport, Vec<T>) {
    let mut vms = Vec::with_capacity(warm_up + count);
    for _ in 0..warm_up {
        vms.push(make());
    }
    let rss_before_kib = rss_kib();
    let guest_before = guest_memory_resident_kib();
    for _ in 0..count {
        vms.push(make());
    }
    let rss_after_kib = rss_kib();
    let guest_after = guest_memory_resident_kib();
    let guest_memory_size_kib = vms.last_mut().map_or(0, |vm| memory_size(vm) as u64 / 1024);
    let report = MemoryReport {
        vms: count,
        rss_before_kib,
        rss_after_kib,
        guest_resident_kib: guest_after.saturating_sub(guest_before),
        guest_memory_size_kib,
    };
    (report, vms)
}
