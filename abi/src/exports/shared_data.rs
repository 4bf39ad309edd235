//! Shared data, shared queues and metrics.

use runtime_api::Caller;

use super::{check, fill_exact, read_bytes, return_data, HostResult};
use crate::shared::{QueueOwner, SharedLimits, MAX_METRICS, MAX_METRIC_NAME_BYTES};
use crate::state::Limit;
use crate::{MetricType, Status, VmState};

/// `proxy_get_shared_data(key_data, key_size, return_value_data, return_value_size,
/// return_cas)`.
pub(super) fn get_shared_data(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let key = read_bytes(caller, args[0], args[1])?;
    // Check the CAS pointer before allocating anything for the value.
    caller.memory().slice_mut(args[4], 4)?;
    let state = caller.state();
    let (value, cas) = state
        .shared
        .get(&state.config.vm_id, &key)
        .ok_or(Status::NotFound)?;
    let len = value.len() as u64;
    return_data(caller, len, args[2], args[3], |_, memory, pointer| {
        fill_exact(memory, pointer, len, &value)
    })?;
    caller.memory().write_u32(args[4], cas)?;
    Ok(())
}

/// `proxy_set_shared_data(key_data, key_size, value_data, value_size, cas)`.
pub(super) fn set_shared_data(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let key = memory.slice(args[0], args[1])?;
    let value = memory.slice(args[2], args[3])?;
    let status = state
        .shared
        .set(&state.config.vm_id, key, value, args[4] as u32);
    if status == Status::InternalFailure {
        let limit = state.shared.limits().data_bytes_per_vm_id;
        state.tell_limit(Limit::SharedData, || {
            format!(
                "proxy_set_shared_data: the shared data of a VM id is at most {} (keys, values, \
                 the VM id and {} bytes per entry), all taken: INTERNAL_FAILURE",
                in_units(limit),
                SharedLimits::OVERHEAD_BYTES
            )
        });
    }
    check(status)
}

/// `proxy_register_shared_queue(name_data, name_size, return_id)`: the queue's "ready"
/// notifications go to this VM's root context.
pub(super) fn register_shared_queue(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    // Refused before the name is copied out of the guest.
    if args[1] > SharedLimits::QUEUE_NAME_BYTES as u64 {
        caller.state().tell_limit(Limit::QueueName, || {
            format!(
                "proxy_register_shared_queue: a queue name has at most {} bytes (this one {}): \
                 BAD_ARGUMENT",
                SharedLimits::QUEUE_NAME_BYTES,
                args[1]
            )
        });
        return Err(Status::BadArgument.into());
    }
    let (state, mut memory) = caller.state_and_memory();
    memory.slice_mut(args[2], 4)?;
    let name =
        std::str::from_utf8(memory.slice(args[0], args[1])?).map_err(|_| Status::BadArgument)?;
    let owner = QueueOwner {
        root: state.effective_root().0,
        ..state.queue_owner.clone()
    };
    let token = match state
        .shared
        .register_queue(&state.config.vm_id, name, owner)
    {
        Ok(token) => token,
        Err(status) => {
            if status == Status::InternalFailure {
                let limit = state.shared.limits().queues_per_vm_id;
                state.tell_limit(Limit::Queues, || {
                    format!(
                        "proxy_register_shared_queue: a VM id has at most {limit} queues, all \
                         taken (queues stay until the proxy restarts): a new one is \
                         INTERNAL_FAILURE"
                    )
                });
            }
            return Err(status.into());
        }
    };
    memory.write_u32(args[2], token)?;
    Ok(())
}

/// `proxy_resolve_shared_queue(vm_id_data, vm_id_size, name_data, name_size, return_id)`; an
/// empty vm_id means the plugin's own.
pub(super) fn resolve_shared_queue(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, mut memory) = caller.state_and_memory();
    let vm_id =
        std::str::from_utf8(memory.slice(args[0], args[1])?).map_err(|_| Status::BadArgument)?;
    let vm_id = if vm_id.is_empty() {
        state.config.vm_id.as_str()
    } else {
        vm_id
    };
    // No queue has a longer name: nothing to copy.
    if args[3] > SharedLimits::QUEUE_NAME_BYTES as u64 {
        return Err(Status::NotFound.into());
    }
    let name =
        std::str::from_utf8(memory.slice(args[2], args[3])?).map_err(|_| Status::BadArgument)?;
    let token = state
        .shared
        .resolve_queue(vm_id, name)
        .ok_or(Status::NotFound)?;
    memory.write_u32(args[4], token)?;
    Ok(())
}

