//! Native Proxy-Wasm plugins on the null runtime.
