//! The sans-IO lifecycle of one instance.
//!
//! [`Machine`] holds what the agent wants (the [`Intent`]) and what it
//! observes (the [`Phase`], the VMM's pid, its last exit). It takes
//! [`Input`]s — operator requests and facts about the VMM process — and
//! answers with [`Action`]s for the supervisor to carry out. It never
//! touches a process, a file or a clock: time comes in with the inputs, so
//! every transition is unit-tested below without a VMM.

use crate::spec::AttachedVolume;
use serde::{Deserialize, Serialize};

/// What the agent observes about an instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Defined, never started.
    #[default]
    Created,
    /// VMM spawned, control socket not answering yet.
    Starting,
    /// VMM answers on its control socket.
    Running,
    /// Graceful-then-hard stop under way.
    Stopping,
    /// VMM exited as asked, or the guest powered off.
    Stopped,
    /// Shutting down to start again.
    Rebooting,
    /// VMM died or could not start without being asked to.
    Failed,
    /// Being killed and cleaned up.
    Deleting,
    /// Gone.
    Deleted,
}

/// What the agent drives the instance towards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    /// Keep a VMM running.
    Running,
    /// Keep it stopped.
    #[default]
    Stopped,
    /// Remove it.
    Deleted,
}

/// When a VMM that ended by itself is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    Never,
    /// After a failure (not after a clean exit, i.e. a guest power-off or reset).
    OnFailure,
    /// After any exit the agent did not ask for.
    Always,
}

/// Exponential back-off between restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Delay before the first restart, in ms; doubled for each further one.
    pub base_ms: u64,
    /// Upper bound of the delay, in ms.
    pub max_ms: u64,
    /// A VMM that ran at least this long resets the restart count.
    pub stable_ms: u64,
}

impl Backoff {
    /// The delay before restart number `count` (0-based).
    pub fn delay_ms(&self, count: u32) -> u64 {
        self.base_ms
            .saturating_mul(1u64 << count.min(20))
            .min(self.max_ms)
    }
}

/// How a VMM process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// False when the status could not be learned (not our child).
    pub known: bool,
    /// Exit code of a normal exit.
    pub code: Option<i32>,
    /// Signal that killed it.
    pub signal: Option<i32>,
    /// Unix ms at which the exit was noticed.
    pub at_unix_ms: u64,
}

/// ferro-vmm's exit status when the guest reset itself
/// (`ferro_vmm::EXIT_GUEST_RESET`).
pub const VMM_EXIT_GUEST_RESET: i32 = 10;

impl ExitInfo {
    /// A clean exit: status 0 (guest power-off, or a stop request).
    pub fn success(&self) -> bool {
        self.known && self.code == Some(0)
    }

    /// The guest reset itself (a reboot from inside).
    pub fn guest_reset(&self) -> bool {
        self.known && self.code == Some(VMM_EXIT_GUEST_RESET)
    }

    /// "exit status 1", "killed by signal 9", or "exit status unknown …".
    pub fn describe(&self) -> String {
        match (self.known, self.code, self.signal) {
            (true, Some(c), _) => format!("exit status {c}"),
            (true, _, Some(s)) => format!("killed by signal {s}"),
            _ => "exit status unknown (the VMM was not a child of this agent process)".into(),
        }
    }
}

/// What happened or what is asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Operator: start, with these volumes attached (`None`: those of the
    /// last start). Only a stopped instance takes a different set.
    Start {
        /// The volumes, checked ([`crate::spec::check_volumes`]).
        volumes: Option<Vec<AttachedVolume>>,
    },
    /// Operator: graceful stop with this timeout, then hard.
    Stop { timeout_ms: u32 },
    /// Operator: graceful stop, then start again.
    Reboot { timeout_ms: u32 },
    /// Operator: stop hard and remove everything.
    Delete,
    /// The VMM process `pid` was spawned.
    Spawned { pid: u32 },
    /// Spawning failed.
    SpawnFailed { error: String },
    /// VMM `pid` answered on its control socket.
    Answered { pid: u32 },
    /// VMM `pid` did not answer on its control socket in time.
    ProbeTimedOut { pid: u32 },
    /// VMM `pid` ended after running `ran_for_ms`; `tail` holds its last
    /// console (and error) lines.
    Exited {
        pid: u32,
        exit: ExitInfo,
        ran_for_ms: u64,
        tail: String,
    },
    /// The scheduled restart is due.
    RestartDue,
    /// Everything the instance owned was removed.
    CleanedUp,
    /// The agent restarted and found this instance's VMM alive (its pid)
    /// or not (`None`). Carries the current time for pending restarts.
    Recovered { pid: Option<u32>, now_ms: u64 },
}

