;; grow_memory.wat: an allocator that grows linear memory on EVERY allocation (ABI 0.2.1).
;;
;; proxy_on_memory_allocate calls `memory.grow` for max(1, ceil(size / 64 KiB)) fresh pages each
;; time and returns the start of the new pages. Memory starts at 1 page with no maximum. Growing
;; may move the memory's base address in the host, so a host that caches a raw pointer/slice
;; to linear memory across the allocator call writes to stale memory: the host must re-read the
;; memory base (and size) after every call into the plugin.
;;
;; proxy_on_request_headers (the request must carry `:path`):
;;   1. proxy_get_header_map_pairs(request headers) -> adds `x-grow-pairs: <pair count read from
;;      the returned blob>` and `x-grow-num-headers: <num_headers argument>` (they should match)
;;   2. proxy_get_header_map_value(":path") -> adds `x-grow-path: <the value read back from the
;;      returned block>` (must equal the request's path)
;;   3. adds `x-grow-pages: <memory.size in pages>` (>= 3 after the first request: 1 initial page
;;      plus at least one per allocation)
;;   4. always adds `x-grow-status-pairs` / `x-grow-status-path` with the decimal statuses
;;      (expect 0)
;; and returns 0 (Continue).
;;
;; Note: memory only ever grows (by >= 2 pages per request), so this module is for functional
;; tests, not load tests.
(module
  (import "env" "proxy_get_header_map_value"
    (func $proxy_get_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $return_value_data i32) (param $return_value_size i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs"
    (func $proxy_get_header_map_pairs
      (param $map i32) (param $return_data i32) (param $return_size i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  (memory (export "memory") 1)

  ;; 0x0100 u32 return_data slot, 0x0104 u32 return_size slot, 0x0180 digits scratch.
  ;; Strings are NUL-terminated (lengths computed with $strlen).
  (data (i32.const 0x0110) ":path")
  (data (i32.const 0x0200) "x-grow-pairs")
  (data (i32.const 0x0220) "x-grow-num-headers")
  (data (i32.const 0x0240) "x-grow-path")
  (data (i32.const 0x0260) "x-grow-pages")
  (data (i32.const 0x0280) "x-grow-status-pairs")
  (data (i32.const 0x02a0) "x-grow-status-path")

  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $pages i32) (local $old_pages i32)
    (local.set $pages (i32.shr_u (i32.add (local.get $size) (i32.const 65535)) (i32.const 16)))
    ;; size > 4 GiB - 64 KiB wraps above; such a request can never succeed anyway
    (if (i32.gt_u (local.get $size) (i32.const 0xFFFF0000)) (then (return (i32.const 0))))
    (if (i32.eqz (local.get $pages)) (then (local.set $pages (i32.const 1))))
    (local.set $old_pages (memory.grow (local.get $pages)))
    (if (i32.eq (local.get $old_pages) (i32.const -1)) (then (return (i32.const 0))))
    (i32.shl (local.get $old_pages) (i32.const 16)))

  (func $strlen (param $ptr i32) (result i32)
    (local $len i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $next)))
    (local.get $len))

  ;; Writes the decimal form of $value at $dst and returns its length.
  (func $utoa (param $value i32) (param $dst i32) (result i32)
    (local $len i32) (local $v i32) (local $i i32)
    (local.set $v (local.get $value))
    (loop $count
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $count (local.get $v)))
    (local.set $v (local.get $value))
    (local.set $i (local.get $len))
    (loop $write
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $dst) (local.get $i))
                  (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $write (local.get $i)))
    (local.get $len))

  ;; Adds request header <NUL-terminated name at $name>: <value bytes>.
  (func $add (param $name i32) (param $value i32) (param $value_len i32)
    (drop (call $proxy_add_header_map_value (i32.const 0)
      (local.get $name) (call $strlen (local.get $name))
      (local.get $value) (local.get $value_len))))

  ;; Adds request header <NUL-terminated name at $name>: <decimal $n>.
  (func $add_number (param $name i32) (param $n i32)
    (call $add (local.get $name)
      (i32.const 0x0180) (call $utoa (local.get $n) (i32.const 0x0180))))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (local $pairs_status i32) (local $path_status i32)

    ;; 1. all pairs; the blob starts with the u32 pair count
    (local.set $pairs_status
      (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0x0100) (i32.const 0x0104)))
    (if (i32.eqz (local.get $pairs_status))
      (then
        (call $add_number (i32.const 0x0200) (i32.load (i32.load (i32.const 0x0100))))
        (call $add_number (i32.const 0x0220) (local.get $num_headers))))

    ;; 2. one value, echoed back from wherever the allocator put it
    (local.set $path_status
      (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x0110) (i32.const 5)
        (i32.const 0x0100) (i32.const 0x0104)))
    (if (i32.eqz (local.get $path_status))
      (then
        (call $add (i32.const 0x0240) (i32.load (i32.const 0x0100)) (i32.load (i32.const 0x0104)))))

    ;; 3. and 4.
    (call $add_number (i32.const 0x0260) (memory.size))
    (call $add_number (i32.const 0x0280) (local.get $pairs_status))
    (call $add_number (i32.const 0x02a0) (local.get $path_status))
    (i32.const 0))

  (func (export "proxy_on_done") (param $context_id i32) (result i32) (i32.const 1))
)
