//! Properties: Envoy's attributes and the properties plugins set.

use runtime_api::Caller;

use super::{fill_exact, return_data, HostResult};
use crate::state::Limit;
use crate::{attributes, PropertyPath, Status, VmState};

/// The longest property path a plugin may name: nothing longer names a property, and its
/// segments would be collected before any lookup.
pub(crate) const MAX_PROPERTY_PATH_BYTES: usize = 64 << 10;

/// `Err` (and the plugin told once) for a path over [`MAX_PROPERTY_PATH_BYTES`].
fn check_path(state: &mut VmState, path: &[u8], status: Status) -> Result<(), Status> {
    if path.len() <= MAX_PROPERTY_PATH_BYTES {
        return Ok(());
    }
    state.tell_limit(Limit::PropertyPath, || {
        let status = match status {
            Status::NotFound => "NOT_FOUND",
            _ => "BAD_ARGUMENT",
        };
        format!(
            "a property path has at most {MAX_PROPERTY_PATH_BYTES} bytes (this one has {}): \
             {status}",
            path.len()
        )
    });
    Err(status)
}

/// The bytes of the property at `path`: what the embedder answers itself, else Envoy's
/// attributes and the properties plugins set. The plugin's identity is always the ABI's.
pub(crate) fn property_bytes(
    state: &mut VmState,
    path: PropertyPath<'_>,
) -> Result<Vec<u8>, Status> {
    check_path(state, path.0, Status::NotFound)?;
    let identity = matches!(
        path.0.strip_suffix(b"\0").unwrap_or(path.0),
        b"plugin_name" | b"plugin_root_id" | b"plugin_vm_id"
    );
    if !identity {
        let context = state.effective_context;
        if let Some(value) = state.host.property(context, path) {
            return Ok(value.into_owned());
        }
    }
    attributes::property(state, path)?.encode()
}

/// `proxy_get_property(path_data, path_size, return_value_data, return_value_size)`.
pub(super) fn get_property(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let value = {
        let (state, memory) = caller.state_and_memory();
        let path = PropertyPath(memory.slice(args[0], args[1])?);
        property_bytes(state, path)?
    };
    let len = value.len() as u64;
    return_data(caller, len, args[2], args[3], |_, memory, pointer| {
        fill_exact(memory, pointer, len, &value)
    })
}

/// `proxy_set_property(path_data, path_size, value_data, value_size)`: as Envoy, the stream's
/// filter state at `wasm.<path>`, typed as the root context declared it; `NOT_FOUND` from a root
/// context (which has no stream), `BAD_ARGUMENT` for a read-only property already set.
pub(super) fn set_property(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let path = memory.slice(args[0], args[1])?;
    let value = memory.slice(args[2], args[3])?;
    check_path(state, path, Status::BadArgument)?;
    let declaration = state
        .effective_root_state()
        .and_then(|root| root.declarations.get(path).cloned());
    let stream = state.effective_stream().ok_or(Status::NotFound)?;
    let status = stream
        .filter_state
        .set_property(path, value, declaration.as_ref());
    if status == Status::InternalFailure {
        use crate::filter_state::{MAX_FILTER_STATE_BYTES, MAX_FILTER_STATE_OBJECTS};
        state.tell_limit(Limit::FilterState, || {
            format!(
                "a stream keeps at most {MAX_FILTER_STATE_OBJECTS} properties of at most \
                 {MAX_FILTER_STATE_BYTES} bytes in all: INTERNAL_FAILURE"
            )
        });
    }
    super::check(status)
}
