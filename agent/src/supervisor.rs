//! One task per instance that owns its [`Machine`] and carries out its
//! actions: spawning and killing the VMM, probing and shutting it down
//! through the control socket, watching its pidfd, timing restarts and
//! cleaning up. Requests and facts reach it through one channel, so the
//! machine sees them one at a time; every change is persisted, logged and
//! published before the next input.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::AgentConfig;
use crate::events::EventBus;
use crate::machine::{Action, ExitInfo, Input, Machine, Observed, Phase, WrongState};
use crate::persist::{self, InstancePaths, PersistError};
use crate::process::{self, Vmm};
use crate::resources::Host;
use crate::spec::InstanceSpec;
use crate::{chain, console, control, now_ms};

/// How long a new VMM gets to answer on its control socket.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the control socket is tried while probing.
const PROBE_INTERVAL: Duration = Duration::from_millis(2);
/// Console lines quoted in a failure.
const TAIL_LINES: usize = 10;

/// The supervisor has ended (the instance was deleted).
#[derive(Debug, thiserror::Error)]
#[error("instance {0} is gone")]
pub struct Gone(pub String);

/// Errors of an operation on an instance.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Not allowed in this state.
    #[error(transparent)]
    WrongState(#[from] WrongState),
    /// Deleted meanwhile.
    #[error(transparent)]
    Gone(#[from] Gone),
    /// A new size or user data could not be stored (the old ones stay).
    #[error("cannot store the instance's new size and user data")]
    Persist(#[source] PersistError),
}

enum Msg {
    Op(Input, oneshot::Sender<Result<(), WrongState>>),
    Resize(Arc<InstanceSpec>, oneshot::Sender<Result<(), OpError>>),
    Fact(Input),
    Exited(u32, ExitInfo),
}

/// The way to an instance's supervisor.
pub struct InstanceHandle {
    spec: watch::Receiver<Arc<InstanceSpec>>,
    tx: mpsc::UnboundedSender<Msg>,
    state: watch::Receiver<Observed>,
}

impl InstanceHandle {
    /// Its spec (its size and user data change with a resize).
    pub fn spec(&self) -> Arc<InstanceSpec> {
        self.spec.borrow().clone()
    }

    /// Its current observed state.
    pub fn observed(&self) -> Observed {
        self.state.borrow().clone()
    }

    /// Apply an operator request.
    pub async fn op(&self, input: Input) -> Result<(), OpError> {
        let (reply, rx) = oneshot::channel();
        let gone = || Gone(self.spec().id.clone());
        self.tx.send(Msg::Op(input, reply)).map_err(|_| gone())?;
        Ok(rx.await.map_err(|_| gone())??)
    }

    /// Replace the spec by `spec` (the same instance with another size or
    /// user data), on disk and on the host, while no VMM runs: only a
    /// created, stopped or failed instance takes it. The next VMM runs
    /// with it.
    pub async fn resize(&self, spec: Arc<InstanceSpec>) -> Result<(), OpError> {
        let (reply, rx) = oneshot::channel();
        let gone = || Gone(self.spec().id.clone());
        self.tx.send(Msg::Resize(spec, reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Wait until `done` holds for the observed state (at most `timeout`).
    pub async fn wait(
        &self,
        timeout: Duration,
        done: impl Fn(&Observed) -> bool,
    ) -> Option<Observed> {
        let mut rx = self.state.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|o| done(o))).await;
        match r {
            Ok(Ok(o)) => Some(o.clone()),
            // The supervisor ended: the instance is deleted.
            Ok(Err(_)) => Some(self.state.borrow().clone()),
            Err(_) => None,
        }
    }
}

/// The VMM process of an instance while it lives.
struct LiveVmm {
    pid: u32,
    since_ms: u64,
    /// Shared with shutdown tasks that may have to kill it.
    pidfd: Arc<OwnedFd>,
}

struct Actor {
    spec: Arc<InstanceSpec>,
    /// Where the handle reads the spec.
    spec_tx: watch::Sender<Arc<InstanceSpec>>,
    paths: InstancePaths,
    machine: Machine,
    vmm: Option<LiveVmm>,
    probe: Option<JoinHandle<()>>,
    restart: Option<JoinHandle<()>>,
    tx: mpsc::UnboundedSender<Msg>,
    state: watch::Sender<Observed>,
    ctx: Arc<dyn Context>,
}

/// What a supervisor needs from the agent around it (the manager provides
/// it); the supervisor knows nothing else of the manager.
pub trait Context: Send + Sync + 'static {
    /// The agent's configuration.
    fn cfg(&self) -> &AgentConfig;
    /// The host operations (cgroups, TAPs, disks, the VMM command).
    fn host(&self) -> Host<'_>;
    /// Where state changes are announced.
    fn events(&self) -> &EventBus;
    /// The instance is gone: free its id and capacity.
    fn forget(&self, id: &str);
}

/// Start the supervisor of an instance. `recovered` holds the VMM found
/// alive after an agent restart (`Some(None)`: none found); `None` for a new
/// instance.
pub fn start(
    ctx: Arc<dyn Context>,
    spec: Arc<InstanceSpec>,
    machine: Machine,
    recovered: Option<Option<Vmm>>,
) -> Arc<InstanceHandle> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut machine = machine;
    if machine.observed().seq == 0 {
        // A new instance: stamped under the caller's `order::publishing`
        // guard, held until it is in the registry.
        machine.stamp(crate::order::next_seq());
    } else {
        crate::order::seen(machine.observed().seq);
    }
    let (state, state_rx) = watch::channel(machine.observed().clone());
    let (spec_tx, spec_rx) = watch::channel(spec.clone());
    let paths = InstancePaths::new(&ctx.cfg().state_dir, &spec.id);
    let span = tracing::info_span!("instance", instance_id = %spec.id);
    let mut actor = Actor {
        spec: spec.clone(),
        spec_tx,
        paths,
        machine,
        vmm: None,
        probe: None,
        restart: None,
        tx: tx.clone(),
        state,
        ctx,
    };
    tokio::spawn(
        async move {
            if let Some(found) = recovered {
                actor.recover(found);
            }
            actor.run(rx).await;
        }
        .instrument(span),
    );
    Arc::new(InstanceHandle {
        spec: spec_rx,
        tx,
        state: state_rx,
    })
}

/// Run `f`, which blocks (an fsync'd write, a console trim, fork/exec),
/// without stalling the other tasks of this runtime worker: on the
/// multi-threaded runtime the worker hands its other tasks (every other
/// instance's supervisor) to another thread first. The actor stays in
/// control of ordering: `f` finishes before the next message is handled.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.machine.observed().phase != Phase::Deleted {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Op(input, reply)) => {
                        let _ = reply.send(self.apply(input));
                    }
                    Some(Msg::Resize(spec, reply)) => {
                        let _ = reply.send(self.resize(spec));
                    }
                    Some(Msg::Fact(input)) => self.fact(input),
                    Some(Msg::Exited(pid, exit)) => self.exited(pid, exit),
                    None => break,
                },
                _ = tick.tick() => self.trim_console(),
            }
        }
        self.abort_tasks();
    }

    fn recover(&mut self, found: Option<Vmm>) {
        let pid = found.as_ref().map(|v| v.pid);
        if let Some(vmm) = found {
            tracing::info!(pid = vmm.pid, "re-attached to a running VMM");
            self.watch_vmm(vmm);
        }
        self.fact(Input::Recovered {
            pid,
            now_ms: now_ms(),
        });
    }

    /// Apply an input; persist and publish the changes; run the actions.
    fn apply(&mut self, input: Input) -> Result<(), WrongState> {
        let actions = self.machine.handle(input, now_ms())?;
        self.publish();
        for a in actions {
            self.execute(a);
        }
        Ok(())
    }

    /// Take `spec` (another size or user data) while no VMM runs: the spec
    /// is stored (the commit point), then the user-data disk and the
    /// cgroup's limits follow it (and every spawn checks the disk again).
    fn resize(&mut self, spec: Arc<InstanceSpec>) -> Result<(), OpError> {
        let phase = self.machine.observed().phase;
        if !matches!(phase, Phase::Created | Phase::Stopped | Phase::Failed) {
            return Err(WrongState {
                op: "change the size or user data of",
                phase,
            }
            .into());
        }
        blocking(|| persist::write_json(&self.paths.spec(), &*spec)).map_err(OpError::Persist)?;
        tracing::info!(
            vcpus = spec.vcpus,
            memory_mib = spec.memory_mib,
            user_data_bytes = spec.user_data.len(),
            "size and user data changed"
        );
        self.spec = spec.clone();
        self.spec_tx.send_replace(spec.clone());
        // Committed: what fails here the next spawn does again (and fails
        // the spawn if it still cannot).
        let host = self.ctx.host();
        if let Err(e) = blocking(|| host.apply_resources(&spec, &self.paths)) {
            tracing::warn!(error = %chain(&e), "cannot apply the new size and user data yet; the next spawn tries again");
        }
        Ok(())
    }

    fn fact(&mut self, input: Input) {
        // Facts are never refused; stale ones change nothing.
        let _ = self.apply(input);
    }

    fn publish(&mut self) {
        let changes = self.machine.take_changes();
        // Stamped, persisted and made visible in that order under one
        // guard (see `order`): whoever sees a change can find it on disk.
        let guard = crate::order::publishing();
        if !changes.is_empty() {
            self.machine.stamp(crate::order::next_seq());
        }
        let obs = self.machine.observed().clone();
        if obs.phase == Phase::Deleted {
            // Free the id and capacity before anyone learns of the deletion.
            self.ctx.forget(&self.spec.id);
        } else if let Err(e) = blocking(|| persist::write_json(&self.paths.state(), &obs)) {
            tracing::error!(error = %chain(&e), "cannot persist the observed state");
        }
        self.state.send_replace(obs);
        drop(guard);
        for c in &changes {
            tracing::info!(from = ?c.from, to = ?c.to, reason = %c.reason, "state change");
            self.ctx.events().emit(&self.spec.id, c);
        }
    }

    fn execute(&mut self, action: Action) {
        tracing::debug!(?action, "executing");
        match action {
            Action::Spawn => self.spawn(),
            Action::Probe => self.probe(),
            Action::Shutdown { timeout_ms } => self.shutdown(timeout_ms),
            Action::Kill => {
                if let Some(vmm) = &self.vmm {
                    process::signal(&vmm.pidfd, libc::SIGKILL);
                }
            }
            Action::ScheduleRestart { delay_ms } => {
                self.abort_restart();
                let tx = self.tx.clone();
                self.restart = Some(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    let _ = tx.send(Msg::Fact(Input::RestartDue));
                }));
            }
            Action::CancelRestart => self.abort_restart(),
            Action::Cleanup => self.cleanup(),
        }
    }

    fn spawn(&mut self) {
        let host = self.ctx.host();
        let spawned = host
            .vmm_command(&self.spec, &self.machine.observed().volumes, &self.paths)
            .map_err(|e| chain(&e))
            .and_then(|cmd| blocking(|| process::spawn(&cmd)).map_err(|e| chain(&e)));
        match spawned {
            Ok(vmm) => {
                let pid = vmm.pid;
                tracing::info!(pid, "VMM spawned");
                self.watch_vmm(vmm);
                self.fact(Input::Spawned { pid });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot spawn the VMM");
                self.fact(Input::SpawnFailed { error });
            }
        }
    }

    /// Keep the VMM and report its exit when its pidfd says so.
    fn watch_vmm(&mut self, vmm: Vmm) {
        let pid = vmm.pid;
        match vmm.pidfd.try_clone() {
            Ok(waiter) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let exit = process::wait_exit(waiter).await;
                    let _ = tx.send(Msg::Exited(pid, exit));
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot duplicate a pidfd; exit not watched"),
        }
        self.vmm = Some(LiveVmm {
            pid,
            since_ms: vmm.since_ms,
            pidfd: Arc::new(vmm.pidfd),
        });
    }

    fn probe(&mut self) {
        let Some(vmm) = &self.vmm else { return };
        let pid = vmm.pid;
        let socket = self.paths.socket.clone();
        let tx = self.tx.clone();
        if let Some(p) = self.probe.take() {
            p.abort();
        }
        self.probe = Some(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
            let fact = loop {
                if control::status(&socket).await.is_ok() {
                    break Input::Answered { pid };
                }
                if tokio::time::Instant::now() > deadline {
                    break Input::ProbeTimedOut { pid };
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            };
            let _ = tx.send(Msg::Fact(fact));
        }));
    }

    fn shutdown(&mut self, timeout_ms: u32) {
        let Some(vmm) = &self.vmm else { return };
        let fd = vmm.pidfd.clone();
        let timeout_ms = if timeout_ms == 0 {
            self.ctx.cfg().stop_timeout_ms
        } else {
            timeout_ms
        };
        let socket = self.paths.socket.clone();
        tokio::spawn(
            async move {
                match control::shutdown(&socket, timeout_ms).await {
                    Ok(a) => tracing::info!(graceful = ?a.graceful, "VMM shut down"),
                    Err(e) => {
                        tracing::warn!(error = %chain(&e), "graceful shutdown failed; killing");
                        process::signal(&fd, libc::SIGKILL);
                        return;
                    }
                }
                // The VMM exits right after answering; make sure it does.
                tokio::time::sleep(Duration::from_secs(3)).await;
                process::signal(&fd, libc::SIGKILL);
            }
            .in_current_span(),
        );
    }

    fn exited(&mut self, pid: u32, exit: ExitInfo) {
        let Some(vmm) = &self.vmm else { return };
        if vmm.pid != pid {
            return;
        }
        let ran_for_ms = now_ms().saturating_sub(vmm.since_ms);
        self.vmm = None;
        if let Some(p) = self.probe.take() {
            p.abort();
        }
        tracing::info!(pid, exit = %exit.describe(), "VMM exited");
        let mut tail = console::last_lines(&self.paths.console(), TAIL_LINES);
        let errors = console::last_lines(&self.paths.vmm_log(), 3);
        if !errors.is_empty() {
            tail = format!("{tail}\nVMM stderr:\n{errors}");
        }
        self.fact(Input::Exited {
            pid,
            exit,
            ran_for_ms,
            tail,
        });
    }

    fn cleanup(&mut self) {
        let ctx = self.ctx.clone();
        let spec = self.spec.clone();
        let paths = self.paths.clone();
        let tx = self.tx.clone();
        tokio::spawn(
            async move {
                let done =
                    tokio::task::spawn_blocking(move || ctx.host().teardown(&spec, &paths)).await;
                if let Err(e) = done {
                    tracing::error!(error = %e, "cleanup panicked");
                }
                let _ = tx.send(Msg::Fact(Input::CleanedUp));
            }
            .in_current_span(),
        );
    }

    fn trim_console(&self) {
        let limit = self.ctx.cfg().console_limit_bytes;
        if let Err(e) = blocking(|| console::trim(&self.paths.console(), limit)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "cannot trim the console log");
            }
        }
    }

    fn abort_restart(&mut self) {
        if let Some(r) = self.restart.take() {
            r.abort();
        }
    }

    fn abort_tasks(&mut self) {
        self.abort_restart();
        if let Some(p) = self.probe.take() {
            p.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One worker thread: a blocking call made through [`blocking`] lets
    /// another task (another instance's supervisor) run meanwhile; made
    /// directly, it would hold the only worker.
    #[test]
    fn blocking_work_does_not_stall_other_tasks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let t = ticks.clone();
            let other = tokio::spawn(async move {
                loop {
                    t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            tokio::task::yield_now().await;
            let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
            let slow_disk = tokio::spawn(async {
                blocking(|| std::thread::sleep(Duration::from_millis(300)));
            });
            // Wait for the "slow disk" from a thread outside the runtime's
            // worker, so only `other` competes for it.
            slow_disk.await.unwrap();
            let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
            other.abort();
            assert!(
                during >= 5,
                "the other task ran {during} times while one blocked"
            );
        });
    }
}
