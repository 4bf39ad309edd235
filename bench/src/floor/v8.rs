//! The V8 floor: the least a correct Proxy-Wasm host written directly on pwhost's V8 shim
//! (`runtime_v8::shim`, the C ABI of `runtime-v8/shim/pwhost_v8.h`) must do to run
//! `lifecycle_bench` (the rules all floors follow are in [`super`]).
//!
//! Why it is a fair floor for pwhost on V8:
//!
//! * Same engine, same configuration: V8 is started by [`shim::initialize`] (runtime-v8's own
//!   start: its flags and worker threads), the module is prepared by [`shim::prepare`] with the
//!   memory cap of `RuntimeConfig::default()` (1 GiB written into the module, as runtime-v8
//!   does before compiling) and compiled once by `pwv8_compile`. Each instance is a `pwv8_vm`,
//!   so it has exactly runtime-v8's isolate: one isolate and context per instance, the same heap
//!   limit, near-heap-limit termination, stack limits and thread-parking `Locker` path. The
//!   default configuration has no deadline and is not interruptible, so runtime-v8 runs no
//!   watchdog and neither does the floor.
//! * Same per-call mechanisms, because the shim has no other: every callback is one
//!   `pwv8_vm_call` from the host (a `Locker`, the isolate and context entered,
//!   `Function::Call`), every host function is the shim's one `FunctionTemplate` callback handing
//!   `u64` slots to a `pwv8_host_fn`, and guest memory is read with `pwv8_vm_memory` in each host
//!   function (it moves when the guest grows it, and only V8 knows).
//! * Everything else is resolved once: the callbacks and the allocator are looked up once per
//!   instance (`pwv8_vm_export_function`, their shapes checked once against the module), and
//!   the host functions are one monomorphized `extern "C"` function that dispatches on the import
//!   index through a per-module table, with no `dyn` and no lookups by name.
//! * It does only the host calls the plugin makes (`proxy_log`, `proxy_get_header_map_value`,
//!   `proxy_add_header_map_value`); the module's other imports return `UNIMPLEMENTED` (12).
//! * It still does what any correct host must: bounds-checks every guest pointer, validates the
//!   log level and the map type, allocates reply buffers with the plugin's allocator (a nested
//!   `pwv8_vm_call`) and writes values straight into guest memory.
//! * Its embedder data work is identical to pwhost's bench host: the same [`BenchStream`] in the
//!   same header storage `M`, restored the same way, and the same log counter.
//!
//! What it leaves out is what pwhost adds for generality: `runtime_api`'s `Instance` and
//! `Caller` (the boxed instance, the handle and arity checks, `catch_unwind`, the pending-trap
//! plumbing), the `dyn Host` indirection and the ABI's context bookkeeping.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::rc::Rc;

use abi::{LogLevel, MapType};
use runtime_api::RuntimeConfig;
use runtime_v8::shim::{self, Message, RawImport, RawModule, RawVm, Shape};

use super::{
    add_value, find_value, outcome, return_value, slice, FloorEngine, FloorInstance, BAD_ARGUMENT,
    IMPLEMENTED, INTERNAL_FAILURE, INVALID_MEMORY_ACCESS, OK, UNIMPLEMENTED,
};
use crate::{BenchHeaders, BenchStream, RequestOutcome, REQUEST_HEADERS, RESPONSE_HEADERS};

/// The shape of a function of `params` `i32` parameters and `result` (-1: none, 0: an `i32`).
const fn i32_shape(params: u32, result: i32) -> Shape {
    Shape {
        params,
        i64_params: 0,
        result,
    }
}

/// `proxy_log(level, message_data, message_size) -> status`.
const LOG_SHAPE: Shape = i32_shape(3, 0);
/// `proxy_get_header_map_value` and `proxy_add_header_map_value`: five `i32`s to a status.
const HEADER_SHAPE: Shape = i32_shape(5, 0);

/// The V8 floor of `wasm`, with runtime-v8's default configuration.
pub fn floor<M: BenchHeaders>(wasm: &[u8]) -> anyhow::Result<Box<dyn FloorEngine<M>>> {
    Ok(Box::new(V8Floor::<M>::new(wasm)?))
}

