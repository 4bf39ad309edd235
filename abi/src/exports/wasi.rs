//! The subset of WASI preview 1 that real Proxy-Wasm SDK output imports.
//!
//! Registered under both `wasi_snapshot_preview1` and `wasi_unstable`, as the reference host
//! does. Plugins have no files, sockets or arguments: those calls return an errno instead of
//! failing the module's load. Standard output and error go to the plugin's log.

use runtime_api::{Caller, HostFunction, MemoryAccessError, Signature, Trap, ValType};

use crate::{LogLevel, VmState};

/// A WASI error number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Errno(u16);

const SUCCESS: Errno = Errno(0);
const BADF: Errno = Errno(8);
const FAULT: Errno = Errno(21);
const INVAL: Errno = Errno(28);
const NOSYS: Errno = Errno(52);
const SPIPE: Errno = Errno(70);
/// Also what a WASI function the plugin's capabilities leave out returns.
const NOTCAPABLE: Errno = Errno(76);

impl From<MemoryAccessError> for Errno {
    fn from(_: MemoryAccessError) -> Self {
        FAULT
    }
}

/// A WASI function body: `Ok` is success; `Err(Ok(errno))` an error; `Err(Err(trap))` stops the
/// guest.
type WasiResult = Result<(), Result<Errno, Trap>>;

fn errno(e: Errno) -> WasiResult {
    if e == SUCCESS {
        Ok(())
    } else {
        Err(Ok(e))
    }
}

fn fault(_: MemoryAccessError) -> Result<Errno, Trap> {
    Ok(FAULT)
}

macro_rules! wasi {
    ($module:expr, $name:literal, [$($param:ident),*], $body:path) => {
        wasi!($module, $name, [$($param),*] -> [I32], $body)
    };
    ($module:expr, $name:literal, [$($param:ident),*] -> [$($result:ident),*], $body:path) => {
        HostFunction {
            module: $module,
            name: $name,
            signature: Signature::new(&[$(ValType::$param),*], &[$(ValType::$result),*]),
            callback: |caller: &mut dyn Caller<VmState>, args: &mut [u64]| -> Result<(), Trap> {
                if !super::check_allowed(caller.state(), $module, $name)? {
                    args[0] = u64::from(NOTCAPABLE.0);
                    return Ok(());
                }
                let code = match $body(caller, args) {
                    Ok(()) => SUCCESS,
                    Err(Ok(errno)) => errno,
                    Err(Err(trap)) => return Err(trap),
                };
                args[0] = u64::from(code.0);
                Ok(())
            },
        }
    };
}

