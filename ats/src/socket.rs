//! What the kernel says of a client's connection, for transactions and connections a plugin
//! holds while Traffic Server does not read them.

use std::ffi::c_int;
use std::time::Duration;

/// How often the client socket of a transaction or connection a plugin holds is looked at.
pub(crate) const HELD_CLIENT_CHECK: Duration = Duration::from_millis(500);

/// Linux's `TCP_CLOSE` state (`tcpi_state`): the peer reset the connection (or it is closed
/// both ways).
const TCP_CLOSE: u8 = 7;

/// Whether the peer of socket `fd` reset the connection (or it is closed both ways), as the
/// kernel reports its state; `false` where that cannot be read. A FIN alone is not this.
pub(crate) fn reset(fd: c_int) -> bool {
    fd >= 0 && tcp_state(fd) == Some(TCP_CLOSE)
}

/// The TCP state (`tcpi_state`) of socket `fd`, on Linux; `None` if it is not a TCP socket
/// (or not open).
#[cfg(target_os = "linux")]
fn tcp_state(fd: c_int) -> Option<u8> {
    // Only the first byte, the state, is needed. Kernels write as much of their `tcp_info` as
    // fits, and older ones have a shorter one than newer headers.
    let mut info = [0u8; 256];
    let mut length = info.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `length` bytes to `info`, which holds that many and
    // lives through the call, and sets `length`, a valid `socklen_t`; a descriptor that is not
    // an open TCP socket is an error, not undefined behaviour.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut length,
        )
    };
    (result == 0 && length > 0).then_some(info[0])
}

/// The TCP state of socket `fd`: not readable here.
#[cfg(not(target_os = "linux"))]
fn tcp_state(_fd: c_int) -> Option<u8> {
    None
}