/// What the floor does for one import of the module.
#[derive(Clone, Copy, Debug)]
enum HostImport {
    /// `proxy_log`.
    Log,
    /// `proxy_get_header_map_value`.
    GetHeaderMapValue,
    /// `proxy_add_header_map_value`.
    AddHeaderMapValue,
    /// Any other import: returns `UNIMPLEMENTED` if it has a result (`result` as in [`Shape`]).
    Unimplemented {
        /// The import's result kind.
        result: i32,
    },
}

/// A module compiled by the shim, deleted on drop.
struct CompiledModule(NonNull<RawModule>);

impl Drop for CompiledModule {
    fn drop(&mut self) {
        // SAFETY: the module came from `pwv8_compile` and is deleted once, here; instances made
        // from it hold their own reference to the code inside V8.
        unsafe { shim::pwv8_module_delete(self.0.as_ptr()) };
    }
}

/// Which of the optional exports the module has, as checked by [`V8Floor::new`].
#[derive(Clone, Copy)]
struct Exports {
    /// `_initialize`, if exported.
    initialize: bool,
    /// `proxy_on_memory_allocate`, else `malloc` (the allocator pwhost uses too).
    allocator: &'static str,
}

/// The callbacks the floor calls, by name and shape.
const CALLBACKS: [(&str, Shape); 8] = [
    ("proxy_on_context_create", i32_shape(2, -1)),
    ("proxy_on_vm_start", i32_shape(2, 0)),
    ("proxy_on_configure", i32_shape(2, 0)),
    ("proxy_on_request_headers", i32_shape(3, 0)),
    ("proxy_on_response_headers", i32_shape(3, 0)),
    ("proxy_on_log", i32_shape(1, -1)),
    ("proxy_on_done", i32_shape(1, 0)),
    ("proxy_on_delete", i32_shape(1, -1)),
];
/// `_initialize() -> ()`.
const INITIALIZE_SHAPE: Shape = i32_shape(0, -1);
/// `proxy_on_memory_allocate(size) -> pointer` (and `malloc`).
const ALLOCATOR_SHAPE: Shape = i32_shape(1, 0);

/// `lifecycle_bench` compiled once, with its imports resolved to the floor's host functions.
pub struct V8Floor<M: BenchHeaders> {
    module: CompiledModule,
    /// The imports as `pwv8_vm_instantiate` takes them. The names point into `_names`' heap
    /// buffers, which never move or change while the floor lives.
    imports: Vec<RawImport>,
    _names: Vec<shim::FunctionImport>,
    /// What each import does, by import index; shared with every instance's host functions.
    host_imports: Rc<[HostImport]>,
    exports: Exports,
    _headers: PhantomData<fn() -> M>,
}

