//! Traffic Server's diagnostics: plugin and pwhost messages go to `traffic.out`/`diags.log`
//! through `TSDebug` (tag `pwhost_ats`, shown when `proxy.config.diags.debug.tags` includes it),
//! `TSWarning`, `TSError` and, for a configuration Traffic Server must not start with,
//! `TSEmergency`.

use std::ffi::{CStr, CString};

use crate::sys;

/// The debug tag of every message.
pub(crate) const TAG: &CStr = c"pwhost_ats";

/// The message as a C string; a NUL inside it (plugins log arbitrary bytes) is shown as `\0`.
fn c_message(message: &str) -> CString {
    CString::new(message.replace('\0', "\\0")).unwrap_or_default()
}

/// Whether debug messages are shown (plugins then get log level trace).
pub(crate) fn debug_enabled() -> bool {
    // SAFETY: TAG is a NUL-terminated string.
    unsafe { sys::TSIsDebugTagSet(TAG.as_ptr()) != 0 }
}

/// A debug message (tag `pwhost_ats`).
pub(crate) fn debug(message: &str) {
    let message = c_message(message);
    // SAFETY: the format consumes exactly one C string argument, which lives through the call.
    unsafe { sys::TSDebug(TAG.as_ptr(), c"%s".as_ptr(), message.as_ptr()) }
}

/// A note (always shown): startup and reloads.
pub(crate) fn note(message: &str) {
    let message = c_message(&format!("pwhost_ats: {message}"));
    // SAFETY: as in `debug`.
    unsafe { sys::TSNote(c"%s".as_ptr(), message.as_ptr()) }
}

/// A warning.
pub(crate) fn warning(message: &str) {
    let message = c_message(&format!("pwhost_ats: {message}"));
    // SAFETY: as in `debug`.
    unsafe { sys::TSWarning(c"%s".as_ptr(), message.as_ptr()) }
}

/// An error.
pub(crate) fn error(message: &str) {
    let message = c_message(&format!("pwhost_ats: {message}"));
    // SAFETY: as in `debug`.
    unsafe { sys::TSError(c"%s".as_ptr(), message.as_ptr()) }
}

/// An error Traffic Server does not go on after: it logs the message and exits.
pub(crate) fn emergency(message: &str) -> ! {
    let message = c_message(&format!("pwhost_ats: {message}"));
    // SAFETY: as in `debug`.
    unsafe { sys::TSEmergency(c"%s".as_ptr(), message.as_ptr()) };
    // TSEmergency does not return; if it ever did, stopping here keeps the promise of `!`.
    std::process::abort()
}
