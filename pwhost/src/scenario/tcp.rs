//! Running one TCP connection through a VM: new connection, data both ways, both closes, then
//! `on_done`, `on_log` and `on_delete` in Envoy's order.

use abi::{DataAction, PeerType, Vm, VmError};

use super::callouts::Callouts;
use super::report::{FilterStateReport, TcpReport};
use super::{in_memory_host, lossy, TcpConnection, UPSTREAM_ADDRESS};

/// Which way data flows on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// From the client, forwarded upstream.
    Downstream,
    /// From the server, forwarded downstream.
    Upstream,
}

/// Feeds one direction's chunks; returns what was forwarded and whether data was left paused.
fn feed(
    vm: &mut Vm,
    context: abi::ContextId,
    side: Side,
    chunks: &[String],
    report: &mut TcpReport,
    callouts: &mut Callouts<'_>,
) -> Result<(Vec<u8>, bool), VmError> {
    let mut forwarded = Vec::new();
    let mut held = false;
    for (i, chunk) in chunks.iter().enumerate() {
        let end_of_stream = i + 1 == chunks.len();
        let data = buffer(vm, context, side);
        data.extend_from_slice(chunk.as_bytes());
        let size = data.len();
        let (action, key) = match side {
            Side::Downstream => (
                vm.on_downstream_data(context, size, end_of_stream)?,
                "downstream_data",
            ),
            Side::Upstream => (
                vm.on_upstream_data(context, size, end_of_stream)?,
                "upstream_data",
            ),
        };
        report.actions.insert(key, action.as_str());
        held = !matches!(action, DataAction::Continue);
        if !held {
            forwarded.append(buffer(vm, context, side));
        }
    }
    // Paused data waits for the calls the plugin made; a real proxy would wait for them too.
    while held && callouts.answer_next(vm)? {
        let stream = in_memory_host(vm).stream(context);
        let continued = match side {
            Side::Downstream => abi::StreamType::Downstream,
            Side::Upstream => abi::StreamType::Upstream,
        };
        if let Some(position) = stream.continued.iter().position(|t| *t == continued) {
            stream.continued.remove(position);
            held = false;
            forwarded.append(buffer(vm, context, side));
        }
    }
    Ok((forwarded, held))
}

fn buffer(vm: &mut Vm, context: abi::ContextId, side: Side) -> &mut Vec<u8> {
    let stream = in_memory_host(vm).stream(context);
    match side {
        Side::Downstream => &mut stream.downstream_data,
        Side::Upstream => &mut stream.upstream_data,
    }
}

pub(super) fn run_connection(
    vm: &mut Vm,
    connection: &TcpConnection,
    configured: bool,
    connection_id: u64,
) -> TcpReport {
    let mut report = TcpReport::default();
    if !configured || vm.is_failed() {
        report.error = Some(
            if vm.is_failed() {
                "the VM has failed"
            } else {
                "the plugin is not configured"
            }
            .into(),
        );
        return report;
    }
    let mut callouts = Callouts::new(
        vm,
        &connection.http_call_responses,
        &connection.grpc_call_responses,
    );
    let outcome = (|| -> Result<(), VmError> {
        let context = vm.create_tcp_context()?;
        let start_time = vm.host().now();
        let info = &mut in_memory_host(vm).stream(context).info;
        *info = super::connection_info(connection_id, start_time);
        info.upstream_address = Some(UPSTREAM_ADDRESS.into());
        let action = vm.on_new_connection(context)?;
        report.actions.insert("new_connection", action.as_str());
        let (upstream, held_down) = feed(
            vm,
            context,
            Side::Downstream,
            &connection.downstream,
            &mut report,
            &mut callouts,
        )?;
        report.upstream_received = lossy(&upstream);
        let (downstream, held_up) = feed(
            vm,
            context,
            Side::Upstream,
            &connection.upstream,
            &mut report,
            &mut callouts,
        )?;
        report.downstream_received = lossy(&downstream);
        report.stalled = held_down || held_up;
        while callouts.answer_next(vm)? {}
        vm.on_downstream_connection_close(context, PeerType::Remote)?;
        // Envoy does not know who closed the upstream side (its filter sees the end of the data).
        vm.on_upstream_connection_close(context, PeerType::Unknown)?;
        // Envoy ends a connection with on_done before on_log (an HTTP stream the other way).
        vm.on_done(context)?;
        vm.on_log(context)?;
        report.filter_state = FilterStateReport::of(vm.filter_state(context));
        vm.on_delete(context)?;
        in_memory_host(vm).streams.remove(&context);
        Ok(())
    })();
    if let Err(error) = outcome {
        report.error = Some(error.to_string());
    }
    (report.http_calls, report.grpc_calls) = callouts.report(vm);
    if let Some(reason) = callouts.gave_up() {
        report.error.get_or_insert(reason);
    }
    report
}