/// What the supervisor must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Spawn a VMM (then report `Spawned` or `SpawnFailed`).
    Spawn,
    /// Poll the control socket until it answers (`Answered`/`ProbeTimedOut`).
    Probe,
    /// Ask for a graceful shutdown; kill if it does not end in time.
    Shutdown { timeout_ms: u32 },
    /// Kill the VMM now.
    Kill,
    /// Report `RestartDue` after this delay.
    ScheduleRestart { delay_ms: u64 },
    /// Forget any scheduled restart.
    CancelRestart,
    /// Remove the cgroup, TAPs and files (then report `CleanedUp`).
    Cleanup,
}

/// One state change, for events and logs.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Phase before.
    pub from: Phase,
    /// Phase after.
    pub to: Phase,
    /// Why.
    pub reason: String,
    /// The VMM exit that caused it, if one did.
    pub exit: Option<ExitInfo>,
}

/// An operation that the current phase does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot {op} an instance that is {phase:?}")]
pub struct WrongState {
    /// The operation.
    pub op: &'static str,
    /// The phase it met.
    pub phase: Phase,
}

/// The persisted observed state of an instance (`state.json`).
///
/// Read with every field defaulted, so a file an older agent wrote (missing
/// fields added since) loads; fields a newer agent added are kept in
/// `extra` and written back unchanged, so a downgrade round trip loses
/// nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Observed {
    /// Format version of the agent that wrote the file.
    pub version: u32,
    /// Current phase.
    pub phase: Phase,
    /// Current intent.
    pub intent: Intent,
    /// Pid of the live VMM.
    pub pid: Option<u32>,
    /// The last VMM exit.
    pub last_exit: Option<ExitInfo>,
    /// Why the last change happened.
    pub reason: String,
    /// Restarts since the last explicit start.
    pub restart_count: u32,
    /// When a pending restart is due (unix ms), else 0.
    pub next_restart_unix_ms: u64,
    /// The guest powered itself off (the instance asked to stop); cleared
    /// by the next start.
    pub stopped_by_guest: bool,
    /// The [`order`](crate::order) stamp of the last change.
    pub seq: u64,
    /// The volumes the VMM is (or will next be) started with, set by a
    /// start.
    pub volumes: Vec<AttachedVolume>,
    /// Fields this version does not know, kept as they were.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The lifecycle state machine of one instance.
#[derive(Clone, Debug)]
pub struct Machine {
    obs: Observed,
    policy: RestartPolicy,
    backoff: Backoff,
    changes: Vec<Change>,
}

impl Machine {
    /// A freshly created instance.
    pub fn new(policy: RestartPolicy, backoff: Backoff) -> Self {
        let obs = Observed {
            phase: Phase::Created,
            intent: Intent::Stopped,
            pid: None,
            last_exit: None,
            reason: "created".into(),
            restart_count: 0,
            next_restart_unix_ms: 0,
            stopped_by_guest: false,
            seq: 0,
            volumes: Vec::new(),
            version: crate::persist::FORMAT_VERSION,
            extra: Default::default(),
        };
        Self::restore(obs, policy, backoff)
    }

    /// An instance whose observed state was persisted earlier.
    pub fn restore(obs: Observed, policy: RestartPolicy, backoff: Backoff) -> Self {
        Self {
            obs,
            policy,
            backoff,
            changes: Vec::new(),
        }
    }

    /// The observed state.
    pub fn observed(&self) -> &Observed {
        &self.obs
    }

