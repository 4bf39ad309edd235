//! WAMR's process-wide state: initialisation, per-thread environments and the registry of
//! native functions.
//!
//! WAMR keeps one runtime per process and one registry of native functions, keyed by import
//! module name. pwhost registers every import name once, all pointing at the same trampoline
//! ([`native_trampoline`]); which host function runs is decided per call, from the instance the
//! exec env belongs to (its user data) and the symbol's attachment (an interned symbol number).
//! So modules linked against different host tables never overwrite each other's functions.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use runtime_api::Error;
use wamrx_sys as sys;

/// Whether [`init`] succeeded, once per process.
static INITIALISED: OnceLock<Result<(), String>> = OnceLock::new();

/// Initialises WAMR once per process (later calls return the first result).
pub(crate) fn init() -> Result<(), Error> {
    INITIALISED
        .get_or_init(|| {
            let mut args = sys::RuntimeInitArgs {
                mem_alloc_type: sys::Alloc_With_System_Allocator,
                running_mode: sys::Mode_Interp,
                // Every exec env is a thread-manager "cluster" that splits the module's auxiliary
                // (shadow) stack between `max_thread_num + 1` threads; pwhost never spawns guest
                // threads, so ask for the fewest (0 means the default, 4). Each instance then
                // gives its stack back to its one exec env (see `instance.rs`).
                max_thread_num: 1,
                ..Default::default()
            };
            // SAFETY: `args` is a fully initialised `RuntimeInitArgs` that lives across the call;
            // WAMR copies what it keeps. The `OnceLock` runs this once per process.
            if !unsafe { sys::wasm_runtime_full_init(&mut args) } {
                return Err("wasm_runtime_full_init failed".to_string());
            }
            // WAMR prints warnings to stdout, which would corrupt the CLI's reports; every
            // failure pwhost cares about is returned to it as an error instead.
            // SAFETY: the runtime is initialised.
            unsafe { sys::wasm_runtime_set_log_level(sys::WASM_LOG_LEVEL_FATAL) };
            THREAD_ENV.with(|env| env.ready.set(true));
            Ok(())
        })
        .clone()
        .map_err(Error::Config)
}

/// This thread's WAMR environment.
struct ThreadEnv {
    /// WAMR may be used on this thread.
    ready: Cell<bool>,
    /// This thread set its environment up with `wasm_runtime_init_thread_env` (the thread that
    /// initialised WAMR needs none) and tears it down when it exits.
    owned: Cell<bool>,
}

impl Drop for ThreadEnv {
    fn drop(&mut self) {
        if self.owned.get() {
            // SAFETY: this thread set up its environment and uses WAMR no more.
            unsafe { sys::wasm_runtime_destroy_thread_env() };
        }
    }
}

thread_local! {
    static THREAD_ENV: ThreadEnv = const {
        ThreadEnv { ready: Cell::new(false), owned: Cell::new(false) }
    };
}

