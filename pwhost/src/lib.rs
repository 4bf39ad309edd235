//! `pwhost`: run Proxy-Wasm plugins against scripted traffic and report what they did.
//!
//! The library half of the `pwhost` command: [`scenario`] describes traffic and runs it through a
//! plugin on any engine of [`runtimes`], producing a [`scenario::Report`]. The conformance suite
//! uses the same runner, so `pwhost run` and the tests cannot drift apart.

pub mod bench;
pub mod configured;
pub mod scenario;

pub use engines::{plugins, runtimes};
