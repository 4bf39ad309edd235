;; huge_allocation.wat: an allocator that returns unusable pointers (Proxy-Wasm ABI 0.2.1).
;;
;; proxy_on_memory_allocate ignores the requested size and, depending on $alloc_mode, returns
;;   mode 1 (default): 0xFFFFFFF0, far beyond the 1-page memory (and near the end of 4 GiB)
;;   mode 2:           0, which the spec defines as "allocation failed"
;;   mode 3:           65528 (64 KiB - 8): in bounds, but any block larger than 8 bytes
;;                     straddles the end of memory
;; Memory is exactly one page (min = max = 1) so these cases are deterministic.
;;
;; proxy_on_request_headers asks the host for data in each mode (the host has to call the
;; allocator and then copy into the returned block) and reports each returned status as a request
;; header (decimal, added with valid pointers, which needs no allocation):
;;   x-status-alloc-near-end-pairs   proxy_get_header_map_pairs, mode 1
;;   x-status-alloc-near-end-value   proxy_get_header_map_value(":path"), mode 1
;;   x-status-alloc-null-pairs       proxy_get_header_map_pairs, mode 2
;;   x-status-alloc-straddle-pairs   proxy_get_header_map_pairs, mode 3
;; then returns 0 (Continue). The request must carry a `:path` header.
;;
;; What a correct host must do: refuse every copy, i.e. return 6 (INVALID_MEMORY_ACCESS) for each
;; call (other non-zero error statuses are tolerable; 0 is a bug: it means the host wrote through
;; the null pointer or claimed success), or fail the VM cleanly (request handled per failure
;; policy). It must never write outside linear memory, crash, or panic.
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

  (memory (export "memory") 1 1)

  ;; 0x0100 u32 return_data slot, 0x0104 u32 return_size slot, 0x0180 digits scratch.
  ;; Header names are NUL-terminated (lengths computed with $strlen).
  (data (i32.const 0x0110) ":path")
  (data (i32.const 0x0200) "x-status-alloc-near-end-pairs")
  (data (i32.const 0x0240) "x-status-alloc-near-end-value")
  (data (i32.const 0x0280) "x-status-alloc-null-pairs")
  (data (i32.const 0x02c0) "x-status-alloc-straddle-pairs")

  (global $alloc_mode (mut i32) (i32.const 1))

  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (if (i32.eq (global.get $alloc_mode) (i32.const 2)) (then (return (i32.const 0))))
    (if (i32.eq (global.get $alloc_mode) (i32.const 3)) (then (return (i32.const 65528))))
    (i32.const 0xFFFFFFF0))

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

  ;; Adds request header <NUL-terminated name at $name>: <decimal $status>.
  (func $report (param $name i32) (param $status i32)
    (drop (call $proxy_add_header_map_value (i32.const 0)
      (local.get $name) (call $strlen (local.get $name))
      (i32.const 0x0180) (call $utoa (local.get $status) (i32.const 0x0180)))))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (local $near_end_pairs i32) (local $near_end_value i32)
    (local $null_pairs i32) (local $straddle_pairs i32)

    (global.set $alloc_mode (i32.const 1))
    (local.set $near_end_pairs
      (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0x0100) (i32.const 0x0104)))
    (local.set $near_end_value
      (call $proxy_get_header_map_value (i32.const 0) (i32.const 0x0110) (i32.const 5)
        (i32.const 0x0100) (i32.const 0x0104)))

    (global.set $alloc_mode (i32.const 2))
    (local.set $null_pairs
      (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0x0100) (i32.const 0x0104)))

    (global.set $alloc_mode (i32.const 3))
    (local.set $straddle_pairs
      (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0x0100) (i32.const 0x0104)))

    (global.set $alloc_mode (i32.const 1))
    (call $report (i32.const 0x0200) (local.get $near_end_pairs))
    (call $report (i32.const 0x0240) (local.get $near_end_value))
    (call $report (i32.const 0x0280) (local.get $null_pairs))
    (call $report (i32.const 0x02c0) (local.get $straddle_pairs))
    (i32.const 0))

  (func (export "proxy_on_done") (param $context_id i32) (result i32) (i32.const 1))
)