    /// The changes since the last call, oldest first.
    /// Stamp the observed state with sequence number `seq`.
    pub fn stamp(&mut self, seq: u64) {
        self.obs.seq = seq;
    }

    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Apply one input at time `now_ms` (unix ms); return the actions.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Result<Vec<Action>, WrongState> {
        use Phase::*;
        let phase = self.obs.phase;
        let wrong = |op| Err(WrongState { op, phase });
        Ok(match input {
            Input::Start { volumes } => match phase {
                Created | Stopped | Failed => {
                    if let Some(v) = volumes {
                        self.obs.volumes = v;
                    }
                    self.obs.intent = Intent::Running;
                    self.obs.stopped_by_guest = false;
                    self.obs.restart_count = 0;
                    self.obs.next_restart_unix_ms = 0;
                    self.set(Starting, "start requested", None);
                    vec![Action::CancelRestart, Action::Spawn]
                }
                _ => return wrong("start"),
            },
            Input::Stop { timeout_ms } => match phase {
                Starting | Running => {
                    self.obs.intent = Intent::Stopped;
                    self.set(Stopping, "stop requested", None);
                    vec![Action::Shutdown { timeout_ms }]
                }
                Rebooting => {
                    self.obs.intent = Intent::Stopped;
                    self.set(Stopping, "stop requested", None);
                    vec![]
                }
                Stopping => vec![],
                Failed => {
                    self.obs.intent = Intent::Stopped;
                    self.obs.next_restart_unix_ms = 0;
                    self.set(Stopped, "stop requested", None);
                    vec![Action::CancelRestart]
                }
                _ => return wrong("stop"),
            },
            Input::Reboot { timeout_ms } => match phase {
                Starting | Running => {
                    self.set(Rebooting, "reboot requested", None);
                    vec![Action::Shutdown { timeout_ms }]
                }
                _ => return wrong("reboot"),
            },
            Input::Delete => match phase {
                Deleting | Deleted => vec![],
                _ => {
                    self.obs.intent = Intent::Deleted;
                    self.obs.next_restart_unix_ms = 0;
                    self.set(Deleting, "delete requested", None);
                    if self.obs.pid.is_some() {
                        vec![Action::CancelRestart, Action::Kill]
                    } else {
                        vec![Action::CancelRestart, Action::Cleanup]
                    }
                }
            },
            Input::Spawned { pid } => {
                self.obs.pid = Some(pid);
                vec![Action::Probe]
            }
            Input::SpawnFailed { error } => {
                self.obs.pid = None;
                let reason = format!("VMM could not be started: {error}");
                self.failure(reason, None, now_ms)
            }
            Input::Answered { pid } if self.is_current(pid) && phase == Starting => {
                self.set(Running, "VMM answers on its control socket", None);
                vec![]
            }
            Input::ProbeTimedOut { pid } if self.is_current(pid) && phase == Starting => {
                self.obs.reason = "VMM did not answer on its control socket in time".into();
                vec![Action::Kill]
            }
            Input::Exited {
                pid,
                exit,
                ran_for_ms,
                tail,
            } if self.is_current(pid) => self.exited(exit, ran_for_ms, tail, now_ms),
            Input::RestartDue if phase == Failed && self.obs.intent == Intent::Running => {
                self.obs.next_restart_unix_ms = 0;
                let reason = format!("restart {} by policy", self.obs.restart_count);
                self.set(Starting, &reason, None);
                vec![Action::Spawn]
            }
            Input::CleanedUp if phase == Deleting => {
                self.set(Deleted, "deleted", None);
                vec![]
            }
            Input::Recovered { pid, now_ms } => self.recovered(pid, now_ms),
            // Stale facts (an old pid, a cancelled timer) change nothing.
            _ => vec![],
        })
    }

    fn is_current(&self, pid: u32) -> bool {
        self.obs.pid == Some(pid)
    }

    fn set(&mut self, to: Phase, reason: &str, exit: Option<ExitInfo>) {
        let from = self.obs.phase;
        self.obs.phase = to;
        self.obs.reason = reason.to_string();
        self.changes.push(Change {
            from,
            to,
            reason: reason.to_string(),
            exit,
        });
    }

