;; emscripten_like.wat: the import the C++ SDK's Emscripten builds add beside the ABI,
;; `env.emscripten_notify_memory_growth(memory_index)`, called by the allocator after it grows
;; memory. A correct host provides it (a no-op is fine) and keeps reading memory correctly after
;; the growth. proxy_on_request_headers reads `:path` (which grows memory through malloc) and adds
;; `x-emscripten-like: <path>`.
(module
  (import "env" "emscripten_notify_memory_growth" (func $notify (param i32)))
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 16) ":path")
  (data (i32.const 32) "x-emscripten-like")

  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize"))

  ;; Every allocation takes a fresh page at the end of memory and tells the host.
  (func (export "malloc") (param $size i32) (result i32)
    (local $pages i32)
    (local.set $pages (memory.grow (i32.add (i32.shr_u (local.get $size) (i32.const 16)) (i32.const 1))))
    (if (i32.eq (local.get $pages) (i32.const -1)) (then (return (i32.const 0))))
    (call $notify (i32.const 0))
    (i32.shl (local.get $pages) (i32.const 16)))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 600) (i32.const 604)))
      (then
        (drop (call $add_header (i32.const 0) (i32.const 32) (i32.const 17)
          (i32.load (i32.const 600)) (i32.load (i32.const 604))))))
    (i32.const 0))
)
