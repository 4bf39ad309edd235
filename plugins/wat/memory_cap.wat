;; memory_cap.wat: a plugin that wants more than 1 GiB of linear memory (ABI 0.2.1).
;;
;; proxy_on_configure grows memory by 16384 pages (1 GiB) on top of its one page, then by 16
;; pages, and logs `grow past 1 GiB: refused` or `... allowed`, then `grow by 1 MiB: allowed` or
;; `... refused`. A host with proxy-wasm-cpp-host's default cap of 1 GiB refuses the first and
;; allows the second, so the plugin finds out here what it would find out in Envoy.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "grow past 1 GiB: refused")  ;; 24 bytes
  (data (i32.const 200) "grow past 1 GiB: allowed")  ;; 24 bytes
  (data (i32.const 300) "grow by 1 MiB: allowed")    ;; 22 bytes
  (data (i32.const 400) "grow by 1 MiB: refused")    ;; 22 bytes
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (if (i32.eq (memory.grow (i32.const 16384)) (i32.const -1))
      (then (drop (call $log (i32.const 2) (i32.const 100) (i32.const 24))))
      (else (drop (call $log (i32.const 2) (i32.const 200) (i32.const 24)))))
    (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1))
      (then (drop (call $log (i32.const 2) (i32.const 400) (i32.const 22))))
      (else (drop (call $log (i32.const 2) (i32.const 300) (i32.const 22)))))
    (i32.const 1))
)