/// `proxy_dequeue_shared_queue(queue_id, return_value_data, return_value_size)`.
pub(super) fn dequeue_shared_queue(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let item = caller.state().shared.dequeue(args[0] as u32)?;
    let len = item.len() as u64;
    return_data(caller, len, args[1], args[2], |_, memory, pointer| {
        fill_exact(memory, pointer, len, &item)
    })
}

/// `proxy_enqueue_shared_queue(queue_id, value_data, value_size)`.
pub(super) fn enqueue_shared_queue(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let (state, memory) = caller.state_and_memory();
    let item = memory.slice(args[1], args[2])?;
    let status = state.shared.enqueue(args[0] as u32, item);
    if status == Status::InternalFailure {
        let limit = state.shared.limits().queue_bytes_per_vm_id;
        state.tell_limit(Limit::QueueBytes, || {
            format!(
                "proxy_enqueue_shared_queue: the queues of the queue's VM id hold at most {} \
                 waiting (items and {} bytes per item, whoever enqueued them), all taken: \
                 INTERNAL_FAILURE until items are dequeued",
                in_units(limit),
                SharedLimits::OVERHEAD_BYTES
            )
        });
    }
    check(status)
}

/// `proxy_define_metric(metric_type, name_data, name_size, return_metric_id)`.
pub(super) fn define_metric(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let metric_type = MetricType::from_raw(args[0]).ok_or(Status::BadArgument)?;
    // Refused before the name is copied out of the guest.
    if args[2] > MAX_METRIC_NAME_BYTES as u64 {
        caller.state().tell_limit(Limit::MetricName, || {
            format!(
                "proxy_define_metric: a metric name has at most {MAX_METRIC_NAME_BYTES} bytes \
                 (this one {}): BAD_ARGUMENT",
                args[2]
            )
        });
        return Err(Status::BadArgument.into());
    }
    let (state, mut memory) = caller.state_and_memory();
    let name = String::from_utf8_lossy(memory.slice(args[1], args[2])?).into_owned();
    memory.slice_mut(args[3], 4)?;
    let id = match state
        .shared
        .define_metric_for(&state.metric_owner, metric_type, &name)
    {
        Ok(id) => id,
        Err(Status::BadArgument) => {
            // Within the limit as sent, the name outgrew it as its invalid UTF-8 was replaced.
            state.tell_limit(Limit::MetricName, || {
                format!(
                    "proxy_define_metric: a metric name has at most {MAX_METRIC_NAME_BYTES} \
                     bytes (this one {}, its invalid UTF-8 replaced): BAD_ARGUMENT",
                    name.len()
                )
            });
            return Err(Status::BadArgument.into());
        }
        Err(Status::InternalFailure) => {
            let share = state.shared.limits().metric_names_per_vm_id;
            let own_share = state.shared.metric_names_added_by(&state.metric_owner) >= share;
            state.tell_limit(Limit::MetricCount, || match own_share {
                true => format!(
                    "proxy_define_metric: a VM id adds at most {share} metric names, all added: \
                     a new one ({name}) is INTERNAL_FAILURE"
                ),
                false => format!(
                    "proxy_define_metric: the proxy keeps at most {MAX_METRICS} metric names, \
                     all taken: a new one ({name}) is INTERNAL_FAILURE"
                ),
            });
            return Err(Status::InternalFailure.into());
        }
        Err(other) => return Err(other.into()),
    };
    memory.write_u32(args[3], id)?;
    Ok(())
}

/// `proxy_increment_metric(metric_id, offset)`.
pub(super) fn increment_metric(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    check(
        state
            .shared
            .increment_metric_for(&state.metric_owner, args[0] as u32, args[1] as i64),
    )
}

/// `proxy_record_metric(metric_id, value)`.
pub(super) fn record_metric(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    check(
        state
            .shared
            .record_metric_for(&state.metric_owner, args[0] as u32, args[1]),
    )
}

/// `proxy_get_metric(metric_id, return_value)`.
pub(super) fn get_metric(caller: &mut dyn Caller<VmState>, args: &[u64]) -> HostResult {
    let state = caller.state();
    let value = state
        .shared
        .metric_value_for(&state.metric_owner, args[0] as u32)?;
    caller.memory().write_u64(args[1], value as u64)?;
    Ok(())
}

/// `bytes` as a person reads it in a limit: MiB where whole, bytes otherwise.
fn in_units(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}