    fn exited(&mut self, exit: ExitInfo, ran_for_ms: u64, tail: String, now: u64) -> Vec<Action> {
        use Phase::*;
        self.obs.pid = None;
        self.obs.last_exit = Some(exit.clone());
        let what = exit.describe();
        match self.obs.phase {
            Deleting => vec![Action::Cleanup],
            Stopping => {
                self.set(Stopped, &format!("stopped ({what})"), Some(exit));
                vec![]
            }
            Rebooting => {
                self.set(Starting, &format!("rebooting ({what})"), Some(exit));
                vec![Action::Spawn]
            }
            Starting | Running => {
                if ran_for_ms >= self.backoff.stable_ms {
                    self.obs.restart_count = 0;
                }
                if exit.guest_reset() {
                    // EC2: a reboot from inside keeps the instance running.
                    self.set(
                        Starting,
                        "the guest rebooted itself; starting it again in place",
                        Some(exit),
                    );
                    return vec![Action::Spawn];
                }
                if exit.success() {
                    let reason = format!("the guest powered off ({what})");
                    if self.policy == RestartPolicy::Always {
                        self.obs.restart_count += 1;
                        self.set(
                            Starting,
                            &format!("{reason}; restarting by policy"),
                            Some(exit),
                        );
                        vec![Action::Spawn]
                    } else {
                        self.obs.intent = Intent::Stopped;
                        self.obs.stopped_by_guest = true;
                        self.set(Stopped, &reason, Some(exit));
                        vec![]
                    }
                } else {
                    let mut reason = format!("VMM exited unexpectedly: {what}");
                    if !tail.is_empty() {
                        reason.push_str("; last console lines:\n");
                        reason.push_str(&tail);
                    }
                    self.failure(reason, Some(exit), now)
                }
            }
            _ => vec![],
        }
    }

    /// Enter `Failed`, scheduling a restart when the policy says so.
    fn failure(&mut self, reason: String, exit: Option<ExitInfo>, now: u64) -> Vec<Action> {
        let restart = self.policy != RestartPolicy::Never;
        if restart {
            let delay_ms = self.backoff.delay_ms(self.obs.restart_count);
            self.obs.restart_count += 1;
            self.obs.next_restart_unix_ms = now + delay_ms;
            self.set(Phase::Failed, &reason, exit);
            vec![Action::ScheduleRestart { delay_ms }]
        } else {
            self.obs.intent = Intent::Stopped;
            self.set(Phase::Failed, &reason, exit);
            vec![]
        }
    }

    fn recovered(&mut self, live: Option<u32>, now_ms: u64) -> Vec<Action> {
        use Phase::*;
        if let Some(pid) = live {
            self.obs.pid = Some(pid);
            return match self.obs.phase {
                Starting => vec![Action::Probe],
                Running => vec![],
                Stopping | Rebooting => vec![Action::Shutdown { timeout_ms: 0 }],
                Deleting => vec![Action::Kill],
                // A VMM the state does not expect (the agent died right
                // after spawning it): adopt it rather than start another.
                _ => {
                    self.obs.intent = Intent::Running;
                    self.set(
                        Starting,
                        "adopted a running VMM after an agent restart",
                        None,
                    );
                    vec![Action::Probe]
                }
            };
        }
        if self.obs.pid.is_some() {
            let exit = ExitInfo {
                known: false,
                code: None,
                signal: None,
                at_unix_ms: now_ms,
            };
            let tail = "(the VMM ended while no agent was watching it)".to_string();
            return self.exited(exit, 0, tail, now_ms);
        }
        match self.obs.phase {
            Failed if self.obs.intent == Intent::Running => {
                let delay_ms = self.obs.next_restart_unix_ms.saturating_sub(now_ms);
                vec![Action::ScheduleRestart { delay_ms }]
            }
            // The agent died between deciding to spawn and recording the pid,
            // and no VMM of this instance exists: spawn it now.
            Starting | Rebooting => {
                self.set(Starting, "starting again after an agent restart", None);
                vec![Action::Spawn]
            }
            Stopping => {
                self.set(Stopped, "stopped while the agent was down", None);
                vec![]
            }
            Deleting => vec![Action::Cleanup],
            _ => vec![],
        }
    }

    /// Whether a VMM process should currently exist.
    pub fn wants_process(&self) -> bool {
        self.obs.pid.is_some()
    }

