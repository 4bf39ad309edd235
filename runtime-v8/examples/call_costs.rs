//! Measures what crossing between the host and V8 costs: a call into the guest, a host function
//! call from the guest, a re-entrant call from a host function, and creating an instance.
//!
//! `cargo run --release -p runtime-v8 --example call_costs`

use std::hint::black_box;
use std::time::{Duration, Instant};

use runtime_api::{Caller, HostFunction, RuntimeConfig, Signature, Trap, ValType, WasmRuntime};
use runtime_v8::V8Runtime;

/// The guest function host functions call back into.
#[derive(Default)]
struct State {
    callee: Option<runtime_api::GuestFunction>,
}

fn touch_memory(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    let mut memory = caller.memory();
    memory
        .write_u32(args[0], 1)
        .map_err(|e| Trap::host(e.to_string()))?;
    args[0] = 0;
    Ok(())
}

fn call_back(caller: &mut dyn Caller<State>, args: &mut [u64]) -> Result<(), Trap> {
    let callee = caller
        .state()
        .callee
        .ok_or_else(|| Trap::host("no callee"))?;
    let mut result = [0];
    caller.call(callee, &[args[0]], &mut result)?;
    args[0] = result[0];
    Ok(())
}

static HOST: &[HostFunction<State>] = &[
    HostFunction {
        module: "env",
        name: "touch_memory",
        signature: Signature::new(&[ValType::I32], &[ValType::I32]),
        callback: touch_memory,
    },
    HostFunction {
        module: "env",
        name: "call_back",
        signature: Signature::new(&[ValType::I32], &[ValType::I32]),
        callback: call_back,
    },
];

const MODULE: &str = r#"
(module
  (import "env" "touch_memory" (func $touch_memory (param i32) (result i32)))
  (import "env" "call_back" (func $call_back (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "identity") (param i32) (result i32) (local.get 0))
  (func (export "host_calls") (param $n i32) (result i32)
    (loop $again
      (drop (call $touch_memory (i32.const 16)))
      (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
    (i32.const 0))
  (func (export "reentrant_calls") (param $n i32) (result i32)
    (loop $again
      (drop (call $call_back (local.get $n)))
      (br_if $again (local.tee $n (i32.sub (local.get $n) (i32.const 1)))))
    (i32.const 0)))
"#;

/// The best of five rounds of `iterations` runs of `f`, per run.
fn best(iterations: u32, mut f: impl FnMut()) -> Duration {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed() / iterations
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let runtime = V8Runtime::new(RuntimeConfig {
        call_deadline: Some(Duration::from_secs(10)),
        ..RuntimeConfig::default()
    })
    .expect("V8 starts");
    let wasm = wat::parse_str(MODULE).expect("valid text");
    let module = WasmRuntime::<State>::compile(&runtime, &wasm).expect("valid module");
    let linked = module.link(HOST).expect("imports resolve");
    let mut instance = linked.instantiate(State::default()).expect("instantiates");
    let identity = instance.function("identity").expect("exported");
    instance.state().callee = Some(identity);
    let host_calls = instance.function("host_calls").expect("exported");
    let reentrant_calls = instance.function("reentrant_calls").expect("exported");
    let mut result = [0];

    let call = best(200_000, || {
        instance
            .call(identity, &[black_box(7)], &mut result)
            .expect("runs");
    });
    println!("call into the guest (with a 10 s deadline): {call:?}");
    const N: u64 = 1000;
    let host = best(200, || {
        instance.call(host_calls, &[N], &mut result).expect("runs");
    });
    println!(
        "host function call with a memory access:    {:?}",
        host / N as u32
    );
    let reentrant = best(200, || {
        instance
            .call(reentrant_calls, &[N], &mut result)
            .expect("runs");
    });
    println!(
        "re-entrant call from a host function:        {:?}",
        reentrant / N as u32
    );
    let start = best(20, || {
        drop(black_box(
            linked.instantiate(State::default()).expect("instantiates"),
        ));
    });
    println!("instantiate and drop:                        {start:?}");
}
