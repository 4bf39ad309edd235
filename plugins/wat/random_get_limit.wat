;; random_get_limit.wat: WASI random_get above proxy-wasm-cpp-host's 64 KiB limit (ABI 0.2.1).
;;
;; proxy_on_configure calls random_get for 65536 bytes, then for 65537, and logs each errno as
;; `random_get 65536: <errno>` / `random_get 65537: <errno>` (two decimal digits). A host with the
;; reference host's limit answers 0, then EINVAL (28).
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (memory (export "memory") 3)
  (data (i32.const 100) "random_get 65536: ..")  ;; 20 bytes, digits at 118
  (data (i32.const 200) "random_get 65537: ..")  ;; 20 bytes, digits at 218
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $report (param $at i32) (param $errno i32)
    (i32.store8 (i32.add (local.get $at) (i32.const 18))
      (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
    (i32.store8 (i32.add (local.get $at) (i32.const 19))
      (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
    (drop (call $log (i32.const 2) (local.get $at) (i32.const 20))))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (call $report (i32.const 100) (call $random_get (i32.const 65536) (i32.const 65536)))
    (call $report (i32.const 200) (call $random_get (i32.const 65536) (i32.const 65537)))
    (i32.const 1))
)
