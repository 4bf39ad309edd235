//! The host-side state of one VM, which every host function receives.

use std::sync::Arc;
use std::time::Duration;

use runtime_api::GuestFunction;
use rustc_hash::FxHashMap;

use crate::shared::QueueOwner;
use crate::{ContextId, HeaderMap, Host, HttpCallResponse, PluginConfig, SharedState};

/// What kind of context an id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ContextKind {
    Root,
    Stream { root: ContextId },
}

/// The per-VM state the engine keeps beside the guest and hands to host functions.
///
/// It is created by [`crate::Vm`]; embedders reach the [`Host`] inside through
/// [`crate::Vm::host`].
pub struct VmState {
    pub(crate) host: Box<dyn Host>,
    pub(crate) config: Arc<PluginConfig>,
    pub(crate) shared: SharedState,
    /// The guest's allocator, resolved once at start.
    pub(crate) allocator: Option<GuestFunction>,
    /// The context that host calls act on: the callback's context unless the plugin switched it
    /// with `proxy_set_effective_context`.
    pub(crate) effective_context: ContextId,
    /// Every live context; a hash map keyed by id, so lookups cost no tree walk.
    pub(crate) contexts: FxHashMap<u32, ContextKind>,
    /// The HTTP call response being delivered, readable while `proxy_on_http_call_response` runs.
    pub(crate) http_call_response: Option<HttpCallResponse>,
    /// The tick period each root context asked for.
    pub(crate) tick_periods: FxHashMap<u32, Duration>,
    /// Root contexts whose `proxy_on_done` returned false: they owe a `proxy_done`.
    pub(crate) pending_done: Vec<ContextId>,
    /// Where queues this VM registers send their "ready" notifications.
    pub(crate) queue_owner: QueueOwner,
    /// Arguments of the foreign function call being delivered (`CallData` buffer).
    pub(crate) call_data: Option<Vec<u8>>,
    /// gRPC initial metadata being delivered (map type 4).
    pub(crate) grpc_initial_metadata: Option<HeaderMap>,
    /// gRPC trailing metadata being delivered (map type 5).
    pub(crate) grpc_trailing_metadata: Option<HeaderMap>,
    /// The gRPC message being delivered (`GrpcReceiveBuffer`).
    pub(crate) grpc_message: Option<Vec<u8>>,
    /// The status of the last gRPC call or stream that closed (`proxy_get_status`).
    pub(crate) grpc_status: Option<(u32, Vec<u8>)>,
    /// Whether `proxy_on_vm_start` is running: ABI 0.1.0's `proxy_get_configuration` then
    /// returns the VM configuration instead of the plugin configuration.
    pub(crate) in_vm_start: bool,
}

impl VmState {
    pub(crate) fn new(
        host: Box<dyn Host>,
        config: Arc<PluginConfig>,
        shared: SharedState,
        queue_owner: QueueOwner,
    ) -> Self {
        VmState {
            host,
            config,
            shared,
            allocator: None,
            effective_context: ContextId(0),
            contexts: FxHashMap::default(),
            http_call_response: None,
            tick_periods: FxHashMap::default(),
            pending_done: Vec::new(),
            queue_owner,
            call_data: None,
            grpc_initial_metadata: None,
            grpc_trailing_metadata: None,
            grpc_message: None,
            grpc_status: None,
            in_vm_start: false,
        }
    }

    /// The root context of the effective context (itself if it is a root).
    pub(crate) fn effective_root(&self) -> ContextId {
        match self.contexts.get(&self.effective_context.0) {
            Some(ContextKind::Stream { root }) => *root,
            _ => self.effective_context,
        }
    }
}
