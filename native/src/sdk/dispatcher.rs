//! Native plugins as null-runtime modules: the exports the host calls, dispatched to contexts.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use runtime_api::{Error, Export, FunctionType, Import, Trap, TrapKind};
use runtime_null::{NativeInstance, NativeModule};
use rustc_hash::FxHashMap as HashMap;

use super::hostcalls;
use super::logger;
use super::traits::{Context, HttpContext, RootContext, StreamContext};
use super::types::{Action, ContextType, LogLevel, NewHttpContext, NewRootContext, PeerType};
use crate::callbacks::{function_export, memory_export, Shape};

/// What a plugin's set-up function declares through [`set_root_context`] and
/// [`set_http_context`] (the SDK's `main!` block).
#[derive(Default)]
struct Setup {
    root: Option<NewRootContext>,
    http: Option<NewHttpContext>,
}

thread_local! {
    /// The declarations of the set-up function running on this thread.
    static SETUP: RefCell<Option<Setup>> = const { RefCell::new(None) };
}

/// Declares the factory of the plugin's root contexts (the SDK's `proxy_wasm::set_root_context`).
/// Only the plugin's set-up function may call it; elsewhere it does nothing.
pub fn set_root_context(factory: NewRootContext) {
    SETUP.with(|setup| {
        if let Some(setup) = setup.borrow_mut().as_mut() {
            setup.root = Some(factory);
        }
    });
}

/// Declares the factory of HTTP contexts, for plugins that need no root context (the SDK's
/// `proxy_wasm::set_http_context`). Only the plugin's set-up function may call it.
pub fn set_http_context(factory: NewHttpContext) {
    SETUP.with(|setup| {
        if let Some(setup) = setup.borrow_mut().as_mut() {
            setup.http = Some(factory);
        }
    });
}

/// A native plugin: its name and its set-up function.
#[derive(Clone, Copy)]
pub struct NativePlugin {
    name: &'static str,
    setup: fn(),
}

impl NativePlugin {
    /// A plugin called `name` (registered as `native:NAME`) whose set-up function `setup` calls
    /// [`set_log_level`](crate::sdk::set_log_level), [`set_root_context`] and
    /// [`set_http_context`]. [`crate::main!`] declares one named after its module.
    ///
    /// A path such as `module_path!()` names the plugin after its last segment.
    pub const fn new(name: &'static str, setup: fn()) -> Self {
        NativePlugin { name, setup }
    }

    /// The plugin's name.
    pub fn name(&self) -> &'static str {
        self.name.rsplit("::").next().unwrap_or(self.name)
    }

    /// The plugin as a module for the null runtime.
    pub fn module(&self) -> Arc<dyn NativeModule> {
        let mut exports = vec![
            memory_export(),
            function_export("proxy_abi_version_0_2_1", FunctionType::default()),
        ];
        exports.extend(
            EXPORTS
                .iter()
                .map(|(name, shape, _)| function_export(name, shape.wasm_type())),
        );
        Arc::new(PluginModule {
            plugin: *self,
            exports,
        })
    }
}

/// Exports before the callbacks of [`EXPORTS`]: the memory and the ABI marker.
const FIXED_EXPORTS: u32 = 2;

struct PluginModule {
    plugin: NativePlugin,
    exports: Vec<Export>,
}

impl NativeModule for PluginModule {
    fn imports(&self) -> &[Import] {
        crate::host_imports::imports()
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn instantiate(&self) -> Result<Box<dyn NativeInstance>, Error> {
        Ok(Box::new(Dispatcher {
            plugin: self.plugin,
            log_level: Cell::new(LogLevel::Trace),
            new_root: Cell::new(None),
            new_http: Cell::new(None),
            roots: Contexts::default(),
            http: Contexts::default(),
            streams: Contexts::default(),
            callouts: RefCell::default(),
        }))
    }
}

/// Contexts of one kind, by id.
///
/// A context is taken out of its slot while its callback runs, so that no `RefCell` borrow is
/// held across host calls (which may re-enter the instance, e.g. through the allocator); it stays
/// in the map, so the callback costs two lookups instead of a removal and an insertion.
struct Contexts<T: ?Sized>(RefCell<HashMap<u32, Option<Box<T>>>>);

impl<T: ?Sized> Default for Contexts<T> {
    fn default() -> Self {
        Contexts(RefCell::default())
    }
}

impl<T: ?Sized> Contexts<T> {
    fn insert(&self, context: u32, value: Box<T>) {
        self.0.borrow_mut().insert(context, Some(value));
    }

