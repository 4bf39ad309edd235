//! Logging, time and timers.

use std::time::{Duration, UNIX_EPOCH};

use runtime_api::Caller;

use super::{write_u32, HostResult};
use crate::{LogLevel, Status, VmState};

/// `proxy_log(level, message_data, message_size)`.
pub(super) fn log(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let level = LogLevel::from_raw(args[0]).ok_or(Status::BadArgument)?;
    let (state, memory) = caller.state_and_memory();
    // The message is checked first, as proxy-wasm-cpp-host does, then dropped unread when
    // the host records nothing at its level.
    let message = memory.slice(args[1], args[2])?;
    write_log(state, level, message);
    Ok(())
}

/// The longest log message passed on whole; a longer one is cut there, saying how much was
/// left out (a plugin's message of a gigabyte would otherwise be copied, and grown up to three
/// times by replacing invalid UTF-8, into the proxy's log).
pub(crate) const MAX_LOG_MESSAGE_BYTES: usize = 1 << 20;

/// Hands `message` to the host's log, unless the host records nothing at `level`.
pub(crate) fn write_log(state: &mut VmState, level: LogLevel, message: &[u8]) {
    if level < state.host.log_level() {
        return;
    }
    let context = state.effective_context;
    if message.len() > MAX_LOG_MESSAGE_BYTES {
        // Cut before a character the limit would split, as a cut `fd_write` is.
        let end = without_a_split_character(&message[..MAX_LOG_MESSAGE_BYTES]);
        let mut cut = String::from_utf8_lossy(&message[..end]).into_owned();
        cut.push_str(&format!(
            " [pwhost: {} more bytes of this message not logged]",
            message.len() - end
        ));
        state.host.log(context, level, &cut);
        return;
    }
    let message = String::from_utf8_lossy(message);
    state.host.log(context, level, &message);
}

/// The length of `text` without the UTF-8 character its end cuts short, if any (a character
/// is at most 4 bytes, its continuation bytes `0b10xxxxxx`). Judged from the bytes kept alone,
/// so a log message and an `fd_write` cut the same way.
pub(super) fn without_a_split_character(text: &[u8]) -> usize {
    // The last byte that starts a character (at most 3 continuation bytes follow one).
    let Some(start) = (text.len().saturating_sub(4)..text.len())
        .rev()
        .find(|&i| text[i] & 0xC0 != 0x80)
    else {
        return text.len();
    };
    let length = match text[start] {
        byte if byte & 0xE0 == 0xC0 => 2,
        byte if byte & 0xF0 == 0xE0 => 3,
        byte if byte & 0xF8 == 0xF0 => 4,
        _ => 1,
    };
    if start + length > text.len() {
        start
    } else {
        text.len()
    }
}

/// `proxy_get_log_level(return_level)`.
pub(super) fn get_log_level(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let level = caller.state().host.log_level();
    write_u32(caller, args[0], level as u32)
}

/// `proxy_get_current_time_nanoseconds(return_time)`.
pub(super) fn get_current_time_nanoseconds(
    caller: &mut dyn Caller<VmState>,
    args: &[u64],
) -> HostResult {
    let now = caller.state().host.now();
    let nanos = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    caller.memory().write_u64(args[0], nanos)?;
    Ok(())
}

/// `proxy_set_tick_period_milliseconds(period)`: 0 stops the timer.
pub(super) fn set_tick_period_milliseconds(
    caller: &mut dyn Caller<VmState>,
    args: &[u64],
) -> HostResult {
    let state = caller.state();
    let root = state.effective_root();
    if args[0] == 0 {
        state.tick_periods.remove(&root.0);
    } else {
        state
            .tick_periods
            .insert(root.0, Duration::from_millis(args[0]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::without_a_split_character;

    #[test]
    fn a_cut_ends_before_a_character_it_would_split() {
        let text = "a€b€".as_bytes(); // `€` is 3 bytes
        assert_eq!(without_a_split_character(text), text.len());
        assert_eq!(without_a_split_character(&text[..text.len() - 1]), 5);
        assert_eq!(without_a_split_character(&text[..text.len() - 2]), 5);
        assert_eq!(without_a_split_character(&text[..2]), 1);
        assert_eq!(without_a_split_character(b""), 0);
        // Invalid bytes are not this function's concern: logged as they are, replaced.
        assert_eq!(without_a_split_character(&[0x80, 0x80, 0x80, 0x80]), 4);
        assert_eq!(without_a_split_character(&[b'a', 0xF0, 0x9F]), 1);
    }
}
