//! Running one TCP connection through the network filter chain, as Envoy runs a connection
//! through Wasm network filters: new connection (in chain order), data from downstream in chain
//! order and data from upstream in reverse order (each chunk as far as the plugins let it
//! before the next), both closes, then `on_done`, `on_log` and `on_delete` in Envoy's order.
//!
//! A plugin holding data when its direction ends is waited for: the runner answers the calls
//! the plugins made, in order, until it continues (else the connection is reported stalled). A
//! plugin whose VM fails applies its failure policy: fail closed closes the connection; fail
//! open passes the connection on without it, with the data it held.

use abi::{ContextId, DataAction, PeerType, StreamRecord, StreamType, Vm, VmError};
use lifecycle::{Admission, OnFailure, PluginId, StreamVm, Worker};

use super::callouts::Callouts;
use super::report::{FilterReport, FilterStateReport, TcpReport};
use super::{in_memory_host, report_text, Bytes, TcpConnection, UPSTREAM_ADDRESS};

/// Which way data flows on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// From the client, forwarded upstream.
    Downstream,
    /// From the server, forwarded downstream.
    Upstream,
}

impl Side {
    fn stream_type(self) -> StreamType {
        match self {
            Side::Downstream => StreamType::Downstream,
            Side::Upstream => StreamType::Upstream,
        }
    }
}

/// Why the connection stopped.
enum Stop {
    /// A plugin's VM failed (this stage's).
    Failed(usize, VmError),
    /// A plugin failing closed closes the connection.
    Closed,
}

/// One plugin of the chain, on this connection.
struct Stage {
    plugin: PluginId,
    held_vm: Option<StreamVm>,
    context: ContextId,
    /// The plugin sees nothing more of the connection (its VM failed, before or during it).
    inactive: bool,
    report: FilterReport,
    /// Whether the end of the current direction was passed on.
    end_sent: bool,
}

struct Connection<'w, 'a> {
    worker: &'w mut Worker,
    stages: Vec<Stage>,
    callouts: Callouts<'a>,
    report: TcpReport,
    /// What reached the upstream and the client, made report text once whole (chunk by
    /// chunk, a character split between two chunks would read as two escapes).
    received: [Vec<u8>; 2],
}

/// The stream record of stage `stage` (in the host of its VM copy).
fn record<'s>(worker: &'s mut Worker, stage: &Stage) -> Result<&'s mut StreamRecord, VmError> {
    super::stream_record(worker, stage.held_vm.as_ref(), stage.context)
}

impl Connection<'_, '_> {
    fn invoke<T>(
        &mut self,
        k: usize,
        callback: impl FnOnce(&mut Vm, ContextId) -> Result<T, VmError>,
    ) -> Result<T, Stop> {
        let handles: Vec<Option<&StreamVm>> =
            self.stages.iter().map(|s| s.held_vm.as_ref()).collect();
        let context = self.stages[k].context;
        self.callouts
            .invoke(self.worker, &handles, k, context, callback)
            .map_err(|error| Stop::Failed(k, error))
    }

    fn buffer(&mut self, k: usize, side: Side) -> Result<&mut Vec<u8>, Stop> {
        let stream = record(self.worker, &self.stages[k]).map_err(|e| Stop::Failed(k, e))?;
        Ok(match side {
            Side::Downstream => &mut stream.downstream_data,
            Side::Upstream => &mut stream.upstream_data,
        })
    }

    fn take_continued(&mut self, k: usize, side: Side) -> Result<bool, Stop> {
        let stream = record(self.worker, &self.stages[k]).map_err(|e| Stop::Failed(k, e))?;
        let before = stream.continued.len();
        stream.continued.retain(|t| *t != side.stream_type());
        Ok(stream.continued.len() != before)
    }

    fn fail(&mut self, k: usize, error: &VmError) -> OnFailure {
        let stage = &mut self.stages[k];
        stage.inactive = true;
        stage.report.error.get_or_insert_with(|| error.to_string());
        let outcome = self.worker.failed(stage.plugin, error);
        stage.report.bypassed = outcome == OnFailure::FailOpen;
        outcome
    }