    fn remove(&self, context: u32) {
        self.0.borrow_mut().remove(&context);
    }

    fn contains(&self, context: u32) -> bool {
        self.0.borrow().contains_key(&context)
    }

    /// Runs `f` on context `context`; `None` if there is none (or its callback is running).
    fn with<R>(&self, context: u32, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let mut value = self.0.borrow_mut().get_mut(&context)?.take()?;
        let result = f(&mut *value);
        // The context may have been deleted meanwhile (only by a host bug): then it goes.
        if let Some(slot) = self.0.borrow_mut().get_mut(&context) {
            *slot = Some(value);
        }
        Some(result)
    }
}

/// One VM's contexts (the SDK's dispatcher, per instance instead of per thread).
struct Dispatcher {
    plugin: NativePlugin,
    log_level: Cell<LogLevel>,
    new_root: Cell<Option<NewRootContext>>,
    new_http: Cell<Option<NewHttpContext>>,
    roots: Contexts<dyn RootContext>,
    http: Contexts<dyn HttpContext>,
    streams: Contexts<dyn StreamContext>,
    /// Callout (kind, token) → the context that dispatched it.
    callouts: RefCell<HashMap<(Callout, u32), u32>>,
}

/// What a callout token stands for (a host may number each kind on its own, so the kind is part
/// of the key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Callout {
    /// `dispatch_http_call`: one `on_http_call_response`.
    Http,
    /// `dispatch_grpc_call`: one `on_grpc_call_response`.
    GrpcCall,
    /// `open_grpc_stream`: stream callbacks until it closes.
    GrpcStream,
}

thread_local! {
    /// The instance and context whose callback is running, for [`register_callout`].
    static ACTIVE: Cell<Option<(*const Dispatcher, u32)>> = const { Cell::new(None) };
}

/// Remembers that the running context dispatched callout `token` of kind `kind`.
pub(crate) fn register_callout(kind: Callout, token: u32) {
    if let Some((dispatcher, context)) = ACTIVE.with(Cell::get) {
        // SAFETY: `ACTIVE` is set only while `Dispatcher::call` runs on this thread and borrows
        // the dispatcher; it is restored before that call returns.
        let dispatcher = unsafe { &*dispatcher };
        dispatcher
            .callouts
            .borrow_mut()
            .insert((kind, token), context);
    }
}

type Handler = fn(&Dispatcher, &[u64], &mut [u64]);

fn id(args: &[u64], i: usize) -> u32 {
    args[i] as u32
}

fn action(action: Action) -> u64 {
    action as u64
}

