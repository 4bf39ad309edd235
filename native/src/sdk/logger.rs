//! Logging for native plugins: the `log`-style macros of this SDK send to the host's
//! `proxy_log` at or above the plugin's level (set with [`super::set_log_level`]).
//!
//! The level is per plugin instance: the dispatcher publishes the running instance's level in a
//! thread-local for the duration of each callback.

use std::cell::Cell;

use super::types::LogLevel;

thread_local! {
    static LEVEL: Cell<LogLevel> = const { Cell::new(LogLevel::Trace) };
    static REQUESTED: Cell<Option<LogLevel>> = const { Cell::new(None) };
}

pub(crate) fn set_log_level(level: LogLevel) {
    LEVEL.with(|l| l.set(level));
    REQUESTED.with(|r| r.set(Some(level)));
}

/// The level `set_log_level` asked for during the last callback, if it was called.
pub(crate) fn take_requested_level() -> Option<LogLevel> {
    REQUESTED.with(Cell::take)
}

/// Makes `level` the running instance's level until the returned guard drops.
pub(crate) fn enter(level: LogLevel) -> LevelGuard {
    LevelGuard(LEVEL.with(|l| l.replace(level)))
}

pub(crate) struct LevelGuard(LogLevel);

impl Drop for LevelGuard {
    fn drop(&mut self) {
        LEVEL.with(|l| l.set(self.0));
    }
}

/// Logs `message` at `level` if the plugin's level lets it through. Used by the macros.
pub fn log(level: LogLevel, message: std::fmt::Arguments<'_>) {
    if level >= LEVEL.with(Cell::get) {
        match message.as_str() {
            // A message without arguments needs no formatting.
            Some(message) => super::hostcalls::log(level, message),
            None => super::hostcalls::log(level, &message.to_string()),
        }
    }
}

/// Logs at trace level, like `log::trace!`.
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::sdk::log($crate::sdk::LogLevel::Trace, format_args!($($arg)+)) } }
/// Logs at debug level, like `log::debug!`.
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::sdk::log($crate::sdk::LogLevel::Debug, format_args!($($arg)+)) } }
/// Logs at info level, like `log::info!`.
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::sdk::log($crate::sdk::LogLevel::Info, format_args!($($arg)+)) } }
/// Logs at warn level, like `log::warn!`.
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::sdk::log($crate::sdk::LogLevel::Warn, format_args!($($arg)+)) } }
/// Logs at error level, like `log::error!`.
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::sdk::log($crate::sdk::LogLevel::Error, format_args!($($arg)+)) } }