impl<M: BenchHeaders> V8Floor<M> {
    /// Starts V8 (if nothing has yet), prepares and compiles `wasm` as runtime-v8 does with
    /// `RuntimeConfig::default()`, and checks the module's imports and exports against what the
    /// floor provides and calls.
    pub fn new(wasm: &[u8]) -> anyhow::Result<Self> {
        shim::initialize().map_err(anyhow::Error::msg)?;
        let prepared = shim::prepare(wasm, RuntimeConfig::default().max_memory_bytes)
            .map_err(anyhow::Error::msg)?;

        let mut host_imports = Vec::with_capacity(prepared.imports.len());
        for import in &prepared.imports {
            let implemented = import.module == "env" && IMPLEMENTED.contains(&import.name.as_str());
            let (host, shape) = match import.name.as_str() {
                "proxy_log" if implemented => (HostImport::Log, LOG_SHAPE),
                "proxy_get_header_map_value" if implemented => {
                    (HostImport::GetHeaderMapValue, HEADER_SHAPE)
                }
                "proxy_add_header_map_value" if implemented => {
                    (HostImport::AddHeaderMapValue, HEADER_SHAPE)
                }
                _ => (
                    HostImport::Unimplemented {
                        result: import.shape.result,
                    },
                    import.shape,
                ),
            };
            anyhow::ensure!(
                import.shape == shape,
                "import {}.{} has shape {:?}, the floor implements {shape:?}",
                import.module,
                import.name,
                import.shape
            );
            host_imports.push(host);
        }

        let export_shape = |name: &str| {
            prepared
                .exports
                .iter()
                .find(|export| export.name == name)
                .map(|export| export.shape)
        };
        for (name, shape) in CALLBACKS {
            anyhow::ensure!(
                export_shape(name) == Some(shape),
                "the module exports no {name} of shape {shape:?}"
            );
        }
        let initialize = match export_shape("_initialize") {
            None => false,
            Some(shape) if shape == INITIALIZE_SHAPE => true,
            Some(shape) => anyhow::bail!("_initialize has shape {shape:?}"),
        };
        let allocator = ["proxy_on_memory_allocate", "malloc"]
            .into_iter()
            .find(|name| export_shape(name) == Some(ALLOCATOR_SHAPE))
            .ok_or_else(|| anyhow::anyhow!("the module exports no allocator"))?;

        let mut message = Message::new();
        // SAFETY: V8 is initialised (above); the bytes are a valid (pointer, length) pair for
        // the call, which copies them; `message` outlives the call.
        let raw = unsafe {
            shim::pwv8_compile(
                prepared.bytes.as_ptr(),
                prepared.bytes.len(),
                message.as_out(),
            )
        };
        let module = CompiledModule(
            NonNull::new(raw)
                .ok_or_else(|| anyhow::anyhow!(message.text_or("V8 refused the module")))?,
        );
        let imports = prepared
            .imports
            .iter()
            .map(|import| RawImport {
                module: import.module.as_ptr(),
                module_len: import.module.len(),
                name: import.name.as_ptr(),
                name_len: import.name.len(),
                shape: import.shape,
            })
            .collect();
        Ok(V8Floor {
            module,
            imports,
            _names: prepared.imports,
            host_imports: host_imports.into(),
            exports: Exports {
                initialize,
                allocator,
            },
            _headers: PhantomData,
        })
    }

    /// A new instance, initialised, started and configured: `_initialize` (if exported),
    /// `proxy_on_context_create(1, 0)`, `proxy_on_vm_start(1, 0)`, `proxy_on_configure(1, 0)`.
    pub fn instantiate(&self) -> anyhow::Result<V8FloorVm<M>> {
        let mut message = Message::new();
        // SAFETY: V8 was initialised by `new`; `message` outlives the call.
        let vm = unsafe { shim::pwv8_vm_new(message.as_out()) };
        let vm = NonNull::new(vm)
            .ok_or_else(|| anyhow::anyhow!(message.text_or("cannot create a V8 isolate")))?;
        let data = NonNull::from(Box::leak(Box::new(FloorData {
            stream: BenchStream::<M>::new(),
            effective_context: 0,
            vm: vm.as_ptr(),
            allocator: None,
            host_imports: self.host_imports.clone(),
            failure: None,
        })));
        // From here on, dropping `instance` deletes the VM, then the data.
        let instance = Instance { vm, data };
        let mut message = Message::new();
        // SAFETY: the VM is fresh and used by this thread only; the module is alive; `imports`
        // is one import per module import, in order, with names alive as long as `self` (for
        // the call: the shim copies them); `host::<M>` is given the `FloorData<M>` it expects,
        // which lives until the VM is deleted (see `Instance::drop`).
        let status = unsafe {
            shim::pwv8_vm_instantiate(
                vm.as_ptr(),
                self.module.0.as_ptr(),
                self.imports.as_ptr(),
                self.imports.len(),
                host::<M>,
                data.as_ptr().cast::<c_void>(),
                message.as_out(),
            )
        };
        if status != shim::OK {
            return Err(instance.failed(status, &message, "instantiation"));
        }
        let export = |name: &str, shape: Shape| {
            // SAFETY: the VM is instantiated and used by this thread only, outside any call;
            // the name is a valid (pointer, length) pair.
            let index = unsafe {
                shim::pwv8_vm_export_function(vm.as_ptr(), name.as_ptr().cast(), name.len(), shape)
            };
            u32::try_from(index).map_err(|_| anyhow::anyhow!("no export {name} in the instance"))
        };
        let allocator = export(self.exports.allocator, ALLOCATOR_SHAPE)?;
        // SAFETY: no call is running, so nothing else refers to the data.
        unsafe { (*data.as_ptr()).allocator = Some(allocator) };
        let initialize = if self.exports.initialize {
            Some(export("_initialize", INITIALIZE_SHAPE)?)
        } else {
            None
        };
        let [context_create, vm_start, configure, request_headers, response_headers, log, done, delete] =
            CALLBACKS.map(|(name, shape)| export(name, shape));
        let mut vm = V8FloorVm {
            callbacks: Callbacks {
                context_create: context_create?,
                vm_start: vm_start?,
                configure: configure?,
                request_headers: request_headers?,
                response_headers: response_headers?,
                log: log?,
                done: done?,
                delete: delete?,
            },
            instance,
            next_context: 2,
        };
        if let Some(initialize) = initialize {
            vm.call(0, initialize, [], false)?;
        }
        let callbacks = vm.callbacks;
        vm.call(1, callbacks.context_create, [1, 0], false)?;
        vm.call(1, callbacks.vm_start, [1, 0], true)?;
        vm.call(1, callbacks.configure, [1, 0], true)?;
        Ok(vm)
    }
}