/// The exports after [`FIXED_EXPORTS`], with their C shape (for the Wasm type the ABI checks)
/// and handler.
const EXPORTS: &[(&str, Shape, Handler)] = &[
    ("_initialize", Shape::Unit, |d, _, _| d.initialize()),
    (
        "proxy_on_memory_allocate",
        Shape::UsizeToPointer,
        |_, a, r| {
            r[0] = hostcalls::allocate(a[0] as usize).expose_provenance() as u64;
        },
    ),
    ("proxy_on_context_create", Shape::U32U32, |d, a, _| {
        d.create_context(id(a, 0), id(a, 1))
    }),
    ("proxy_on_vm_start", Shape::U32UsizeToBool, |d, a, r| {
        r[0] = d
            .with_root(id(a, 0), |c| c.on_vm_start(a[1] as usize))
            .unwrap_or(true) as u64;
    }),
    ("proxy_on_configure", Shape::U32UsizeToBool, |d, a, r| {
        r[0] = d
            .with_root(id(a, 0), |c| c.on_configure(a[1] as usize))
            .unwrap_or(true) as u64;
    }),
    ("proxy_on_tick", Shape::U32, |d, a, _| {
        d.with_root(id(a, 0), |c| c.on_tick());
    }),
    ("proxy_on_queue_ready", Shape::U32U32, |d, a, _| {
        d.with_root(id(a, 0), |c| c.on_queue_ready(id(a, 1)));
    }),
    ("proxy_on_done", Shape::U32ToBool, |d, a, r| {
        let context = id(a, 0);
        let done = d
            .with_root(context, |c| c.on_done())
            .or_else(|| d.with_http(context, |c| c.on_done()))
            .or_else(|| d.with_stream(context, |c| c.on_done()))
            .unwrap_or(true);
        r[0] = u64::from(done);
    }),
    ("proxy_on_log", Shape::U32, |d, a, _| {
        let context = id(a, 0);
        d.with_http(context, |c| c.on_log())
            .or_else(|| d.with_stream(context, |c| c.on_log()))
            .or_else(|| d.with_root(context, |c| c.on_log()));
    }),
    ("proxy_on_delete", Shape::U32, |d, a, _| {
        let context = id(a, 0);
        d.http.remove(context);
        d.streams.remove(context);
        d.roots.remove(context);
    }),
    ("proxy_on_new_connection", Shape::U32ToU32, |d, a, r| {
        r[0] = action(
            d.with_stream(id(a, 0), |c| c.on_new_connection())
                .unwrap_or(Action::Continue),
        );
    }),
    (
        "proxy_on_downstream_data",
        Shape::U32UsizeBoolToU32,
        |d, a, r| {
            r[0] = action(
                d.with_stream(id(a, 0), |c| c.on_downstream_data(a[1] as usize, a[2] != 0))
                    .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_upstream_data",
        Shape::U32UsizeBoolToU32,
        |d, a, r| {
            r[0] = action(
                d.with_stream(id(a, 0), |c| c.on_upstream_data(a[1] as usize, a[2] != 0))
                    .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_downstream_connection_close",
        Shape::U32U32,
        |d, a, _| {
            d.with_stream(id(a, 0), |c| c.on_downstream_close(peer(a[1])));
        },
    ),
    (
        "proxy_on_upstream_connection_close",
        Shape::U32U32,
        |d, a, _| {
            d.with_stream(id(a, 0), |c| c.on_upstream_close(peer(a[1])));
        },
    ),
    (
        "proxy_on_request_headers",
        Shape::U32UsizeBoolToU32,
        |d, a, r| {
            r[0] = action(
                d.with_http(id(a, 0), |c| {
                    c.on_http_request_headers(a[1] as usize, a[2] != 0)
                })
                .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_request_body",
        Shape::U32UsizeBoolToU32,
        |d, a, r| {
            r[0] = action(
                d.with_http(id(a, 0), |c| {
                    c.on_http_request_body(a[1] as usize, a[2] != 0)
                })
                .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_request_trailers",
        Shape::U32UsizeToU32,
        |d, a, r| {
            r[0] = action(
                d.with_http(id(a, 0), |c| c.on_http_request_trailers(a[1] as usize))
                    .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_response_headers",
        Shape::U32UsizeBoolToU32,
        |d, a, r| {
            r[0] = action(
                d.with_http(id(a, 0), |c| {
                    c.on_http_response_headers(a[1] as usize, a[2] != 0)
                })
                .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_response_body",
        Shape::U32UsizeBoolToU32,
        |d, a, r| {
            r[0] = action(
                d.with_http(id(a, 0), |c| {
                    c.on_http_response_body(a[1] as usize, a[2] != 0)
                })
                .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_response_trailers",
        Shape::U32UsizeToU32,
        |d, a, r| {
            r[0] = action(
                d.with_http(id(a, 0), |c| c.on_http_response_trailers(a[1] as usize))
                    .unwrap_or(Action::Continue),
            );
        },
    ),
    (
        "proxy_on_http_call_response",
        Shape::U32U32UsizeUsizeUsize,
        |d, a, _| {
            let token = id(a, 1);
            let (headers, body, trailers) = (a[2] as usize, a[3] as usize, a[4] as usize);
            d.with_callout(Callout::Http, token, Take::Remove, |c| {
                c.on_http_call_response(token, headers, body, trailers)
            });
        },
    ),
    (
        "proxy_on_grpc_receive_initial_metadata",
        Shape::U32U32U32,
        |d, a, _| {
            let (token, count) = (id(a, 1), id(a, 2));
            d.with_callout(Callout::GrpcStream, token, Take::Keep, |c| {
                c.on_grpc_stream_initial_metadata(token, count)
            });
        },
    ),
    // As the SDK: a unary call's reply is `on_grpc_call_response` with status 0, a stream's
    // message is `on_grpc_stream_message`.
    ("proxy_on_grpc_receive", Shape::U32U32Usize, |d, a, _| {
        let (token, size) = (id(a, 1), a[2] as usize);
        d.with_callout(Callout::GrpcCall, token, Take::Remove, |c| {
            c.on_grpc_call_response(token, 0, size)
        })
        .or_else(|| {
            d.with_callout(Callout::GrpcStream, token, Take::Keep, |c| {
                c.on_grpc_stream_message(token, size)
            })
        });
    }),
    (
        "proxy_on_grpc_receive_trailing_metadata",
        Shape::U32U32U32,
        |d, a, _| {
            let (token, count) = (id(a, 1), id(a, 2));
            d.with_callout(Callout::GrpcStream, token, Take::Keep, |c| {
                c.on_grpc_stream_trailing_metadata(token, count)
            });
        },
    ),
    // A unary call that failed closes with its status and no message; a stream closes.
    ("proxy_on_grpc_close", Shape::U32U32U32, |d, a, _| {
        let (token, status) = (id(a, 1), id(a, 2));
        d.with_callout(Callout::GrpcCall, token, Take::Remove, |c| {
            c.on_grpc_call_response(token, status, 0)
        })
        .or_else(|| {
            d.with_callout(Callout::GrpcStream, token, Take::Remove, |c| {
                c.on_grpc_stream_close(token, status)
            })
        });
    }),
    (
        "proxy_on_foreign_function",
        Shape::U32U32Usize,
        |d, a, _| {
            let (function, size) = (id(a, 1), a[2] as usize);
            d.with_context(id(a, 0), |c| c.on_foreign_function(function, size));
        },
    ),
];

fn peer(raw: u64) -> PeerType {
    PeerType::from_raw(raw).unwrap_or(PeerType::Unknown)
}

impl Dispatcher {
    fn initialize(&self) {
        // Set up as context 0, so that `set_log_level` sets this instance's level.
        let setup = self.run_as(0, || {
            // A set-up function that panicked leaves its partial declarations behind; the next
            // one starts from a fresh `Setup` all the same.
            SETUP.with(|setup| setup.replace(Some(Setup::default())));
            (self.plugin.setup)();
            SETUP.with(|setup| setup.take()).unwrap_or_default()
        });
        self.new_root.set(setup.root);
        self.new_http.set(setup.http);
    }

    fn create_context(&self, context: u32, root: u32) {
        if root == 0 {
            if let Some(new_root) = self.new_root.get() {
                let root_context = new_root(context);
                self.roots.insert(context, root_context);
            }
            return;
        }
        if let Some(new_http) = self.new_http.get() {
            let http = self.run_as(context, || new_http(context, root));
            self.http.insert(context, http);
            return;
        }
        let created = self.with_root(root, |root_context| match root_context.get_type() {
            Some(ContextType::HttpContext) => {
                root_context.create_http_context(context).map(Created::Http)
            }
            Some(ContextType::StreamContext) => root_context
                .create_stream_context(context)
                .map(Created::Stream),
            None => root_context
                .create_http_context(context)
                .map(Created::Http)
                .or_else(|| {
                    root_context
                        .create_stream_context(context)
                        .map(Created::Stream)
                }),
        });
        match created.flatten() {
            Some(Created::Http(http)) => {
                self.http.insert(context, http);
            }
            Some(Created::Stream(stream)) => {
                self.streams.insert(context, stream);
            }
            None => {}
        }
    }

    fn with_root<R>(&self, context: u32, f: impl FnOnce(&mut dyn RootContext) -> R) -> Option<R> {
        self.roots
            .with(context, |root| self.run_as(context, || f(root)))
    }

    fn with_http<R>(&self, context: u32, f: impl FnOnce(&mut dyn HttpContext) -> R) -> Option<R> {
        self.http
            .with(context, |http| self.run_as(context, || f(http)))
    }

    fn with_stream<R>(
        &self,
        context: u32,
        f: impl FnOnce(&mut dyn StreamContext) -> R,
    ) -> Option<R> {
        self.streams
            .with(context, |stream| self.run_as(context, || f(stream)))
    }

    /// Runs `f` on context `context`, whatever its kind: for the callbacks every context may
    /// receive.
    fn with_context<R>(&self, context: u32, f: impl FnOnce(&mut dyn Context) -> R) -> Option<R> {
        if self.http.contains(context) {
            self.with_http(context, |c| f(c))
        } else if self.streams.contains(context) {
            self.with_stream(context, |c| f(c))
        } else {
            self.with_root(context, |c| f(c))
        }
    }

    /// Runs `f` on the context that dispatched callout `token` of `kind`, as that context's
    /// host calls (the SDK's `set_effective_context`). `None` if no context of this VM did.
    fn with_callout<R>(
        &self,
        kind: Callout,
        token: u32,
        take: Take,
        f: impl FnOnce(&mut dyn Context) -> R,
    ) -> Option<R> {
        let context = match take {
            Take::Remove => self.callouts.borrow_mut().remove(&(kind, token)),
            Take::Keep => self.callouts.borrow().get(&(kind, token)).copied(),
        }?;
        let _ = hostcalls::set_effective_context(context);
        self.with_context(context, f)
    }

    /// Runs `f` as context `context` of this instance (for callouts and the log level).
    fn run_as<R>(&self, context: u32, f: impl FnOnce() -> R) -> R {
        // Restored on drop, so that a panic (caught in `call`) leaves no dangling pointer.
        struct Restore(Option<(*const Dispatcher, u32)>);
        impl Drop for Restore {
            fn drop(&mut self) {
                ACTIVE.with(|a| a.set(self.0));
            }
        }
        let _restore =
            Restore(ACTIVE.with(|a| a.replace(Some((self as *const Dispatcher, context)))));
        let _level = logger::enter(self.log_level.get());
        let result = f();
        if let Some(level) = logger::take_requested_level() {
            self.log_level.set(level);
        }
        result
    }
}

/// Whether a callback ends its callout.
#[derive(Clone, Copy)]
enum Take {
    /// The last callback of the callout: forget its token.
    Remove,
    /// More callbacks may follow (a gRPC stream's metadata and messages).
    Keep,
}

enum Created {
    Http(Box<dyn HttpContext>),
    Stream(Box<dyn StreamContext>),
}

impl NativeInstance for Dispatcher {
    fn call(&self, index: u32, args: &[u64], results: &mut [u64]) -> Result<(), Trap> {
        let Some(handler) = index
            .checked_sub(FIXED_EXPORTS)
            .and_then(|i| EXPORTS.get(i as usize))
            .map(|(_, _, handler)| *handler)
        else {
            // The ABI version marker: nothing to do.
            return Ok(());
        };
        catch_unwind(AssertUnwindSafe(|| handler(self, args, results))).map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with a non-string payload".into());
            Trap::new(
                TrapKind::Wasm,
                format!("native plugin {} panicked: {message}", self.plugin.name),
            )
        })
    }
}
