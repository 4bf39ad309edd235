;; bad_pointers.wat: host-call argument validation (Proxy-Wasm ABI 0.2.1).
;;
;; What it tests: host functions called with pointers/lengths that do not fit in linear memory:
;; pointer beyond memory, pointer exactly at the end, a range straddling the end, ptr+len that
;; overflows u32, huge lengths, -1 used as pointer or length, and out-of-bounds *return* pointers
;; (where the host has to write results back).
;;
;; Memory is exactly one page (64 KiB, max 1 page) so every "bad" address below is out of bounds.
;;
;; proxy_on_request_headers performs every call, stores each returned status in a table, and
;; at the end adds one request header per call, `x-status-<case>: <decimal status>`, using valid
;; pointers. It returns 0 (Continue). The request must carry a `:path` header.
;;
;; A correct host never crashes or traps here and returns 6 (INVALID_MEMORY_ACCESS) for every bad
;; pointer case, 0 for the `log-ok` control case, and 2 (BAD_ARGUMENT) for `set-pairs-malformed`
;; (a valid pointer to header-pair data whose count claims 1000 pairs in an 8-byte buffer).
;; After the calls the request headers must be intact: no `x-bad-add` / `x-bad-replace` header,
;; `:path` still present.
;;
;; proxy_on_configure additionally calls proxy_get_buffer_bytes(PLUGIN_CONFIGURATION) with bad
;; return pointers; the statuses are reported as `x-status-get-buffer-bad-ret-data` and
;; `x-status-get-buffer-bad-ret-size` (expect 6). Run the plugin with a NON-EMPTY plugin
;; configuration; with an empty one a host may legitimately answer 1 (NOT_FOUND) or 0 without
;; writing anything. `255` means on_configure was never called.
;;
;; Expected headers (case -> status):
;;   log-ok 0, log-bad-ptr 6, log-at-end 6, log-straddle 6, log-overflow 6, log-huge-len 6,
;;   log-neg-ptr 6, log-neg-len 6, get-value-bad-key 6, get-value-bad-ret-data 6,
;;   get-value-bad-ret-size 6, add-value-bad-key 6, add-value-bad-value 6,
;;   replace-value-bad-value 6, remove-value-bad-key 6, get-pairs-bad-ret-data 6,
;;   get-pairs-bad-ret-size 6, get-property-bad-path 6, get-property-huge-path 6,
;;   set-property-bad-value 6, get-time-bad-ret 6, get-time-straddle 6,
;;   get-log-level-bad-ret 6, set-pairs-bad-ptr 6, set-pairs-malformed 2,
;;   get-buffer-bad-ret-data 6, get-buffer-bad-ret-size 6.
(module
  (import "env" "proxy_log"
    (func $proxy_log (param $level i32) (param $ptr i32) (param $len i32) (result i32)))
  (import "env" "proxy_get_log_level"
    (func $proxy_get_log_level (param $return_level i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds"
    (func $proxy_get_current_time_nanoseconds (param $return_time i32) (result i32)))
  (import "env" "proxy_get_header_map_value"
    (func $proxy_get_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $return_value_data i32) (param $return_value_size i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))
  (import "env" "proxy_replace_header_map_value"
    (func $proxy_replace_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))
  (import "env" "proxy_remove_header_map_value"
    (func $proxy_remove_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs"
    (func $proxy_get_header_map_pairs
      (param $map i32) (param $return_data i32) (param $return_size i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs"
    (func $proxy_set_header_map_pairs
      (param $map i32) (param $data i32) (param $size i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes"
    (func $proxy_get_buffer_bytes
      (param $buffer i32) (param $start i32) (param $max_size i32)
      (param $return_data i32) (param $return_size i32) (result i32)))
  (import "env" "proxy_get_property"
    (func $proxy_get_property
      (param $path_ptr i32) (param $path_len i32)
      (param $return_data i32) (param $return_size i32) (result i32)))
  (import "env" "proxy_set_property"
    (func $proxy_set_property
      (param $path_ptr i32) (param $path_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  ;; One fixed page: addresses >= 65536 are always out of bounds.
  (memory (export "memory") 1 1)

  ;; ---- memory layout ----------------------------------------------------------------------
  ;; 0x0100  u32 return_data slot      0x0104  u32 return_size slot
  ;; 0x0110  ":path"                   0x0120  "x-bad-add"          0x0130  "x-bad-replace"
  ;; 0x0140  malformed header pairs (count = 1000, then 4 zero bytes; 8 bytes total)
  ;; 0x0150  "pwhost\00bad" property path (10 bytes)
  ;; 0x0160  control log message
  ;; 0x0180  decimal digits scratch    0x0200  header-name scratch ("x-status-" + case name)
  ;; 0x0300  "x-status-"
  ;; 0x0600  status table: u32 per case
  ;; 0x0800  case names, NUL-terminated, one 64-byte slot per case (slot k at 0x0800 + 64*k)
  ;; 0x8000..0x10000  allocator arena
  (data (i32.const 0x0110) ":path")
  (data (i32.const 0x0120) "x-bad-add")
  (data (i32.const 0x0130) "x-bad-replace")
  (data (i32.const 0x0140) "\e8\03\00\00\00\00\00\00")
  (data (i32.const 0x0150) "pwhost\00bad")
  (data (i32.const 0x0160) "bad_pointers: control message")
  (data (i32.const 0x0300) "x-status-")

  (data (i32.const 0x0800) "log-ok")                     ;; 0
  (data (i32.const 0x0840) "log-bad-ptr")                ;; 1
  (data (i32.const 0x0880) "log-at-end")                 ;; 2
  (data (i32.const 0x08c0) "log-straddle")               ;; 3
  (data (i32.const 0x0900) "log-overflow")               ;; 4
  (data (i32.const 0x0940) "log-huge-len")               ;; 5
  (data (i32.const 0x0980) "log-neg-ptr")                ;; 6
  (data (i32.const 0x09c0) "log-neg-len")                ;; 7
  (data (i32.const 0x0a00) "get-value-bad-key")          ;; 8
  (data (i32.const 0x0a40) "get-value-bad-ret-data")     ;; 9
  (data (i32.const 0x0a80) "get-value-bad-ret-size")     ;; 10
  (data (i32.const 0x0ac0) "add-value-bad-key")          ;; 11
  (data (i32.const 0x0b00) "add-value-bad-value")        ;; 12
  (data (i32.const 0x0b40) "replace-value-bad-value")    ;; 13
  (data (i32.const 0x0b80) "remove-value-bad-key")       ;; 14
  (data (i32.const 0x0bc0) "get-pairs-bad-ret-data")     ;; 15
  (data (i32.const 0x0c00) "get-pairs-bad-ret-size")     ;; 16
  (data (i32.const 0x0c40) "get-property-bad-path")      ;; 17
  (data (i32.const 0x0c80) "get-property-huge-path")     ;; 18
  (data (i32.const 0x0cc0) "set-property-bad-value")     ;; 19
  (data (i32.const 0x0d00) "get-time-bad-ret")           ;; 20
  (data (i32.const 0x0d40) "get-time-straddle")          ;; 21
  (data (i32.const 0x0d80) "get-log-level-bad-ret")      ;; 22
  (data (i32.const 0x0dc0) "set-pairs-bad-ptr")          ;; 23
  (data (i32.const 0x0e00) "set-pairs-malformed")        ;; 24
  (data (i32.const 0x0e40) "get-buffer-bad-ret-data")    ;; 25 (recorded in on_configure)
  (data (i32.const 0x0e80) "get-buffer-bad-ret-size")    ;; 26 (recorded in on_configure)
  ;; number of cases
  (global $num_cases i32 (i32.const 27))

  ;; Status table entries default to 255 ("not run"); see $init_table.
  (global $table_ready (mut i32) (i32.const 0))

  ;; ---- allocator: bump within [0x8000, 0x10000), wraps around when full ------------------
  (global $heap_top (mut i32) (i32.const 0x8000))
  (func $malloc (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (if (i32.gt_u (local.get $size) (i32.const 0x8000))
      (then (return (i32.const 0))))
    (if (i32.gt_u (i32.add (global.get $heap_top) (local.get $size)) (i32.const 0x10000))
      (then (global.set $heap_top (i32.const 0x8000))))
    (local.set $ptr (global.get $heap_top))
    (global.set $heap_top
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (local.get $ptr))

  ;; ---- helpers ----------------------------------------------------------------------------
  (func $init_table
    (local $k i32)
    (if (global.get $table_ready) (then (return)))
    (loop $fill
      (i32.store (i32.add (i32.const 0x0600) (i32.shl (local.get $k) (i32.const 2)))
                 (i32.const 255))
      (local.set $k (i32.add (local.get $k) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $k) (global.get $num_cases))))
    (global.set $table_ready (i32.const 1)))

  ;; table[k] = status
  (func $record (param $k i32) (param $status i32)
    (i32.store (i32.add (i32.const 0x0600) (i32.shl (local.get $k) (i32.const 2)))
               (local.get $status)))

  (func $strlen (param $ptr i32) (result i32)
    (local $len i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $next)))
    (local.get $len))

  ;; Writes the decimal form of $value at 0x0180 and returns its length.
  (func $utoa (param $value i32) (result i32)
    (local $len i32) (local $v i32) (local $i i32)
    ;; count digits
    (local.set $v (local.get $value))
    (loop $count
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $count (local.get $v)))
    ;; write digits from the end
    (local.set $v (local.get $value))
    (local.set $i (local.get $len))
    (loop $write
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (i32.const 0x0180) (local.get $i))
                  (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $write (local.get $i)))
    (local.get $len))

  ;; Adds request header "x-status-<name of case k>: <table[k]>".
  (func $report (param $k i32)
    (local $name i32) (local $name_len i32) (local $i i32) (local $value_len i32)
    (local.set $name (i32.add (i32.const 0x0800) (i32.shl (local.get $k) (i32.const 6))))
    (local.set $name_len (call $strlen (local.get $name)))
    ;; header name = "x-status-" (9 bytes) + case name, built at 0x0200
    (i64.store (i32.const 0x0200) (i64.load (i32.const 0x0300)))
    (i32.store8 (i32.const 0x0208) (i32.load8_u (i32.const 0x0308)))
    (block $copied
      (loop $copy
        (br_if $copied (i32.ge_u (local.get $i) (local.get $name_len)))
        (i32.store8 (i32.add (i32.const 0x0209) (local.get $i))
                    (i32.load8_u (i32.add (local.get $name) (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $copy)))
    (local.set $value_len
      (call $utoa (i32.load (i32.add (i32.const 0x0600) (i32.shl (local.get $k) (i32.const 2))))))
    (drop (call $proxy_add_header_map_value
      (i32.const 0)
      (i32.const 0x0200) (i32.add (i32.const 9) (local.get $name_len))
      (i32.const 0x0180) (local.get $value_len))))

  ;; ---- callbacks --------------------------------------------------------------------------
  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (call $init_table)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (call $init_table)
    ;; buffer 7 = PLUGIN_CONFIGURATION
    (call $record (i32.const 25)
      (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $config_size)
        (i32.const 0xFFFF0000) (i32.const 0x0104)))
    (call $record (i32.const 26)
      (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $config_size)
        (i32.const 0x0100) (i32.const 0xFFFFFFFE)))
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (local $k i32)
    (call $init_table)

    ;; proxy_log(level=2 info, ptr, len)
    (call $record (i32.const 0) (call $proxy_log (i32.const 2) (i32.const 0x0160) (i32.const 29)))
    (call $record (i32.const 1) (call $proxy_log (i32.const 2) (i32.const 0xFFFF0000) (i32.const 8)))
    (call $record (i32.const 2) (call $proxy_log (i32.const 2) (i32.const 65536) (i32.const 1)))
    (call $record (i32.const 3) (call $proxy_log (i32.const 2) (i32.const 65530) (i32.const 10)))
    (call $record (i32.const 4) (call $proxy_log (i32.const 2) (i32.const 0xFFFFFFF0) (i32.const 0x20)))
    (call $record (i32.const 5) (call $proxy_log (i32.const 2) (i32.const 0x0160) (i32.const 0x7FFFFFFF)))
    (call $record (i32.const 6) (call $proxy_log (i32.const 2) (i32.const -1) (i32.const 1)))
    (call $record (i32.const 7) (call $proxy_log (i32.const 2) (i32.const 0x0160) (i32.const -1)))

    ;; proxy_get_header_map_value(map=0 request headers, key, key_len, ret_data, ret_size)
    (call $record (i32.const 8)
      (call $proxy_get_header_map_value (i32.const 0)
        (i32.const 0xFFFF0000) (i32.const 5) (i32.const 0x0100) (i32.const 0x0104)))
    (call $record (i32.const 9)
      (call $proxy_get_header_map_value (i32.const 0)
        (i32.const 0x0110) (i32.const 5) (i32.const 0xFFFF0000) (i32.const 0x0104)))
    (call $record (i32.const 10)
      (call $proxy_get_header_map_value (i32.const 0)
        (i32.const 0x0110) (i32.const 5) (i32.const 0x0100) (i32.const 65534)))

    ;; proxy_add_header_map_value / replace / remove
    (call $record (i32.const 11)
      (call $proxy_add_header_map_value (i32.const 0)
        (i32.const 0xFFFF0000) (i32.const 5) (i32.const 0x0110) (i32.const 1)))
    (call $record (i32.const 12)
      (call $proxy_add_header_map_value (i32.const 0)
        (i32.const 0x0120) (i32.const 9) (i32.const 0xFFFF0000) (i32.const 4)))
    (call $record (i32.const 13)
      (call $proxy_replace_header_map_value (i32.const 0)
        (i32.const 0x0130) (i32.const 13) (i32.const 0xFFFFFFF0) (i32.const 0x20)))
    (call $record (i32.const 14)
      (call $proxy_remove_header_map_value (i32.const 0) (i32.const -1) (i32.const 1)))

    ;; proxy_get_header_map_pairs(map, ret_data, ret_size)
    (call $record (i32.const 15)
      (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0xFFFF0000) (i32.const 0x0104)))
    (call $record (i32.const 16)
      (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 0x0100) (i32.const 65534)))

    ;; proxy_get_property(path, path_len, ret_data, ret_size) / proxy_set_property
    (call $record (i32.const 17)
      (call $proxy_get_property (i32.const 0xFFFF0000) (i32.const 10)
        (i32.const 0x0100) (i32.const 0x0104)))
    (call $record (i32.const 18)
      (call $proxy_get_property (i32.const 0x0150) (i32.const 0x7FFFFFFF)
        (i32.const 0x0100) (i32.const 0x0104)))
    (call $record (i32.const 19)
      (call $proxy_set_property (i32.const 0x0150) (i32.const 10)
        (i32.const 0xFFFF0000) (i32.const 4)))

    ;; 8-byte time write: beyond memory, and straddling the end (65532 + 8 > 65536)
    (call $record (i32.const 20) (call $proxy_get_current_time_nanoseconds (i32.const 0xFFFF0000)))
    (call $record (i32.const 21) (call $proxy_get_current_time_nanoseconds (i32.const 65532)))
    (call $record (i32.const 22) (call $proxy_get_log_level (i32.const 0xFFFF0000)))

    ;; proxy_set_header_map_pairs last: a buggy host that accepts them could clobber headers.
    (call $record (i32.const 23)
      (call $proxy_set_header_map_pairs (i32.const 0) (i32.const 0xFFFF0000) (i32.const 16)))
    (call $record (i32.const 24)
      (call $proxy_set_header_map_pairs (i32.const 0) (i32.const 0x0140) (i32.const 8)))

    ;; report every case as a request header
    (loop $each
      (call $report (local.get $k))
      (local.set $k (i32.add (local.get $k) (i32.const 1)))
      (br_if $each (i32.lt_u (local.get $k) (global.get $num_cases))))
    (i32.const 0))

  (func (export "proxy_on_done") (param $context_id i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param $context_id i32))
  (func (export "proxy_on_delete") (param $context_id i32))
)