macro_rules! wasi_table {
    ($module:expr) => {
        [
            wasi!($module, "fd_write", [I32, I32, I32, I32], fd_write),
            wasi!($module, "fd_read", [I32, I32, I32, I32], no_file),
            wasi!($module, "fd_close", [I32], no_file),
            wasi!($module, "fd_seek", [I32, I64, I32, I32], fd_seek),
            wasi!($module, "fd_tell", [I32, I32], fd_seek),
            wasi!($module, "fd_sync", [I32], no_file),
            wasi!($module, "fd_datasync", [I32], no_file),
            wasi!($module, "fd_advise", [I32, I64, I64, I32], no_file),
            wasi!($module, "fd_allocate", [I32, I64, I64], no_file),
            wasi!($module, "fd_fdstat_get", [I32, I32], fd_fdstat_get),
            wasi!(
                $module,
                "fd_fdstat_set_flags",
                [I32, I32],
                fd_fdstat_set_flags
            ),
            wasi!($module, "fd_fdstat_set_rights", [I32, I64, I64], no_file),
            wasi!($module, "fd_filestat_get", [I32, I32], no_file),
            wasi!($module, "fd_filestat_set_size", [I32, I64], no_file),
            wasi!(
                $module,
                "fd_filestat_set_times",
                [I32, I64, I64, I32],
                no_file
            ),
            wasi!($module, "fd_pread", [I32, I32, I32, I64, I32], no_file),
            wasi!($module, "fd_pwrite", [I32, I32, I32, I64, I32], no_file),
            wasi!($module, "fd_readdir", [I32, I32, I32, I64, I32], no_file),
            wasi!($module, "fd_renumber", [I32, I32], no_file),
            wasi!($module, "fd_prestat_get", [I32, I32], no_file),
            wasi!($module, "fd_prestat_dir_name", [I32, I32, I32], no_file),
            wasi!(
                $module,
                "path_open",
                [I32, I32, I32, I32, I32, I64, I64, I32, I32],
                no_file
            ),
            wasi!($module, "path_create_directory", [I32, I32, I32], no_file),
            wasi!(
                $module,
                "path_filestat_get",
                [I32, I32, I32, I32, I32],
                no_file
            ),
            wasi!(
                $module,
                "path_filestat_set_times",
                [I32, I32, I32, I32, I64, I64, I32],
                no_file
            ),
            wasi!(
                $module,
                "path_link",
                [I32, I32, I32, I32, I32, I32, I32],
                no_file
            ),
            wasi!(
                $module,
                "path_readlink",
                [I32, I32, I32, I32, I32, I32],
                no_file
            ),
            wasi!($module, "path_remove_directory", [I32, I32, I32], no_file),
            wasi!(
                $module,
                "path_rename",
                [I32, I32, I32, I32, I32, I32],
                no_file
            ),
            wasi!($module, "path_symlink", [I32, I32, I32, I32, I32], no_file),
            wasi!($module, "path_unlink_file", [I32, I32, I32], no_file),
            wasi!($module, "sock_accept", [I32, I32, I32], no_socket),
            wasi!(
                $module,
                "sock_recv",
                [I32, I32, I32, I32, I32, I32],
                no_socket
            ),
            wasi!($module, "sock_send", [I32, I32, I32, I32, I32], no_socket),
            wasi!($module, "sock_shutdown", [I32, I32], no_socket),
            wasi!($module, "args_get", [I32, I32], args_get),
            wasi!($module, "args_sizes_get", [I32, I32], args_sizes_get),
            wasi!($module, "environ_get", [I32, I32], environ_get),
            wasi!($module, "environ_sizes_get", [I32, I32], environ_sizes_get),
            wasi!($module, "clock_res_get", [I32, I32], clock_res_get),
            wasi!($module, "clock_time_get", [I32, I64, I32], clock_time_get),
            wasi!($module, "random_get", [I32, I32], random_get),
            wasi!($module, "sched_yield", [], sched_yield),
            wasi!($module, "poll_oneoff", [I32, I32, I32, I32], poll_oneoff),
            wasi!($module, "proc_exit", [I32] -> [], proc_exit),
            wasi!($module, "proc_raise", [I32], proc_raise),
        ]
    };
}

const WASI_COUNT: usize = 46;

/// WASI preview 1 under its current name.
pub(super) static FUNCTIONS: [HostFunction<VmState>; WASI_COUNT] =
    wasi_table!("wasi_snapshot_preview1");

static UNSTABLE: [HostFunction<VmState>; WASI_COUNT] = wasi_table!("wasi_unstable");

/// The same functions under the older `wasi_unstable` name.
pub(super) fn unstable() -> impl Iterator<Item = HostFunction<VmState>> {
    UNSTABLE.iter().copied()
}

/// The most bytes of one `fd_write` that reach the log, as for one `proxy_log` message. The
/// write takes every byte it is given (a program that does not look at the count, e.g. TinyGo's
/// `fmt.Println`, would otherwise lose the rest without a word); what is over this limit is
/// counted in a last line instead of copied, so buffers naming the same memory over and over
/// cannot make the host copy (and log) without bound inside one call, which the plugin's
/// deadline does not stop.
const MAX_WRITE_LOGGED: usize = super::logging::MAX_LOG_MESSAGE_BYTES;

/// The most buffers one `fd_write` reads (WASI's `IOV_MAX`, which libc never exceeds); a call
/// with more is a partial write of the first ones.
const MAX_WRITE_BUFFERS: u64 = 1024;

/// The most subscriptions one `poll_oneoff` takes (more: `EINVAL`).
const MAX_POLL_SUBSCRIPTIONS: u64 = 1024;

