//! Properties.

use runtime_api::Caller;

use super::{check, fill_exact, return_data, HostResult};
use crate::{PropertyPath, Status, VmState};

/// Properties the ABI answers itself from the plugin's configuration.
fn plugin_property<'a>(state: &'a VmState, path: PropertyPath<'_>) -> Option<&'a [u8]> {
    let mut segments = path.segments();
    let first = segments.next()?;
    if segments.next().is_some() {
        return None;
    }
    match first {
        b"plugin_name" => Some(state.config.name.as_bytes()),
        b"plugin_root_id" => Some(state.config.root_id.as_bytes()),
        b"plugin_vm_id" => Some(state.config.vm_id.as_bytes()),
        _ => None,
    }
}

fn property_len(state: &mut VmState, path: PropertyPath<'_>) -> Option<u64> {
    if let Some(value) = plugin_property(state, path) {
        return Some(value.len() as u64);
    }
    let context = state.effective_context;
    state.host.property(context, path).map(|v| v.len() as u64)
}

/// `proxy_get_property(path_data, path_size, return_value_data, return_value_size)`.
pub(super) fn get_property(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let len = {
        let (state, memory) = caller.state_and_memory();
        let path = PropertyPath(memory.slice(args[0], args[1])?);
        property_len(state, path).ok_or(Status::NotFound)?
    };
    return_data(caller, len, args[2], args[3], |state, memory, pointer| {
        let path = PropertyPath(memory.slice(args[0], args[1])?);
        if let Some(value) = plugin_property(state, path) {
            return fill_exact(memory, pointer, len, value);
        }
        let context = state.effective_context;
        let value = state.host.property(context, path).ok_or(Status::NotFound)?;
        fill_exact(memory, pointer, len, &value)
    })
}

/// `proxy_set_property(path_data, path_size, value_data, value_size)`.
pub(super) fn set_property(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let path = PropertyPath(memory.slice(args[0], args[1])?);
    let value = memory.slice(args[2], args[3])?;
    if plugin_property(state, path).is_some() {
        // The plugin's identity is the host's to set.
        return Err(Status::BadArgument.into());
    }
    let context = state.effective_context;
    check(state.host.set_property(context, path, value))
}