impl<M: BenchHeaders> FloorEngine<M> for V8Floor<M> {
    fn instantiate(&self) -> anyhow::Result<Box<dyn FloorInstance<M>>> {
        Ok(Box::new(V8Floor::instantiate(self)?))
    }
}

/// What the host functions of one instance reach, in one heap allocation whose address the shim
/// hands back to [`host`]. No reference into it is held across a call into the guest: the
/// instance and the host functions reach it through its raw pointer with short borrows, so a
/// nested call (the allocator) never aliases a live `&mut`.
struct FloorData<M: BenchHeaders> {
    stream: BenchStream<M>,
    /// The context host calls act on (the callback's context).
    effective_context: u32,
    vm: *mut RawVm,
    /// The shim's index of the plugin's allocator.
    allocator: Option<u32>,
    /// What each import does, by import index.
    host_imports: Rc<[HostImport]>,
    /// Why a host function made the guest unwind (its allocator call failed).
    failure: Option<String>,
}

/// An instance's VM and host data, freed together on drop.
struct Instance<M: BenchHeaders> {
    vm: NonNull<RawVm>,
    /// Leaked from a `Box` by `V8Floor::instantiate`.
    data: NonNull<FloorData<M>>,
}

impl<M: BenchHeaders> Instance<M> {
    /// The error of a top-level call (or the instantiation) that ended with `status`: the
    /// failure a host function recorded first, else the shim's message. A termination (the heap
    /// limit: the floor has no deadline) is cancelled so the instance stays usable, as
    /// runtime-v8 does.
    #[cold]
    fn failed(&self, status: i32, message: &Message, what: &str) -> anyhow::Error {
        // SAFETY: the call has returned, so nothing else refers to the data.
        let failure = unsafe { (*self.data.as_ptr()).failure.take() };
        let reason = failure.unwrap_or_else(|| match status {
            shim::THROWN => message.text_or("exception"),
            // SAFETY: the VM is alive.
            shim::TERMINATED if unsafe { shim::pwv8_vm_heap_exhausted(self.vm.as_ptr()) } != 0 => {
                "the instance exhausted its JS heap".into()
            }
            shim::TERMINATED => "V8 terminated the call".into(),
            _ => message.text_or("the V8 shim failed"),
        });
        if status == shim::TERMINATED {
            // SAFETY: the VM is alive and its call has returned; nothing can terminate it again
            // (the floor has no watchdog).
            unsafe { shim::pwv8_vm_cancel_terminate(self.vm.as_ptr()) };
        }
        anyhow::anyhow!("{what}: {reason}")
    }
}

impl<M: BenchHeaders> Drop for Instance<M> {
    fn drop(&mut self) {
        // SAFETY: the VM is deleted once, with no call running (`&mut self`) and no other thread
        // holding it.
        unsafe { shim::pwv8_vm_delete(self.vm.as_ptr()) };
        // SAFETY: the data was leaked from a `Box` in `V8Floor::instantiate`, and the VM that
        // pointed to it is gone, so nothing refers to it any more.
        drop(unsafe { Box::from_raw(self.data.as_ptr()) });
    }
}