/// `fd_write(fd, iovs, iovs_len, nwritten)`: stdout goes to the info log, stderr to the error
/// log, one log line per line of text; every byte of at most [`MAX_WRITE_BUFFERS`] buffers is
/// taken, at most [`MAX_WRITE_LOGGED`] of them logged.
fn fd_write(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    let level = match args[0] {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return errno(BADF),
    };
    let (state, mut memory) = caller.state_and_memory();
    let logged = level >= state.host.log_level();
    let mut text = Vec::new();
    let mut written: u32 = 0;
    for i in 0..args[2].min(MAX_WRITE_BUFFERS) {
        let iovec = args[1].checked_add(i * 8).ok_or(Ok(FAULT))?;
        let ptr = memory.read_u32(iovec).map_err(fault)?;
        let len = memory.read_u32(iovec + 4).map_err(fault)?;
        let buffer = memory
            .slice(u64::from(ptr), u64::from(len))
            .map_err(fault)?;
        // The count is a u32: a write naming more than 4 GiB in all is partial.
        let Some(sum) = written.checked_add(len) else {
            break;
        };
        written = sum;
        if logged {
            let room = MAX_WRITE_LOGGED - text.len();
            text.extend_from_slice(&buffer[..buffer.len().min(room)]);
        }
    }
    memory.write_u32(args[3], written).map_err(fault)?;
    if !logged {
        return Ok(());
    }
    let mut left_out = written as usize - text.len();
    if left_out > 0 {
        // Cut before a character the limit split, as a cut log message is.
        let whole = super::logging::without_a_split_character(&text);
        left_out += text.len() - whole;
        text.truncate(whole);
    }
    let context = state.effective_context;
    for line in String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| !l.is_empty())
    {
        state.host.log(context, level, line);
    }
    if left_out > 0 {
        let note = format!("[pwhost: {left_out} more bytes of this write not logged]");
        state.host.log(context, level, &note);
    }
    Ok(())
}

