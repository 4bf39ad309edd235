//! Foreign functions: what a plugin calls by name with `proxy_call_foreign_function`.
//!
//! Every [`crate::SharedState`] starts with Envoy's (same names, argument encodings and
//! results, see `envoy`), so plugins written for Envoy run unchanged; an embedder may replace
//! them or add its own with [`crate::SharedState::register_foreign_function`].

mod envoy;
#[cfg(feature = "expressions")]
mod expressions;
#[cfg(feature = "signatures")]
mod signatures;

use std::any::{Any, TypeId};
use std::sync::Arc;

use crate::filter_state::{FilterStateObject, LifeSpan, PropertyDeclaration};
use crate::{ContextId, Host, PropertyPath, Status, VmState};

pub(crate) use envoy::register;

/// A function the embedder offers plugins through `proxy_call_foreign_function`: it gets the
/// call (the plugin's context and what the ABI knows of it) and the argument bytes, and returns
/// the result bytes or a status.
pub type ForeignFunction =
    Arc<dyn Fn(&mut ForeignCall<'_>, &[u8]) -> Result<Vec<u8>, Status> + Send + Sync>;

/// A foreign function call in progress: the plugin's effective context and the VM's state.
pub struct ForeignCall<'a> {
    pub(crate) state: &'a mut VmState,
}

impl ForeignCall<'_> {
    /// The context the plugin acts on (its effective context).
    pub fn context(&self) -> ContextId {
        self.state.effective_context
    }

    /// Whether that context is an HTTP stream or TCP connection (not a root context).
    pub fn is_stream(&mut self) -> bool {
        self.state.effective_stream().is_some()
    }

    /// Whether that context is an HTTP stream.
    pub fn is_http_stream(&mut self) -> bool {
        self.state.effective_stream().is_some_and(|s| s.is_http())
    }

    /// The embedder's host.
    pub fn host(&mut self) -> &mut dyn Host {
        &mut *self.state.host
    }

    /// The property at `path` (segments separated by NUL), as `proxy_get_property` answers
    /// the plugin.
    pub fn property(&mut self, path: &[u8]) -> Result<Vec<u8>, Status> {
        crate::exports::property_bytes(self.state, PropertyPath(path))
    }

    /// The filter state of the stream or connection (empty for a root context).
    pub fn filter_state(&mut self) -> &[FilterStateObject] {
        match self.state.effective_stream() {
            Some(stream) => stream.filter_state.objects(),
            None => &[],
        }
    }

    /// Sets a well-known Envoy object of the stream's filter state (see
    /// [`crate::is_envoy_object`]): `NOT_FOUND` for an unknown key or from a root context,
    /// `BAD_ARGUMENT` for a value the object cannot be made from.
    pub fn set_envoy_object(&mut self, key: &str, value: &[u8], span: LifeSpan) -> Status {
        if !crate::is_envoy_object(key) {
            return Status::NotFound;
        }
        match self.state.effective_stream() {
            Some(stream) => stream.filter_state.set_envoy_object(key, value, span),
            None => Status::NotFound,
        }
    }

    /// Declares property `name` for the plugin's later `proxy_set_property` calls, as
    /// `declare_property`. Only a declaration made while the root context runs takes effect (a
    /// stream's is accepted and ignored, as in Envoy); declaring a name twice is `BAD_ARGUMENT`.
    pub fn declare_property(&mut self, name: &[u8], declaration: PropertyDeclaration) -> Status {
        let state = &mut *self.state;
        let Some(crate::state::ContextKind::Root(root)) =
            state.contexts.get_mut(&state.callback_context.0)
        else {
            return Status::Ok;
        };
        use crate::filter_state::{MAX_DECLARATIONS, MAX_DECLARATION_BYTES};
        let size = |name: &[u8], declaration: &PropertyDeclaration| {
            name.len()
                + match &declaration.property_type {
                    crate::PropertyType::FlatBuffers { schema } => schema.len(),
                    crate::PropertyType::Protobuf { type_url } => type_url.len(),
                    _ => 0,
                }
        };
        if root.declarations.contains_key(name) {
            return Status::BadArgument;
        }
        let kept: usize = root.declarations.iter().map(|(n, d)| size(n, d)).sum();
        if root.declarations.len() >= MAX_DECLARATIONS
            || kept + size(name, &declaration) > MAX_DECLARATION_BYTES
        {
            state.tell_limit(crate::state::Limit::PropertyDeclarations, || {
                format!(
                    "declare_property: a root context declares at most {MAX_DECLARATIONS} \
                     properties of at most {MAX_DECLARATION_BYTES} bytes of names and schemas \
                     in all: INTERNAL_FAILURE"
                )
            });
            return Status::InternalFailure;
        }
        root.declarations.insert(name.to_vec(), declaration);
        Status::Ok
    }

    /// Data a foreign function keeps for this VM, by type (created on first use); e.g. the CEL
    /// expressions a plugin compiled.
    pub fn vm_data<T: Any + Send + Default>(&mut self) -> &mut T {
        let slot = self
            .state
            .foreign_data
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()));
        match slot.downcast_mut::<T>() {
            Some(data) => data,
            // The map is keyed by the type's id, so the slot always holds a `T`.
            None => unreachable!("foreign data of another type under {:?}", TypeId::of::<T>()),
        }
    }
}