/// The shim's export indices of the callbacks the floor calls, resolved once per instance.
#[derive(Clone, Copy)]
struct Callbacks {
    context_create: u32,
    vm_start: u32,
    configure: u32,
    request_headers: u32,
    response_headers: u32,
    log: u32,
    done: u32,
    delete: u32,
}

/// One started floor instance.
pub struct V8FloorVm<M: BenchHeaders> {
    callbacks: Callbacks,
    instance: Instance<M>,
    next_context: u32,
}

impl<M: BenchHeaders> V8FloorVm<M> {
    /// Calls export `function` from the host, for `context`, with `args` (each an `i32`); its
    /// `i32` result if `has_result`, else 0.
    #[inline]
    fn call<const N: usize>(
        &mut self,
        context: u32,
        function: u32,
        args: [u64; N],
        has_result: bool,
    ) -> anyhow::Result<i32> {
        let data = self.instance.data.as_ptr();
        // SAFETY: `&mut self` excludes every other access to the data; this borrow ends here,
        // before the guest runs.
        unsafe { (*data).effective_context = context };
        let mut results = [0u64; 1];
        let mut message = Message::new();
        // SAFETY: the VM is alive and used by this thread only (`&mut self`), from the host
        // (`nested` 0); `args` and `results` are valid for the counts given, which match the
        // shape the function was resolved with; no reference into the data is held across the
        // call.
        let status = unsafe {
            shim::pwv8_vm_call(
                self.instance.vm.as_ptr(),
                function,
                args.as_ptr(),
                N as u32,
                results.as_mut_ptr(),
                u32::from(has_result),
                0,
                message.as_out(),
            )
        };
        if status != shim::OK {
            return Err(self.instance.failed(status, &message, "guest call"));
        }
        Ok(results[0] as u32 as i32)
    }

    /// One full request, the same callback sequence as [`crate::pwhost_request`]:
    /// `proxy_on_context_create(ctx, 1)`, `proxy_on_request_headers(ctx, 10, 0)`,
    /// `proxy_on_response_headers(ctx, 3, 0)`, `proxy_on_log`, `proxy_on_done`,
    /// `proxy_on_delete`.
    #[inline]
    pub fn request(&mut self) -> anyhow::Result<RequestOutcome> {
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        let ctx = u64::from(context);
        let callbacks = self.callbacks;
        self.call(context, callbacks.context_create, [ctx, 1], false)?;
        // SAFETY: no call is running (`&mut self`), so nothing else refers to the data.
        unsafe { (*self.instance.data.as_ptr()).stream.begin(context) };
        let request = self.call(
            context,
            callbacks.request_headers,
            [ctx, REQUEST_HEADERS.len() as u64, 0],
            true,
        )?;
        let response = self.call(
            context,
            callbacks.response_headers,
            [ctx, RESPONSE_HEADERS.len() as u64, 0],
            true,
        )?;
        self.call(context, callbacks.log, [ctx], false)?;
        self.call(context, callbacks.done, [ctx], true)?;
        self.call(context, callbacks.delete, [ctx], false)?;
        Ok(outcome(request, response))
    }

    /// The instance's stream.
    pub fn stream(&self) -> &BenchStream<M> {
        // SAFETY: calls into the guest need `&mut self`, so none is running while this shared
        // borrow of `self` lives and nothing mutates the data.
        unsafe { &(*self.instance.data.as_ptr()).stream }
    }
}

impl<M: BenchHeaders> FloorInstance<M> for V8FloorVm<M> {
    fn request(&mut self) -> anyhow::Result<RequestOutcome> {
        V8FloorVm::request(self)
    }

    fn stream(&self) -> &BenchStream<M> {
        V8FloorVm::stream(self)
    }
}