/// Plugins have no files: every descriptor but stdio is unknown.
fn no_file(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> WasiResult {
    errno(BADF)
}

/// Plugins have no sockets.
fn no_socket(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> WasiResult {
    errno(NOTCAPABLE)
}

/// Stdio cannot seek; other descriptors do not exist.
fn fd_seek(_caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    errno(if args[0] <= 2 { SPIPE } else { BADF })
}

/// `fd_fdstat_get(fd, stat)`: stdio are character devices.
fn fd_fdstat_get(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    if args[0] > 2 {
        return errno(BADF);
    }
    // fdstat: filetype u8, pad, flags u16, pad to 8, rights_base u64, rights_inheriting u64.
    let mut stat = [0u8; 24];
    stat[0] = 2; // character_device
    let rights: u64 = if args[0] == 0 { 1 << 1 } else { 1 << 6 }; // fd_read / fd_write
    stat[8..16].copy_from_slice(&rights.to_le_bytes());
    caller.memory().write(args[1], &stat).map_err(fault)?;
    Ok(())
}

/// `fd_fdstat_set_flags(fd, flags)`: accepted and ignored for stdio (Go sets non-blocking mode).
fn fd_fdstat_set_flags(_caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    errno(if args[0] <= 2 { SUCCESS } else { BADF })
}

/// `args_sizes_get(argc, argv_buf_size)`: no arguments.
fn args_sizes_get(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    let mut memory = caller.memory();
    memory.write_u32(args[0], 0).map_err(fault)?;
    memory.write_u32(args[1], 0).map_err(fault)?;
    Ok(())
}

/// `args_get(argv, argv_buf)`: no arguments, nothing to write.
fn args_get(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> WasiResult {
    Ok(())
}

/// `environ_sizes_get(count, buf_size)`: the configured variables only.
fn environ_sizes_get(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    let (state, mut memory) = caller.state_and_memory();
    let environment = &state.config.environment;
    let size: usize = environment.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    memory
        .write_u32(args[0], environment.len() as u32)
        .map_err(fault)?;
    memory.write_u32(args[1], size as u32).map_err(fault)?;
    Ok(())
}

/// `environ_get(environ, environ_buf)`: writes `KEY=VALUE\0` strings and their pointers.
fn environ_get(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    let (state, mut memory) = caller.state_and_memory();
    let (mut pointers, mut buffer) = (args[0], args[1]);
    for (key, value) in &state.config.environment {
        memory.write_u32(pointers, buffer as u32).map_err(fault)?;
        let entry = format!("{key}={value}\0");
        memory.write(buffer, entry.as_bytes()).map_err(fault)?;
        pointers += 4;
        buffer += entry.len() as u64;
    }
    Ok(())
}

/// `clock_res_get(clock_id, resolution)`.
fn clock_res_get(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    if args[0] > 3 {
        return errno(INVAL);
    }
    caller.memory().write_u64(args[1], 1_000).map_err(fault)?;
    Ok(())
}

/// `clock_time_get(clock_id, precision, time)`: realtime and monotonic from the host;
/// CPU-time clocks are not available.
fn clock_time_get(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    let nanos = match args[0] {
        0 => {
            let now = caller.state().host.now();
            now.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        }
        1 => caller.state().host.monotonic().as_nanos() as u64,
        2 | 3 => return errno(NOSYS),
        _ => return errno(INVAL),
    };
    caller.memory().write_u64(args[2], nanos).map_err(fault)?;
    Ok(())
}

/// The most bytes one `random_get` returns, as proxy-wasm-cpp-host (more is `EINVAL`).
const RANDOM_GET_MAX: u64 = 64 * 1024;

/// `random_get(buf, len)`.
fn random_get(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    if args[1] > RANDOM_GET_MAX {
        return errno(INVAL);
    }
    // The whole buffer must lie within memory before any of it is written.
    caller.memory().slice_mut(args[0], args[1]).map_err(fault)?;
    // The host fills a bounce buffer (memory and host are both reached through the caller),
    // a piece at a time.
    let mut piece = [0u8; 256];
    let (mut address, end) = (args[0], args[0] + args[1]);
    while address < end {
        let length = (end - address).min(piece.len() as u64);
        let bytes = &mut piece[..length as usize];
        if !caller.state().host.fill_random(bytes) {
            return errno(NOSYS);
        }
        caller.memory().write(address, bytes).map_err(fault)?;
        address += length;
    }
    Ok(())
}

fn sched_yield(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> WasiResult {
    Ok(())
}

/// `poll_oneoff(in, out, nsubscriptions, nevents)`: never blocks (a plugin must not stall the
/// proxy's worker). Clock subscriptions fire at once; descriptor subscriptions report `EBADF`,
/// except writes to stdout/stderr, which are always ready. Zero subscriptions succeed with zero
/// events: Go's runtime calls that (even from its allocator) and crashes on an error.
fn poll_oneoff(caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    const SUBSCRIPTION_SIZE: u64 = 48;
    const EVENT_SIZE: u64 = 32;
    const FD_WRITE: u8 = 2;
    let (subscriptions, events, count) = (args[0], args[1], args[2]);
    // A plugin has no descriptors to wait on; bounded as `fd_write`'s buffers are, so one call
    // cannot hold the thread for millions of subscriptions.
    if count > MAX_POLL_SUBSCRIPTIONS {
        return errno(INVAL);
    }
    let mut memory = caller.memory();
    for i in 0..count {
        let subscription = subscriptions + i * SUBSCRIPTION_SIZE;
        let userdata = memory.slice(subscription, 8).map_err(fault)?;
        let userdata = u64::from_le_bytes(userdata.try_into().map_err(|_| Ok(FAULT))?);
        let tag = memory.slice(subscription + 8, 1).map_err(fault)?[0];
        let errno = match tag {
            0 => SUCCESS,
            FD_WRITE if matches!(memory.read_u32(subscription + 16).map_err(fault)?, 1 | 2) => {
                SUCCESS
            }
            1 | FD_WRITE => BADF,
            _ => return errno(INVAL),
        };
        // event: userdata u64, error u16, type u8, then fd_readwrite { nbytes u64, flags u16 }.
        let mut event = [0u8; EVENT_SIZE as usize];
        event[..8].copy_from_slice(&userdata.to_le_bytes());
        event[8..10].copy_from_slice(&errno.0.to_le_bytes());
        event[10] = tag;
        memory
            .write(events + i * EVENT_SIZE, &event)
            .map_err(fault)?;
    }
    memory.write_u32(args[3], count as u32).map_err(fault)?;
    Ok(())
}

/// `proc_exit(code)`: stops the guest; the VM fails unless this ends a command's `_start`.
fn proc_exit(_caller: &mut dyn Caller<VmState>, args: &[u64]) -> WasiResult {
    Err(Err(Trap::exit(args[0] as u32 as i32)))
}

fn proc_raise(_caller: &mut dyn Caller<VmState>, _args: &[u64]) -> WasiResult {
    errno(NOSYS)
}