    /// Waits for stage `k`'s plugin to continue `side`; `false` if nothing is left to wait for.
    fn settle(&mut self, k: usize, side: Side) -> Result<bool, Stop> {
        loop {
            if self.take_continued(k, side)? {
                return Ok(true);
            }
            let handles: Vec<Option<&StreamVm>> =
                self.stages.iter().map(|s| s.held_vm.as_ref()).collect();
            match self.callouts.answer_next(self.worker, &handles) {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(false),
                Err((j, error)) if j == k => return Err(Stop::Failed(k, error)),
                Err((j, error)) => {
                    if self.fail(j, &error) == OnFailure::FailClosed {
                        return Err(Stop::Closed);
                    }
                }
            }
        }
    }

    /// Stage `k`'s plugin gets a chunk; returns what it lets through.
    fn on_data(
        &mut self,
        k: usize,
        side: Side,
        chunk: Vec<u8>,
        end: bool,
    ) -> Result<Vec<(Vec<u8>, bool)>, Stop> {
        let buffer = self.buffer(k, side)?;
        buffer.extend_from_slice(&chunk);
        let size = buffer.len();
        let (action, key) = match side {
            Side::Downstream => (
                self.invoke(k, |vm, c| vm.on_downstream_data(c, size, end))?,
                "downstream_data",
            ),
            Side::Upstream => (
                self.invoke(k, |vm, c| vm.on_upstream_data(c, size, end))?,
                "upstream_data",
            ),
        };
        self.stages[k].report.actions.insert(key, action.as_str());
        let mut out = Vec::new();
        if action == DataAction::Continue || self.take_continued(k, side)? {
            out.push((std::mem::take(self.buffer(k, side)?), end));
            self.stages[k].end_sent |= end;
        } else if end {
            // Paused data waits for the calls the plugin made; a real proxy would wait too.
            if self.settle(k, side)? {
                out.push((std::mem::take(self.buffer(k, side)?), true));
                self.stages[k].end_sent = true;
            } else {
                self.report.stalled = true;
            }
        }
        Ok(out)
    }

    /// Counts `bytes` read from the client (`Side::Downstream`) or written to it
    /// (`Side::Upstream`) in what every plugin knows of the connection (`request.size`,
    /// `response.size`), as a proxy counts them when they pass.
    fn count(&mut self, side: Side, bytes: usize) {
        for stage in self.stages.iter().filter(|stage| !stage.inactive) {
            let Some(vm) = stage.held_vm.as_ref().and_then(|h| self.worker.vm(h)) else {
                continue;
            };
            let info = &mut in_memory_host(vm).stream(stage.context).info;
            let counter = match side {
                Side::Downstream => &mut info.bytes_received,
                Side::Upstream => &mut info.bytes_sent,
            };
            *counter = Some(counter.unwrap_or(0).saturating_add(bytes as u64));
        }
    }

    fn deliver(
        &mut self,
        side: Side,
        order: &[usize],
        position: usize,
        chunk: Vec<u8>,
        end: bool,
    ) -> Result<(), Stop> {
        let Some(&k) = order.get(position) else {
            if side == Side::Upstream {
                self.count(side, chunk.len());
            }
            let received = match side {
                Side::Downstream => &mut self.received[0],
                Side::Upstream => &mut self.received[1],
            };
            received.extend_from_slice(&chunk);
            return Ok(());
        };
        let outputs = if self.stages[k].inactive {
            vec![(chunk, end)]
        } else {
            match self.on_data(k, side, chunk, end) {
                Ok(outputs) => outputs,
                Err(Stop::Failed(j, error)) => match self.fail(j, &error) {
                    OnFailure::FailClosed => return Err(Stop::Closed),
                    // The data the plugin held goes on without it.
                    OnFailure::FailOpen => {
                        let held = self.buffer(k, side).map(std::mem::take).unwrap_or_default();
                        vec![(held, end)]
                    }
                },
                Err(stop) => return Err(stop),
            }
        };
        for (chunk, end) in outputs {
            self.deliver(side, order, position + 1, chunk, end)?;
        }
        Ok(())
    }