/// The guest memory of `vm`, from inside one of its host functions.
///
/// # Safety
/// `vm` is alive and one of its host functions is running on this thread; the returned slice
/// is used only until guest code runs again (which may grow the memory and move it) and no other
/// reference to guest memory is live.
#[inline]
unsafe fn guest_memory<'a>(vm: *mut RawVm) -> Option<&'a mut [u8]> {
    let mut base = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: the caller guarantees `vm` is alive and that we are inside its host function
    // (`nested` 1); the out-pointers are valid.
    let status = unsafe { shim::pwv8_vm_memory(vm, 1, &mut base, &mut len) };
    if status != shim::OK || base.is_null() {
        return None;
    }
    // SAFETY: the shim returned the live backing store of the instance's memory, `len` bytes at
    // `base`, which V8 moves or frees only when guest code grows the memory; the caller uses the
    // slice only until guest code runs again.
    Some(unsafe { std::slice::from_raw_parts_mut(base, len) })
}

/// The shim's way back into the floor: runs import `index` of the instance whose data is
/// `context` on `count` argument slots. Returns 0, or 1 after recording why the guest must
/// unwind.
///
/// A panic here would abort the process at this `extern "C"` boundary (Rust never unwinds out of
/// one), never unwind into V8's frames; nothing below panics on guest input.
///
/// # Safety
/// `context` is the `FloorData<M>` given to `pwv8_vm_instantiate` with this function, alive and
/// with no reference into it live (the shim calls this only from guest code, which runs only
/// through the floor's calls, which hold none); `slots` points to `count` writable slots.
unsafe extern "C" fn host<M: BenchHeaders>(
    context: *mut c_void,
    index: u32,
    slots: *mut u64,
    count: u32,
) -> i32 {
    let data = context.cast::<FloorData<M>>();
    // SAFETY: the shim passes back the data pointer it was given, which is alive; this short
    // borrow copies the import's kind out.
    let Some(&import) = (unsafe { &(*data).host_imports }).get(index as usize) else {
        // SAFETY: as above.
        unsafe { (*data).failure = Some(format!("call of unknown import {index}")) };
        return 1;
    };
    // SAFETY: the shim passes `count` slots of its own stack, unaliased.
    let slots = unsafe { std::slice::from_raw_parts_mut(slots, count as usize) };
    let status = match (import, &*slots) {
        (HostImport::Log, &[level, ptr, len]) => {
            // SAFETY: the data is alive and unaliased; we are inside one of its VM's host
            // functions.
            unsafe { proxy_log(data, level, ptr, len) }
        }
        (HostImport::GetHeaderMapValue, &[map, key, key_len, data_out, size_out]) => {
            // SAFETY: as above.
            match unsafe { proxy_get_header_map_value(data, map, key, key_len, data_out, size_out) }
            {
                Ok(status) => status,
                Err(failure) => {
                    // SAFETY: as above; the nested call has returned. A failure a nested host
                    // function recorded first is the cause: it is kept.
                    unsafe { (*data).failure.get_or_insert(failure) };
                    return 1;
                }
            }
        }
        (HostImport::AddHeaderMapValue, &[map, key, key_len, value, value_len]) => {
            // SAFETY: as above.
            unsafe { proxy_add_header_map_value(data, map, key, key_len, value, value_len) }
        }
        (HostImport::Unimplemented { result }, _) => {
            if result >= 0 {
                slots[0] = UNIMPLEMENTED as u32 as u64;
            }
            return 0;
        }
        // The import's shape was checked against its kind when the floor was made.
        _ => BAD_ARGUMENT,
    };
    slots[0] = status as u32 as u64;
    0
}

/// `proxy_log(level, message_data, message_size)`.
///
/// # Safety
/// As for [`host`]: `data` is alive and unaliased, and one of its VM's host functions runs.
#[inline]
unsafe fn proxy_log<M: BenchHeaders>(
    data: *mut FloorData<M>,
    level: u64,
    ptr: u64,
    len: u64,
) -> i32 {
    let Some(level) = LogLevel::from_raw(level) else {
        return BAD_ARGUMENT;
    };
    // SAFETY: the caller guarantees the data is alive and unaliased for this host call.
    let state = unsafe { &mut *data };
    // SAFETY: inside the VM's host function; the slice lives only within this call, which runs
    // no guest code.
    let Some(bytes) = (unsafe { guest_memory(state.vm) }) else {
        return INTERNAL_FAILURE;
    };
    let Some(message) = slice(bytes, ptr as i32, len as i32) else {
        return INVALID_MEMORY_ACCESS;
    };
    state.stream.log(level, &String::from_utf8_lossy(message));
    OK
}

