//! The instance-state vocabulary, in one place: what a user wants
//! ([`DesiredState`]), what the host last reported ([`ObservedState`]), what
//! users see ([`PublicState`], derived from both by [`public_state`]), what
//! a power-off from inside does ([`ShutdownBehavior`]), and the
//! conversions from the agent's and to the public API's enums.
//!
//! Who decides what (docs/architecture.md, "Who decides an instance's
//! state"): the agent keeps a VMM alive by its restart policy and reports
//! what it sees; the controller owns intent and placement and drives the
//! agents towards it.

use ferro_proto::agent::v1 as agent_pb;
use ferro_proto::compute::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::state::StateError;

/// What a user wants an instance to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredState {
    /// Running.
    Running,
    /// Stopped (defined on its host, not running).
    Stopped,
    /// Deleted from its host.
    Terminated,
}

/// What happens when the guest powers itself off (EC2's
/// instance-initiated shutdown behaviour). A reboot from inside never
/// stops an instance: its host starts it again in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownBehavior {
    /// The instance becomes stopped (desired state `Stopped`).
    #[default]
    Stop,
    /// The instance is terminated.
    Terminate,
}

impl ShutdownBehavior {
    /// `"stop"` or `"terminate"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownBehavior::Stop => "stop",
            ShutdownBehavior::Terminate => "terminate",
        }
    }

    /// Parse `"stop"`, `"terminate"` or `""` (the default, stop).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "stop" => Some(ShutdownBehavior::Stop),
            "terminate" => Some(ShutdownBehavior::Terminate),
            _ => None,
        }
    }
}

/// What the instance's host last reported about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObservedState {
    /// Not on its host.
    Absent,
    /// Defined, never started.
    Created,
    /// VMM spawned.
    Starting,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped.
    Stopped,
    /// Being rebooted.
    Rebooting,
    /// VMM failed.
    Failed,
    /// Being deleted.
    Deleting,
    /// Its host is unreachable.
    Unknown,
}

/// The state users see, derived from desired and observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PublicState {
    /// Being created or started.
    Pending,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped.
    Stopped,
    /// Being terminated.
    ShuttingDown,
    /// Gone from its host. Final.
    Terminated,
    /// Host unreachable.
    Unknown,
    /// VMM failed.
    Failed,
    /// Rebooting.
    Rebooting,
}

/// The state users see for `desired` and `observed`; `reboot_pending`
/// when a requested reboot is not carried out yet.
pub fn public_state(
    desired: DesiredState,
    observed: ObservedState,
    reboot_pending: bool,
) -> PublicState {
    use DesiredState as D;
    use ObservedState as O;
    match (desired, observed) {
        (_, O::Unknown) => PublicState::Unknown,
        (D::Terminated, O::Absent) => PublicState::Terminated,
        (D::Terminated, _) => PublicState::ShuttingDown,
        (D::Stopped, O::Absent | O::Created | O::Stopped | O::Failed) => PublicState::Stopped,
        (D::Stopped, _) => PublicState::Stopping,
        (D::Running, O::Running) if reboot_pending => PublicState::Rebooting,
        (D::Running, O::Running) => PublicState::Running,
        (D::Running, O::Rebooting) => PublicState::Rebooting,
        (D::Running, O::Failed) => PublicState::Failed,
        (D::Running, O::Stopping) => PublicState::Stopping,
        (D::Running, _) => PublicState::Pending,
    }
}

/// The agent's instance state as the controller models it.
pub fn observed_from_agent(s: i32) -> ObservedState {
    use agent_pb::InstanceState as S;
    match S::try_from(s).unwrap_or(S::Unspecified) {
        S::Created => ObservedState::Created,
        S::Starting => ObservedState::Starting,
        S::Running => ObservedState::Running,
        S::Stopping => ObservedState::Stopping,
        S::Stopped => ObservedState::Stopped,
        S::Rebooting => ObservedState::Rebooting,
        S::Failed => ObservedState::Failed,
        S::Deleting => ObservedState::Deleting,
        S::Deleted => ObservedState::Absent,
        S::Unspecified => ObservedState::Unknown,
    }
}

/// Public state to the wire.
pub fn state_out(s: PublicState) -> pb::InstanceState {
    use pb::InstanceState as P;
    match s {
        PublicState::Pending => P::Pending,
        PublicState::Running => P::Running,
        PublicState::Stopping => P::Stopping,
        PublicState::Stopped => P::Stopped,
        PublicState::ShuttingDown => P::ShuttingDown,
        PublicState::Terminated => P::Terminated,
        PublicState::Unknown => P::Unknown,
        PublicState::Failed => P::Failed,
        PublicState::Rebooting => P::Rebooting,
    }
}

/// Public state from the wire (a state filter).
pub fn state_in(s: i32) -> Result<PublicState, StateError> {
    use pb::InstanceState as P;
    Ok(match P::try_from(s) {
        Ok(P::Pending) => PublicState::Pending,
        Ok(P::Running) => PublicState::Running,
        Ok(P::Stopping) => PublicState::Stopping,
        Ok(P::Stopped) => PublicState::Stopped,
        Ok(P::ShuttingDown) => PublicState::ShuttingDown,
        Ok(P::Terminated) => PublicState::Terminated,
        Ok(P::Unknown) => PublicState::Unknown,
        Ok(P::Failed) => PublicState::Failed,
        Ok(P::Rebooting) => PublicState::Rebooting,
        _ => {
            return Err(StateError::InvalidArgument(format!(
                "states: {s} is not an instance state"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_the_wire_and_every_agent_state_maps() {
        use PublicState as P;
        for s in [
            P::Pending,
            P::Running,
            P::Stopping,
            P::Stopped,
            P::ShuttingDown,
            P::Terminated,
            P::Unknown,
            P::Failed,
            P::Rebooting,
        ] {
            assert_eq!(state_in(state_out(s) as i32).unwrap(), s);
        }
        assert!(state_in(999).is_err());
        assert_eq!(observed_from_agent(999), ObservedState::Unknown);
        assert_eq!(
            observed_from_agent(agent_pb::InstanceState::Deleted as i32),
            ObservedState::Absent
        );
    }
}