    /// The restart policy in force.
    pub fn policy(&self) -> RestartPolicy {
        self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff {
        base_ms: 100,
        max_ms: 1000,
        stable_ms: 10_000,
    };

    fn machine(policy: RestartPolicy) -> Machine {
        Machine::new(policy, BACKOFF)
    }

    fn exit_code(code: i32) -> ExitInfo {
        ExitInfo {
            known: true,
            code: Some(code),
            signal: None,
            at_unix_ms: 0,
        }
    }

    fn killed(sig: i32) -> ExitInfo {
        ExitInfo {
            known: true,
            code: None,
            signal: Some(sig),
            at_unix_ms: 0,
        }
    }

    fn exited(pid: u32, exit: ExitInfo) -> Input {
        Input::Exited {
            pid,
            exit,
            ran_for_ms: 50,
            tail: "ferro-guest: hello".into(),
        }
    }

    #[test]
    fn a_reset_from_inside_restarts_in_place_a_power_off_stops() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 1);
        let reset = exit_code(VMM_EXIT_GUEST_RESET);
        assert_eq!(m.handle(exited(1, reset), 0).unwrap(), vec![Action::Spawn]);
        assert_eq!(m.observed().phase, Phase::Starting);
        assert_eq!(m.observed().intent, Intent::Running);
        assert_eq!(m.observed().restart_count, 0, "a reboot is no failure");
        m.handle(Input::Spawned { pid: 2 }, 0).unwrap();
        m.handle(Input::Answered { pid: 2 }, 0).unwrap();
        assert!(m.handle(exited(2, exit_code(0)), 0).unwrap().is_empty());
        assert_eq!(m.observed().phase, Phase::Stopped);
        assert_eq!(m.observed().intent, Intent::Stopped);
        assert!(m.observed().stopped_by_guest);
        m.handle(Input::Start { volumes: None }, 0).unwrap();
        assert!(!m.observed().stopped_by_guest, "cleared by a start");
    }

    /// Start and bring to Running with VMM `pid`.
    fn running(m: &mut Machine, pid: u32) {
        assert_eq!(
            m.handle(Input::Start { volumes: None }, 0).unwrap(),
            vec![Action::CancelRestart, Action::Spawn]
        );
        assert_eq!(
            m.handle(Input::Spawned { pid }, 0).unwrap(),
            vec![Action::Probe]
        );
        m.handle(Input::Answered { pid }, 0).unwrap();
        assert_eq!(m.observed().phase, Phase::Running);
    }

    fn phases(changes: &[Change]) -> Vec<(Phase, Phase)> {
        changes.iter().map(|c| (c.from, c.to)).collect()
    }

    #[test]
    fn start_then_stop_round_trip() {
        let mut m = machine(RestartPolicy::Never);
        running(&mut m, 7);
        let a = m.handle(Input::Stop { timeout_ms: 500 }, 0).unwrap();
        assert_eq!(a, vec![Action::Shutdown { timeout_ms: 500 }]);
        m.handle(exited(7, exit_code(0)), 0).unwrap();
        assert_eq!(m.observed().phase, Phase::Stopped);
        assert_eq!(m.observed().intent, Intent::Stopped);
        assert_eq!(m.observed().pid, None);
        use Phase::*;
        assert_eq!(
            phases(&m.take_changes()),
            vec![
                (Created, Starting),
                (Starting, Running),
                (Running, Stopping),
                (Stopping, Stopped)
            ]
        );
    }

    #[test]
    fn wrong_state_operations_are_refused() {
        let mut m = machine(RestartPolicy::Never);
        let err = m.handle(Input::Stop { timeout_ms: 0 }, 0).unwrap_err();
        assert_eq!(err.phase, Phase::Created);
        assert!(m.handle(Input::Reboot { timeout_ms: 0 }, 0).is_err());
        running(&mut m, 1);
        assert!(m.handle(Input::Start { volumes: None }, 0).is_err());
        assert_eq!(m.observed().phase, Phase::Running);
    }

    #[test]
    fn a_start_sets_the_volumes_only_while_stopped() {
        let vol = |id: &str| AttachedVolume {
            volume_id: id.into(),
            device: "/dev/vdb".into(),
        };
        let mut m = machine(RestartPolicy::Never);
        let start = |v: Option<Vec<AttachedVolume>>| Input::Start { volumes: v };
        m.handle(start(Some(vec![vol("vol-a")])), 0).unwrap();
        assert_eq!(m.observed().volumes, vec![vol("vol-a")]);
        m.handle(Input::Spawned { pid: 1 }, 0).unwrap();
        m.handle(Input::Answered { pid: 1 }, 0).unwrap();
        // Running: a start (with any set) is refused and changes nothing.
        assert!(m.handle(start(Some(vec![])), 0).is_err());
        assert_eq!(m.observed().volumes, vec![vol("vol-a")]);
        m.handle(Input::Stop { timeout_ms: 0 }, 0).unwrap();
        m.handle(exited(1, exit_code(0)), 0).unwrap();
        // No set: the last one's.
        m.handle(start(None), 0).unwrap();
        assert_eq!(m.observed().volumes, vec![vol("vol-a")]);
        let mut m = machine(RestartPolicy::Never);
        m.handle(start(Some(vec![vol("vol-a")])), 0).unwrap();
        m.handle(Input::SpawnFailed { error: "x".into() }, 0)
            .unwrap();
        assert_eq!(m.observed().phase, Phase::Failed);
        // Failed: the next start takes the new set (here: none).
        m.handle(start(Some(vec![])), 0).unwrap();
        assert!(m.observed().volumes.is_empty());
    }

    #[test]
    fn reboot_respawns_after_exit() {
        let mut m = machine(RestartPolicy::Never);
        running(&mut m, 1);
        m.take_changes();
        m.handle(Input::Reboot { timeout_ms: 100 }, 0).unwrap();
        let a = m.handle(exited(1, exit_code(0)), 0).unwrap();
        assert_eq!(a, vec![Action::Spawn]);
        m.handle(Input::Spawned { pid: 2 }, 0).unwrap();
        m.handle(Input::Answered { pid: 2 }, 0).unwrap();
        use Phase::*;
        assert_eq!(
            phases(&m.take_changes()),
            vec![
                (Running, Rebooting),
                (Rebooting, Starting),
                (Starting, Running)
            ]
        );
    }

    #[test]
    fn crash_with_on_failure_restarts_with_backoff() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 1);
        let a = m.handle(exited(1, killed(9)), 1000).unwrap();
        assert_eq!(a, vec![Action::ScheduleRestart { delay_ms: 100 }]);
        let o = m.observed();
        assert_eq!(o.phase, Phase::Failed);
        assert_eq!(o.next_restart_unix_ms, 1100);
        assert!(o.reason.contains("killed by signal 9"), "{}", o.reason);
        assert!(o.reason.contains("ferro-guest: hello"));
        assert_eq!(m.handle(Input::RestartDue, 0).unwrap(), vec![Action::Spawn]);
        m.handle(Input::Spawned { pid: 2 }, 0).unwrap();
        m.handle(Input::Answered { pid: 2 }, 0).unwrap();
        // A second crash waits twice as long, the sixth is capped.
        let a = m.handle(exited(2, exit_code(1)), 0).unwrap();
        assert_eq!(a, vec![Action::ScheduleRestart { delay_ms: 200 }]);
        assert_eq!(BACKOFF.delay_ms(5), 1000);
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 1);
        m.handle(exited(1, killed(9)), 0).unwrap();
        m.handle(Input::RestartDue, 0).unwrap();
        m.handle(Input::Spawned { pid: 2 }, 0).unwrap();
        let input = Input::Exited {
            pid: 2,
            exit: killed(9),
            ran_for_ms: 20_000,
            tail: String::new(),
        };
        let a = m.handle(input, 0).unwrap();
        assert_eq!(a, vec![Action::ScheduleRestart { delay_ms: 100 }]);
    }

    #[test]
    fn crash_with_never_policy_stays_failed() {
        let mut m = machine(RestartPolicy::Never);
        running(&mut m, 1);
        assert!(m.handle(exited(1, exit_code(1)), 0).unwrap().is_empty());
        assert_eq!(m.observed().phase, Phase::Failed);
        assert_eq!(m.observed().intent, Intent::Stopped);
        assert!(m.handle(Input::RestartDue, 0).unwrap().is_empty());
        // A failed instance can be started again.
        assert!(m.handle(Input::Start { volumes: None }, 0).is_ok());
    }

    #[test]
    fn guest_power_off_stops_unless_always() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 1);
        m.handle(exited(1, exit_code(0)), 0).unwrap();
        assert_eq!(m.observed().phase, Phase::Stopped);

        let mut m = machine(RestartPolicy::Always);
        running(&mut m, 1);
        let a = m.handle(exited(1, exit_code(0)), 0).unwrap();
        assert_eq!(a, vec![Action::Spawn]);
        assert_eq!(m.observed().phase, Phase::Starting);
    }

    #[test]
    fn stale_facts_are_ignored() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 5);
        assert!(m.handle(exited(4, killed(9)), 0).unwrap().is_empty());
        assert!(m.handle(Input::Answered { pid: 4 }, 0).unwrap().is_empty());
        assert_eq!(m.observed().phase, Phase::Running);
    }

    #[test]
    fn stop_cancels_a_pending_restart() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 1);
        m.handle(exited(1, killed(9)), 0).unwrap();
        let a = m.handle(Input::Stop { timeout_ms: 0 }, 0).unwrap();
        assert_eq!(a, vec![Action::CancelRestart]);
        assert_eq!(m.observed().phase, Phase::Stopped);
        assert!(m.handle(Input::RestartDue, 0).unwrap().is_empty());
    }

    #[test]
    fn delete_kills_a_live_vmm_then_cleans_up() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 1);
        let a = m.handle(Input::Delete, 0).unwrap();
        assert_eq!(a, vec![Action::CancelRestart, Action::Kill]);
        let a = m.handle(exited(1, killed(9)), 0).unwrap();
        assert_eq!(a, vec![Action::Cleanup]);
        m.handle(Input::CleanedUp, 0).unwrap();
        assert_eq!(m.observed().phase, Phase::Deleted);
    }

    #[test]
    fn delete_without_vmm_cleans_up_at_once() {
        let mut m = machine(RestartPolicy::Never);
        let a = m.handle(Input::Delete, 0).unwrap();
        assert_eq!(a, vec![Action::CancelRestart, Action::Cleanup]);
    }

    #[test]
    fn spawn_failure_is_a_failure() {
        let mut m = machine(RestartPolicy::Never);
        m.handle(Input::Start { volumes: None }, 0).unwrap();
        m.handle(
            Input::SpawnFailed {
                error: "no such file".into(),
            },
            0,
        )
        .unwrap();
        assert_eq!(m.observed().phase, Phase::Failed);
        assert!(m.observed().reason.contains("no such file"));
    }

    #[test]
    fn probe_timeout_kills() {
        let mut m = machine(RestartPolicy::Never);
        m.handle(Input::Start { volumes: None }, 0).unwrap();
        m.handle(Input::Spawned { pid: 3 }, 0).unwrap();
        let a = m.handle(Input::ProbeTimedOut { pid: 3 }, 0).unwrap();
        assert_eq!(a, vec![Action::Kill]);
    }

    #[test]
    fn recovery_with_a_live_vmm_keeps_it() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 9);
        let obs = m.observed().clone();
        let mut r = Machine::restore(obs, RestartPolicy::OnFailure, BACKOFF);
        let a = r
            .handle(
                Input::Recovered {
                    pid: Some(9),
                    now_ms: 0,
                },
                0,
            )
            .unwrap();
        assert!(a.is_empty());
        assert_eq!(r.observed().phase, Phase::Running);
        assert_eq!(r.observed().pid, Some(9));
    }

    #[test]
    fn recovery_after_the_vmm_died_reports_unknown_status() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 9);
        let mut r = Machine::restore(m.observed().clone(), RestartPolicy::OnFailure, BACKOFF);
        let a = r
            .handle(
                Input::Recovered {
                    pid: None,
                    now_ms: 5,
                },
                5,
            )
            .unwrap();
        assert_eq!(a, vec![Action::ScheduleRestart { delay_ms: 100 }]);
        let o = r.observed();
        assert_eq!(o.phase, Phase::Failed);
        assert!(!o.last_exit.as_ref().unwrap().known);
        assert!(o.reason.contains("unknown"), "{}", o.reason);
    }

    #[test]
    fn recovery_resumes_a_pending_restart() {
        let mut m = machine(RestartPolicy::OnFailure);
        running(&mut m, 1);
        m.handle(exited(1, killed(9)), 1000).unwrap();
        let mut r = Machine::restore(m.observed().clone(), RestartPolicy::OnFailure, BACKOFF);
        let a = r
            .handle(
                Input::Recovered {
                    pid: None,
                    now_ms: 1040,
                },
                1040,
            )
            .unwrap();
        assert_eq!(a, vec![Action::ScheduleRestart { delay_ms: 60 }]);
    }
}