/// `proxy_get_header_map_value(map_type, key_data, key_size, return_value_data,
/// return_value_size)`: looks the key up once, allocates with the plugin's allocator, copies the
/// value into guest memory and writes the pointer and size. `Err` when the allocator failed: the
/// guest must unwind.
///
/// # Safety
/// As for [`host`].
#[inline]
unsafe fn proxy_get_header_map_value<M: BenchHeaders>(
    data: *mut FloorData<M>,
    map_type: u64,
    key_ptr: u64,
    key_len: u64,
    return_data: u64,
    return_size: u64,
) -> Result<i32, String> {
    let Some(map_type) = MapType::from_raw(map_type) else {
        return Ok(BAD_ARGUMENT);
    };
    let (found, vm, allocator) = {
        // SAFETY: the caller guarantees the data is alive and unaliased; this borrow ends
        // before the allocator runs guest code.
        let state = unsafe { &mut *data };
        // SAFETY: inside the VM's host function; the slice dies with this block.
        let Some(bytes) = (unsafe { guest_memory(state.vm) }) else {
            return Ok(INTERNAL_FAILURE);
        };
        let context = state.effective_context;
        let (key_ptr, key_len) = (key_ptr as i32, key_len as i32);
        match find_value(
            bytes,
            &mut state.stream,
            context,
            map_type,
            key_ptr,
            key_len,
        ) {
            Ok(found) => (found, state.vm, state.allocator),
            Err(status) => return Ok(status),
        }
    };
    let len = found.1;
    let pointer = match (len, allocator) {
        (0, _) => 0,
        (_, None) => return Ok(INTERNAL_FAILURE),
        (_, Some(allocator)) => {
            let mut result = 0u64;
            let mut message = Message::new();
            // SAFETY: a nested call from inside this VM's host function, on its thread; one
            // argument and one result, as the allocator's shape; no reference into the data or
            // guest memory is live across it.
            let status = unsafe {
                shim::pwv8_vm_call(
                    vm,
                    allocator,
                    &(len as u64),
                    1,
                    &mut result,
                    1,
                    1,
                    message.as_out(),
                )
            };
            if status != shim::OK {
                return Err(format!(
                    "the plugin's allocator failed: {}",
                    message.text_or("terminated")
                ));
            }
            result as u32 as i32
        }
    };
    if len > 0 && pointer == 0 {
        return Ok(INTERNAL_FAILURE);
    }
    // SAFETY: the allocator has returned; the data is alive and unaliased again.
    let state = unsafe { &mut *data };
    // SAFETY: inside the VM's host function, read anew since the allocator may have grown the
    // memory; the slice lives only within this call, which runs no more guest code.
    let Some(bytes) = (unsafe { guest_memory(vm) }) else {
        return Ok(INTERNAL_FAILURE);
    };
    let context = state.effective_context;
    Ok(return_value(
        bytes,
        &mut state.stream,
        context,
        map_type,
        found,
        pointer as u32,
        return_data as i32,
        return_size as i32,
    ))
}

/// `proxy_add_header_map_value(map_type, key_data, key_size, value_data, value_size)`.
///
/// # Safety
/// As for [`host`].
#[inline]
unsafe fn proxy_add_header_map_value<M: BenchHeaders>(
    data: *mut FloorData<M>,
    map_type: u64,
    key_ptr: u64,
    key_len: u64,
    value_ptr: u64,
    value_len: u64,
) -> i32 {
    let Some(map_type) = MapType::from_raw(map_type) else {
        return BAD_ARGUMENT;
    };
    // SAFETY: the caller guarantees the data is alive and unaliased for this host call.
    let state = unsafe { &mut *data };
    // SAFETY: inside the VM's host function; the slice lives only within this call, which runs
    // no guest code.
    let Some(bytes) = (unsafe { guest_memory(state.vm) }) else {
        return INTERNAL_FAILURE;
    };
    let context = state.effective_context;
    add_value(
        bytes,
        &mut state.stream,
        context,
        map_type,
        key_ptr as i32,
        key_len as i32,
        value_ptr as i32,
        value_len as i32,
    )
}