    fn flow(&mut self, side: Side, chunks: &[Bytes]) -> Result<(), Stop> {
        for stage in &mut self.stages {
            stage.end_sent = false;
        }
        let order: Vec<usize> = match side {
            Side::Downstream => (0..self.stages.len()).collect(),
            Side::Upstream => (0..self.stages.len()).rev().collect(),
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let end = i + 1 == chunks.len();
            if side == Side::Downstream {
                self.count(side, chunk.0.len());
            }
            self.deliver(side, &order, 0, chunk.0.clone(), end)?;
        }
        Ok(())
    }

    fn run(&mut self, connection: &TcpConnection) -> Result<(), Stop> {
        for k in 0..self.stages.len() {
            if self.stages[k].inactive {
                continue;
            }
            match self.invoke(k, |vm, c| vm.on_new_connection(c)) {
                Ok(action) => {
                    self.stages[k]
                        .report
                        .actions
                        .insert("new_connection", action.as_str());
                }
                Err(Stop::Failed(j, error)) => {
                    if self.fail(j, &error) == OnFailure::FailClosed {
                        return Err(Stop::Closed);
                    }
                }
                Err(stop) => return Err(stop),
            }
        }
        self.flow(Side::Downstream, &connection.downstream)?;
        self.flow(Side::Upstream, &connection.upstream)?;
        // Calls nobody waited for still get their answers before the connection ends.
        loop {
            let handles: Vec<Option<&StreamVm>> =
                self.stages.iter().map(|s| s.held_vm.as_ref()).collect();
            match self.callouts.answer_next(self.worker, &handles) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err((j, error)) => {
                    self.fail(j, &error);
                }
            }
        }
        Ok(())
    }
}

/// Why a plugin whose VM had failed before the connection gets no part in it.
fn admission_error(worker: &mut Worker, plugin: PluginId) -> String {
    match worker.copy_of(plugin) {
        Some((_, vm, _)) if vm.is_failed() => "the VM has failed".into(),
        Some(_) => "the plugin is not configured".into(),
        None => "the plugin's VM could not be made".into(),
    }
}

/// Runs `connection` through the plugins of `chain` on `worker`.
pub(super) fn run_connection(
    worker: &mut Worker,
    chain: &[PluginId],
    connection: &TcpConnection,
    connection_id: u64,
    owners: &mut super::Owners,
) -> TcpReport {
    let mut stages = Vec::new();
    let mut closed = None;
    for plugin in chain {
        let mut stage = Stage {
            plugin: *plugin,
            held_vm: None,
            context: ContextId(0),
            inactive: false,
            report: FilterReport {
                plugin: worker.plugins().config(*plugin).name.clone(),
                ..FilterReport::default()
            },
            end_sent: false,
        };
        match worker.admit(*plugin) {
            Admission::Run(held) => {
                let created = worker
                    .vm(&held)
                    .map(|vm| vm.create_tcp_context_for(held.root()));
                let copy = held.copy();
                stage.held_vm = Some(held);
                match created {
                    Some(Ok(context)) => {
                        stage.context = context;
                        owners.insert((copy, context), *plugin);
                    }
                    Some(Err(error)) => {
                        stage.inactive = true;
                        stage.report.error = Some(error.to_string());
                        match worker.failed(*plugin, &error) {
                            OnFailure::FailClosed => {
                                closed.get_or_insert(stages.len());
                            }
                            OnFailure::FailOpen => stage.report.bypassed = true,
                        }
                    }
                    None => stage.inactive = true,
                }
            }
            Admission::FailClosed => {
                stage.inactive = true;
                stage.report.error = Some(admission_error(worker, *plugin));
                closed.get_or_insert(stages.len());
            }
            Admission::FailOpen => {
                stage.inactive = true;
                stage.report.bypassed = true;
                stage.report.error = Some(admission_error(worker, *plugin));
            }
        }
        stages.push(stage);
    }
    for stage in &stages {
        if stage.inactive {
            continue;
        }
        let Some(vm) = stage.held_vm.as_ref().and_then(|h| worker.vm(h)) else {
            continue;
        };
        let start_time = vm.host().now();
        let info = &mut in_memory_host(vm).stream(stage.context).info;
        *info = super::connection_info(connection_id, start_time);
        info.upstream_address = Some(UPSTREAM_ADDRESS);
        info.cluster_name.clone_from(&connection.cluster_name);
    }
    let handles: Vec<Option<&StreamVm>> = stages.iter().map(|s| s.held_vm.as_ref()).collect();
    let callouts = Callouts::new(
        worker,
        &handles,
        &connection.http_call_responses,
        &connection.grpc_call_responses,
    );
    let mut run = Connection {
        worker,
        stages,
        callouts,
        report: TcpReport::default(),
        received: [Vec::new(), Vec::new()],
    };
    // A plugin that failed closed before the connection closes it at once.
    run.report.closed = closed.is_some();
    if closed.is_none() {
        match run.run(connection) {
            Ok(()) => {}
            Err(Stop::Closed) => run.report.closed = true,
            Err(Stop::Failed(j, error)) => {
                run.report.closed = run.fail(j, &error) == OnFailure::FailClosed;
            }
        }
    }
    finish(run)
}