/// Sets up WAMR's environment on this thread if it has none yet: every thread other than the
/// one that initialised WAMR must, before it loads, instantiates or calls anything. Returns
/// `false` if that failed (or the thread is exiting).
#[inline]
pub(crate) fn ensure_thread_env() -> bool {
    THREAD_ENV
        .try_with(|env| {
            if env.ready.get() {
                return true;
            }
            // SAFETY: WAMR is initialised (every path here runs after `init`, which a
            // `WamrRuntime` calls on creation); the environment is per thread.
            if unsafe { sys::wasm_runtime_init_thread_env() } {
                env.ready.set(true);
                env.owned.set(true);
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
}

/// The error for a thread whose WAMR environment cannot be set up.
pub(crate) fn thread_env_error() -> String {
    "cannot set up WAMR's environment on this thread".to_string()
}

/// The header every instance context starts with, so that the type-erased trampoline can reach
/// the instance's host-function dispatcher (monomorphised for the embedder's state type).
#[repr(C)]
pub(crate) struct ContextHeader {
    /// Runs host function `symbol` for the instance whose context this is, with WAMR's argument
    /// slots.
    pub(crate) dispatch: unsafe fn(NonNull<ContextHeader>, sys::wasm_exec_env_t, u32, *mut u64),
}

/// The one native function behind every import (WAMR's raw calling convention: arguments in
/// 64-bit slots, the result written to slot 0).
unsafe extern "C" fn native_trampoline(exec_env: sys::wasm_exec_env_t, args: *mut u64) {
    // SAFETY: WAMR calls natives with the live exec env that runs the calling instance. Its
    // attachment is the symbol number registered for this import; its user data (or, while WAMR
    // instantiates, its instance's custom data) is the `ContextHeader` at the start of the
    // instance's context, which lives as long as the instance.
    unsafe {
        let symbol = sys::wasm_runtime_get_function_attachment(exec_env).addr() as u32;
        let mut header = sys::wasm_runtime_get_user_data(exec_env).cast::<ContextHeader>();
        // The module instance is only needed off the usual path (no user data yet, or none at
        // all): not fetched on every host call.
        if header.is_null() {
            let module_inst = sys::wasm_runtime_get_module_inst(exec_env);
            header = sys::wasm_runtime_get_custom_data(module_inst).cast();
        }
        match NonNull::new(header) {
            Some(header) => ((*header.as_ptr()).dispatch)(header, exec_env, symbol, args),
            None => sys::wasm_runtime_set_exception(
                sys::wasm_runtime_get_module_inst(exec_env),
                c"host function called outside a pwhost instance".as_ptr(),
            ),
        }
    }
}

/// The import names registered with WAMR, and the lock that serialises everything touching
/// WAMR's global registry (registering, resolving a module's imports, loading and unloading).
pub(crate) struct Natives {
    /// The symbol number of every `(module, name)` ever registered.
    symbols: HashMap<(String, String), u32>,
    /// The registered names per import module.
    modules: HashMap<String, ModuleNatives>,
}

/// The natives of one import module name, registered as one WAMR array (one registry node per
/// name, so a lookup of `_name` never stops at another node's `name`: WAMR tries both spellings
/// per node).
struct ModuleNatives {
    /// The module name WAMR's registry node points at.
    name: CString,
    /// The symbol names, with their numbers; the `CString` buffers WAMR points at never move.
    symbols: Vec<(CString, u32)>,
    /// The array currently registered with WAMR (it sorts it in place).
    registered: Option<NonNull<[sys::NativeSymbol]>>,
    /// How many symbols that array holds.
    registered_count: usize,
}

// SAFETY: the raw pointers are to buffers owned by this struct (or leaked to WAMR); they are only
// touched under the `NATIVES` mutex.
unsafe impl Send for ModuleNatives {}

static NATIVES: OnceLock<Mutex<Natives>> = OnceLock::new();

/// The lock that serialises every use of WAMR's process-wide registry of native functions
/// (registering, unregistering, and loading or unloading a module, which reads it), held until
/// dropped. For code beside this crate that registers natives of its own through WAMR's C API
/// (the benchmarks' hand-written WAMR host): WAMR's registry has no lock of its own.
pub struct NativeRegistryLock {
    _guard: MutexGuard<'static, Natives>,
}

/// Takes the [`NativeRegistryLock`], waiting for any module being linked or unloaded here.
pub fn lock_native_registry() -> NativeRegistryLock {
    NativeRegistryLock { _guard: natives() }
}

/// Locks WAMR's global registry.
pub(crate) fn natives() -> MutexGuard<'static, Natives> {
    NATIVES
        .get_or_init(|| {
            Mutex::new(Natives {
                symbols: HashMap::new(),
                modules: HashMap::new(),
            })
        })
        .lock()
        // Every update below leaves the registry consistent before it can fail.
        .unwrap_or_else(PoisonError::into_inner)
}

impl Natives {
    /// Registers `(module, name)` pairs with WAMR (those not registered yet), pointing at the
    /// trampoline, and returns their symbol numbers in the same order.
    pub(crate) fn register<'a>(
        &mut self,
        imports: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<Vec<u32>, Error> {
        let mut numbers = Vec::new();
        let mut involved: Vec<String> = Vec::new();
        for (module, name) in imports {
            if !involved.iter().any(|m| m == module) {
                involved.push(module.to_string());
            }
            let key = (module.to_string(), name.to_string());
            if let Some(number) = self.symbols.get(&key) {
                numbers.push(*number);
                continue;
            }
            let number = u32::try_from(self.symbols.len())
                .map_err(|_| Error::Config("too many host function names".into()))?;
            let c_name = c_string(name)?;
            let entry = match self.modules.get_mut(module) {
                Some(entry) => entry,
                None => self
                    .modules
                    .entry(module.to_string())
                    .or_insert(ModuleNatives {
                        name: c_string(module)?,
                        symbols: Vec::new(),
                        registered: None,
                        registered_count: 0,
                    }),
            };
            entry.symbols.push((c_name, number));
            self.symbols.insert(key, number);
            numbers.push(number);
        }
        // Also retries a module whose earlier registration failed.
        for module in involved {
            if let Some(entry) = self.modules.get_mut(&module) {
                if entry.registered_count != entry.symbols.len() {
                    entry.reregister()?;
                }
            }
        }
        Ok(numbers)
    }
}

impl ModuleNatives {
    /// Replaces this module name's registered array with one holding all its symbols.
    fn reregister(&mut self) -> Result<(), Error> {
        let array: Box<[sys::NativeSymbol]> = self
            .symbols
            .iter()
            .map(|(name, number)| sys::NativeSymbol {
                symbol: name.as_ptr(),
                func_ptr: native_trampoline as unsafe extern "C" fn(_, _) as *mut c_void,
                // No signature: WAMR then neither checks nor converts arguments
                // (`resolve_imports` has checked the types, and the host validates pointers).
                signature: std::ptr::null(),
                attachment: std::ptr::without_provenance_mut(*number as usize),
            })
            .collect();
        let len = u32::try_from(array.len())
            .map_err(|_| Error::Config("too many host functions in one module".into()))?;
        let array = NonNull::from(Box::leak(array));
        // SAFETY: the array, its symbol names and the module name stay alive and unmoved until
        // they are unregistered (below, when replaced); WAMR is initialised.
        let registered = unsafe {
            sys::wasm_runtime_register_natives_raw(self.name.as_ptr(), array.as_ptr().cast(), len)
        };
        if !registered {
            // SAFETY: WAMR did not take the array.
            drop(unsafe { Box::from_raw(array.as_ptr()) });
            return Err(Error::Config(
                "cannot register host functions with WAMR".into(),
            ));
        }
        self.registered_count = self.symbols.len();
        if let Some(old) = self.registered.replace(array) {
            // SAFETY: `old` is the array registered before under this name; once unregistered
            // WAMR keeps no pointer into it (resolved imports copied the function pointer and
            // attachment).
            unsafe {
                sys::wasm_runtime_unregister_natives(self.name.as_ptr(), old.as_ptr().cast());
                drop(Box::from_raw(old.as_ptr()));
            }
        }
        Ok(())
    }
}

fn c_string(text: &str) -> Result<CString, Error> {
    CString::new(text).map_err(|_| Error::Config(format!("name {text:?} contains a NUL byte")))
}
