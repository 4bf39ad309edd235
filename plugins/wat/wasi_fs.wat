;; wasi_fs.wat: WASI calls a sandboxed proxy host must answer with an errno, never a trap or a
;; link error (Proxy-Wasm ABI 0.2.1). TinyGo/Go/C plugins import these; most are never useful
;; in a proxy, but the module must load and the calls must fail cleanly.
;;
;; Imports from wasi_snapshot_preview1: path_open, fd_read, fd_prestat_get, fd_filestat_get,
;; sock_accept, poll_oneoff; from wasi_unstable (the pre-snapshot module name, same signature):
;; fd_write; from env: proxy_add_header_map_value. Exports memory, proxy_abi_version_0_2_1,
;; proxy_on_memory_allocate (bump allocator), proxy_on_context_create, proxy_on_vm_start,
;; proxy_on_configure and proxy_on_request_headers. No `_start`/`_initialize`.
;;
;; proxy_on_request_headers makes these calls and adds one request header per result (decimal;
;; output words are pre-filled with 4294967295 so "host never wrote it" is visible), then
;; returns 0 (Continue):
;;   x-errno-prestat        fd_prestat_get(3, buf)                     fd 3 is not preopened
;;   x-errno-path-open      path_open(3, 0, "etc/hostname", 0, rights fd_read, 0, 0, &fd)
;;   x-errno-fd-read        fd_read(3, [16-byte iovec], 1, &nread)
;;   x-errno-filestat       fd_filestat_get(3, buf)
;;   x-errno-sock-accept    sock_accept(3, 0, &fd)
;;   x-errno-fd-write       wasi_unstable.fd_write(1, ["hello via wasi_unstable\n"], 1, &n)
;;   x-fd-write-nwritten    n written by that fd_write
;;   x-errno-poll           poll_oneoff(in, out, 0 subscriptions, &nevents)
;;   x-poll-nevents         nevents of that call
;;   x-errno-poll-clock     poll_oneoff with ONE relative clock subscription (monotonic, timeout
;;                          0) -- what Go's runtime does to sleep
;;   x-poll-clock-nevents   nevents of that call
;;
;; Expected from pwhost (no preopens, no sockets): prestat 8, path-open 8, fd-read 8,
;; filestat 8 (EBADF: fd 3 is not open), sock-accept 76 (ENOTCAPABLE), fd-write 0 with
;; nwritten 24 (the line goes to the plugin log or is discarded), poll 0 with nevents 0,
;; poll-clock 0 with nevents 1. Any other host: every fd/socket errno must be non-zero (EBADF,
;; ENOTCAPABLE, ENOSYS... are all acceptable) and the module must load and not trap. Note that
;; wasmtime's wasi-common and Node's uvwasi answer poll_oneoff with zero subscriptions with
;; EINVAL (28) and leave nevents unwritten (x-poll-nevents: 4294967295), and uvwasi answers
;; sock_accept with EBADF (8); pwhost's contract is 0/0 for the empty poll and 76 for sockets.
;; (Checked under Node's WASI: every other value above matches.)
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open
      (param $fd i32) (param $dirflags i32) (param $path_ptr i32) (param $path_len i32)
      (param $oflags i32) (param $rights_base i64) (param $rights_inheriting i64)
      (param $fdflags i32) (param $result_fd i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read
      (param $fd i32) (param $iovs i32) (param $iovs_len i32) (param $result_nread i32)
      (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $fd_prestat_get (param $fd i32) (param $result_prestat i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_get"
    (func $fd_filestat_get (param $fd i32) (param $result_filestat i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept"
    (func $sock_accept (param $fd i32) (param $flags i32) (param $result_fd i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff
      (param $in i32) (param $out i32) (param $nsubscriptions i32) (param $result_nevents i32)
      (result i32)))
  (import "wasi_unstable" "fd_write"
    (func $fd_write
      (param $fd i32) (param $iovs i32) (param $iovs_len i32) (param $result_nwritten i32)
      (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  (memory (export "memory") 1)

  ;; Memory map:
  ;;   0x0180 decimal digits scratch
  ;;   0x0400.. header names (32 bytes apart)       0x0600 path, 0x0620 fd_write text
  ;;   0x0700 prestat out (8)     0x0710 path_open fd    0x0720 sock_accept fd
  ;;   0x0730 fd_write iovec (8)  0x0740 nwritten        0x0750 nevents (0 subscriptions)
  ;;   0x0760 nevents (clock)     0x0780 fd_read iovec   0x0790 nread      0x0800 read buffer
  ;;   0x0900 filestat out (64)   0x0a00 subscription (48)  0x0a40 event out (32)
  ;;   0x1000.. heap (proxy_on_memory_allocate)
  (data (i32.const 0x0400) "x-errno-prestat")
  (data (i32.const 0x0420) "x-errno-path-open")
  (data (i32.const 0x0440) "x-errno-sock-accept")
  (data (i32.const 0x0460) "x-errno-fd-write")
  (data (i32.const 0x0480) "x-errno-poll")
  (data (i32.const 0x04a0) "x-poll-nevents")
  (data (i32.const 0x04c0) "x-errno-fd-read")
  (data (i32.const 0x04e0) "x-errno-filestat")
  (data (i32.const 0x0500) "x-errno-poll-clock")
  (data (i32.const 0x0520) "x-poll-clock-nevents")
  (data (i32.const 0x0540) "x-fd-write-nwritten")
  (data (i32.const 0x0600) "etc/hostname")
  (data (i32.const 0x0620) "hello via wasi_unstable\n")

  ;; Bump allocator (as in minimal.wat): 8-byte aligned blocks from 0x1000, never frees.
  (global $heap_top (mut i32) (i32.const 0x1000))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    (local.set $ptr (global.get $heap_top))
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (if (i32.or (i32.lt_u (local.get $end) (local.get $ptr))
                (i32.gt_u (local.get $end) (i32.const 0xFFFF0000)))
      (then (return (i32.const 0))))
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have))
                                               (i32.const 65535))
                                      (i32.const 16)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap_top (local.get $end))
    (local.get $ptr))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (i32.const 1))

  ;; Writes the decimal form of $value at 0x0180 and returns its length.
  (func $utoa (param $value i32) (result i32)
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
      (i32.store8 (i32.add (i32.const 0x0180) (local.get $i))
                  (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $write (local.get $i)))
    (local.get $len))

  ;; Adds request header (name at $name, $name_len bytes): decimal $value.
  (func $report (param $name i32) (param $name_len i32) (param $value i32)
    (local $len i32)
    (local.set $len (call $utoa (local.get $value)))
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (local.get $name) (local.get $name_len) (i32.const 0x0180) (local.get $len))))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)

    ;; fd_prestat_get(3)
    (call $report (i32.const 0x0400) (i32.const 15)
      (call $fd_prestat_get (i32.const 3) (i32.const 0x0700)))

    ;; path_open(3, "etc/hostname") for reading
    (i32.store (i32.const 0x0710) (i32.const -1))
    (call $report (i32.const 0x0420) (i32.const 17)
      (call $path_open (i32.const 3) (i32.const 0) (i32.const 0x0600) (i32.const 12)
        (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 0x0710)))

    ;; fd_read(3) into a 16-byte buffer
    (i32.store (i32.const 0x0780) (i32.const 0x0800))
    (i32.store (i32.const 0x0784) (i32.const 16))
    (i32.store (i32.const 0x0790) (i32.const -1))
    (call $report (i32.const 0x04c0) (i32.const 15)
      (call $fd_read (i32.const 3) (i32.const 0x0780) (i32.const 1) (i32.const 0x0790)))

    ;; fd_filestat_get(3)
    (call $report (i32.const 0x04e0) (i32.const 16)
      (call $fd_filestat_get (i32.const 3) (i32.const 0x0900)))

    ;; sock_accept(3, 0)
    (i32.store (i32.const 0x0720) (i32.const -1))
    (call $report (i32.const 0x0440) (i32.const 19)
      (call $sock_accept (i32.const 3) (i32.const 0) (i32.const 0x0720)))

    ;; wasi_unstable.fd_write(stdout, "hello via wasi_unstable\n")
    (i32.store (i32.const 0x0730) (i32.const 0x0620))
    (i32.store (i32.const 0x0734) (i32.const 24))
    (i32.store (i32.const 0x0740) (i32.const -1))
    (call $report (i32.const 0x0460) (i32.const 16)
      (call $fd_write (i32.const 1) (i32.const 0x0730) (i32.const 1) (i32.const 0x0740)))
    (call $report (i32.const 0x0540) (i32.const 19) (i32.load (i32.const 0x0740)))

    ;; poll_oneoff with zero subscriptions
    (i32.store (i32.const 0x0750) (i32.const -1))
    (call $report (i32.const 0x0480) (i32.const 12)
      (call $poll_oneoff (i32.const 0x0a00) (i32.const 0x0a40) (i32.const 0) (i32.const 0x0750)))
    (call $report (i32.const 0x04a0) (i32.const 14) (i32.load (i32.const 0x0750)))

    ;; poll_oneoff with one subscription: clock, userdata 42, tag 0 (clock), id 1 (monotonic),
    ;; timeout 0 (relative: flags 0), precision 0
    (i64.store (i32.const 0x0a00) (i64.const 42))
    (i64.store (i32.const 0x0a08) (i64.const 0))   ;; tag + padding
    (i64.store (i32.const 0x0a10) (i64.const 1))   ;; clock id (u32) + padding
    (i64.store (i32.const 0x0a18) (i64.const 0))   ;; timeout
    (i64.store (i32.const 0x0a20) (i64.const 0))   ;; precision
    (i64.store (i32.const 0x0a28) (i64.const 0))   ;; flags + padding
    (i32.store (i32.const 0x0760) (i32.const -1))
    (call $report (i32.const 0x0500) (i32.const 18)
      (call $poll_oneoff (i32.const 0x0a00) (i32.const 0x0a40) (i32.const 1) (i32.const 0x0760)))
    (call $report (i32.const 0x0520) (i32.const 20) (i32.load (i32.const 0x0760)))

    (i32.const 0))
)