fn finish(run: Connection<'_, '_>) -> TcpReport {
    let gave_up = run.callouts.gave_up();
    let unused_answers = run.callouts.unused_answers();
    let Connection {
        worker,
        mut stages,
        callouts,
        mut report,
        received: [upstream_received, downstream_received],
    } = run;
    report.upstream_received = report_text(&upstream_received);
    report.downstream_received = report_text(&downstream_received);
    let handles: Vec<Option<&StreamVm>> = stages.iter().map(|s| s.held_vm.as_ref()).collect();
    let calls = callouts.reports(worker, &handles);
    for (stage, (http_calls, grpc_calls)) in stages.iter_mut().zip(calls) {
        stage.report.http_calls = http_calls;
        stage.report.grpc_calls = grpc_calls;
    }
    // Both sides close: every plugin hears of each (Envoy does not know who closed the upstream
    // side: its filter sees the end of the data).
    for stage in stages.iter_mut().filter(|s| !s.inactive) {
        let context = stage.context;
        let closed = stage.held_vm.as_ref().and_then(|h| worker.vm(h)).map(|vm| {
            vm.on_downstream_connection_close(context, PeerType::Remote)
                .and_then(|_| vm.on_upstream_connection_close(context, PeerType::Unknown))
        });
        if let Some(Err(error)) = closed {
            stage.inactive = true;
            stage.report.error.get_or_insert_with(|| error.to_string());
            worker.failed(stage.plugin, &error);
        }
    }
    for stage in &mut stages {
        let Some(held) = stage.held_vm.take() else {
            continue;
        };
        if let Some(vm) = worker.vm(&held) {
            let context = stage.context;
            if !stage.inactive && !vm.is_failed() {
                // Envoy ends a connection with on_done before on_log (an HTTP stream the other
                // way).
                let ended = vm
                    .on_done(context)
                    .and_then(|_| vm.on_log(context))
                    .map(|_| {
                        stage.report.filter_state = FilterStateReport::of(vm.filter_state(context))
                    })
                    .and_then(|_| vm.on_delete(context));
                if let Err(error) = ended {
                    stage.report.error.get_or_insert_with(|| error.to_string());
                    worker.failed(stage.plugin, &error);
                }
            }
            if let Some(vm) = worker.vm(&held) {
                in_memory_host(vm).streams.remove(&context);
            }
        }
        worker.release(held);
    }
    let mut filters: Vec<FilterReport> = stages.into_iter().map(|s| s.report).collect();
    report.error = filters.iter().find_map(|f| f.error.clone()).or(gave_up);
    report.warnings = unused_answers;
    if filters.len() == 1 {
        let only = filters.remove(0);
        report.actions = only.actions;
        report.http_calls = only.http_calls;
        report.grpc_calls = only.grpc_calls;
        report.filter_state = only.filter_state;
    } else {
        report.filters = filters;
    }
    report
}
