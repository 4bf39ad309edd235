// The C ABI of pwhost's V8 shim: everything runtime-v8 needs from V8, as plain C.
//
// Every function catches every C++ exception before it can cross this boundary and reports it as
// an error. Handles are opaque; the Rust side owns them and frees them with the matching
// `*_delete` function. Strings passed in are (pointer, length) pairs, not NUL-terminated; messages
// passed out are allocated by the shim and freed with `pwv8_text_free`.

#ifndef PWHOST_V8_H
#define PWHOST_V8_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// A module compiled once and instantiable in any isolate.
typedef struct pwv8_module pwv8_module;
/// One instance: an isolate, a context and the module's instance in it.
typedef struct pwv8_vm pwv8_vm;

/// A message allocated by the shim (`ptr` may be NULL when `len` is 0).
typedef struct pwv8_text {
  char* ptr;
  size_t len;
} pwv8_text;

/// How a function passes its values.
typedef struct pwv8_shape {
  /// The number of parameters (at most 16).
  uint32_t params;
  /// Bit i set: parameter i is an i64 (else an i32).
  uint32_t i64_params;
  /// -1: no result; 0: an i32 result; 1: an i64 result.
  int32_t result;
} pwv8_shape;

/// A host function the module imports.
typedef struct pwv8_import {
  const char* module;
  size_t module_len;
  const char* name;
  size_t name_len;
  pwv8_shape shape;
} pwv8_import;

/// Calls host function `import_index` with `count` argument slots (at least one); the result, if
/// any, goes to slot 0. Returns 0, or non-zero when the call failed (the host remembers why) and
/// the guest must unwind.
typedef int32_t (*pwv8_host_fn)(void* host_context, uint32_t import_index, uint64_t* slots,
                                uint32_t count);

/// Status of calls into V8.
enum {
  /// Completed.
  PWV8_OK = 0,
  /// A JavaScript exception (a wasm trap, or a host function failing); the message says which.
  PWV8_THROWN = 1,
  /// `TerminateExecution` stopped the call.
  PWV8_TERMINATED = 2,
  /// The shim could not do what was asked; the message says why.
  PWV8_FAILED = 3,
};

/// Starts V8 once per process: sets `flags` (V8 command-line syntax), creates the platform with
/// `thread_pool_size` worker threads and initialises V8. Returns PWV8_OK or PWV8_FAILED.
int32_t pwv8_initialize(const char* flags, size_t flags_len, uint32_t thread_pool_size,
                        pwv8_text* message);

/// Compiles (and validates) a module. NULL on failure, with the reason in `message`.
pwv8_module* pwv8_compile(const uint8_t* bytes, size_t len, pwv8_text* message);

/// Frees a compiled module. Instances made from it stay valid.
void pwv8_module_delete(pwv8_module* module);

/// Creates an isolate and a context for one instance. NULL on failure.
pwv8_vm* pwv8_vm_new(pwv8_text* message);

/// Instantiates `module` in `vm`, with `imports` (in the module's import order) calling
/// `host_fn(host_context, index, ...)`. Runs the module's start function. Returns a status.
int32_t pwv8_vm_instantiate(pwv8_vm* vm, const pwv8_module* module, const pwv8_import* imports,
                            size_t import_count, pwv8_host_fn host_fn, void* host_context,
                            pwv8_text* message);

/// Resolves exported function `name` once; returns its index for `pwv8_vm_call`, or -1 if the
/// instance exports no function of that name.
int32_t pwv8_vm_export_function(pwv8_vm* vm, const char* name, size_t name_len, pwv8_shape shape);

/// Calls function `index` with `args`, writing `results` (the counts must match its shape).
/// `nested` is non-zero from inside a host function (the isolate is already entered and locked).
int32_t pwv8_vm_call(pwv8_vm* vm, uint32_t index, const uint64_t* args, uint32_t arg_count,
                     uint64_t* results, uint32_t result_count, int32_t nested,
                     pwv8_text* message);

/// The exported memory's current bytes (`*base` NULL and `*len` 0 without one). `nested` as in
/// `pwv8_vm_call`.
int32_t pwv8_vm_memory(pwv8_vm* vm, int32_t nested, uint8_t** base, size_t* len);

/// Whether the JS heap reached its limit during the last call (then the call was terminated and
/// the instance refuses further calls).
int32_t pwv8_vm_heap_exhausted(const pwv8_vm* vm);

/// Stops the running call of `vm`, even one that has not taken the isolate's lock yet; every
/// entry into `vm` is stopped until `pwv8_vm_cancel_terminate`. Callable from any thread while
/// `vm` is alive.
void pwv8_vm_terminate(pwv8_vm* vm);

/// Undoes `pwv8_vm_terminate` (and a termination the heap limit caused), so the instance runs
/// calls again. Takes the isolate's lock: call it once the call has returned, not from inside
/// one, and when no `pwv8_vm_terminate` can follow for the call that was stopped.
void pwv8_vm_cancel_terminate(pwv8_vm* vm);

/// Disposes of the instance, its context and its isolate.
void pwv8_vm_delete(pwv8_vm* vm);

/// An identifier of the calling thread's CPU-time clock, for `pwv8_cpu_time_ns` from any thread;
/// -1 if there is none.
int64_t pwv8_current_thread_cpu_clock(void);

/// The CPU time, in nanoseconds, of the thread whose clock `pwv8_current_thread_cpu_clock`
/// returned; -1 if it cannot be read (e.g. the thread exited).
int64_t pwv8_cpu_time_ns(int64_t clock);

/// Frees a message.
void pwv8_text_free(pwv8_text text);

#ifdef __cplusplus
}
#endif

#endif  // PWHOST_V8_H
