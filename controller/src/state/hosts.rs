//! Hosts: heartbeats (host facts and complete listings), the ordered
//! observations of instances, and unreachable hosts.

use super::*;

impl ClusterState {
    pub(super) fn heartbeat(
        &mut self,
        r: HostReport,
        observed: Vec<Observation>,
        complete: bool,
        now_ms: u64,
        listed_seq: u64,
    ) -> Response {
        check_name("host.host_id", &r.id)?;
        check_name("host.availability_zone", &r.az)?;
        if !self.azs.contains_key(&r.az) {
            tracing::info!(az = %r.az, "new availability zone from a heartbeat");
            self.azs
                .insert(r.az.clone(), AvailabilityZone { name: r.az.clone() });
        }
        let host = self.hosts.entry(r.id.clone()).or_insert_with(|| Host {
            id: r.id.clone(),
            az: r.az.clone(),
            address: String::new(),
            vcpus_total: 0,
            memory_total_mib: 0,
            vcpus_allocated: 0,
            memory_allocated_mib: 0,
            instances: 0,
            health: HostHealth::Healthy,
            last_seen_ms: 0,
            cpu_model: String::new(),
            agent_version: String::new(),
            kvm_present: false,
            tags: Tags::new(),
            underlay_ip: String::new(),
            blockd_addr: String::new(),
            disk_total_gib: 0,
            disk_allocated_gib: 0,
        });
        if host.health != HostHealth::Healthy {
            tracing::info!(host_id = %r.id, "host is back");
        }
        host.health = HostHealth::Healthy;
        host.last_seen_ms = now_ms;
        host.az = r.az;
        host.address = r.address;
        host.vcpus_total = r.vcpus_total;
        host.memory_total_mib = r.memory_total_mib;
        host.cpu_model = r.cpu_model;
        host.agent_version = r.agent_version;
        host.kvm_present = r.kvm_present;
        host.disk_total_gib = r.disk_total_gib;
        let seen = self.observe(&r.id, observed);
        if complete {
            // Not listed: absent, unless the host told us something newer
            // of it than this listing (a create answered after the list
            // was read).
            let missing: Vec<String> = self
                .instances
                .values()
                .filter(|i| i.host_id == r.id && !seen.contains(&i.id))
                .filter(|i| i.observed != ObservedState::Absent)
                .filter(|i| listed_seq == 0 || listed_seq > i.observed_seq)
                .map(|i| i.id.clone())
                .collect();
            for id in missing {
                let i = self.instances.get_mut(&id).expect("listed above");
                i.observed = ObservedState::Absent;
                i.observed_seq = i.observed_seq.max(listed_seq);
                self.sync_capacity(&id);
            }
        }
        Ok(Output::Done)
    }

    /// Apply observations of `host_id`'s instances; returns the ids seen.
    pub(super) fn observe(
        &mut self,
        host_id: &str,
        observed: Vec<Observation>,
    ) -> std::collections::BTreeSet<String> {
        let mut seen = std::collections::BTreeSet::new();
        for o in observed {
            let Some(i) = self.instances.get_mut(&o.instance_id) else {
                continue;
            };
            if i.host_id != host_id {
                continue;
            }
            seen.insert(o.instance_id.clone());
            if i.is_final() {
                // Terminated is final: a copy that shows up afterwards (a
                // create answered after the instance was found gone) is
                // deleted by the reconciler and holds no capacity.
                tracing::debug!(instance_id = %i.id, state = ?o.state, "observation of a terminated instance ignored");
                continue;
            }
            if o.seq != 0 && o.seq < i.observed_seq {
                // Older than what was applied (a heartbeat read before an
                // agent's answer that was applied first).
                tracing::debug!(instance_id = %i.id, seq = o.seq, applied = i.observed_seq, "stale observation ignored");
                continue;
            }
            i.observed_seq = i.observed_seq.max(o.seq);
            if let (false, Some(n)) = (o.tap.is_empty(), i.network.as_mut()) {
                n.tap = o.tap.clone();
            }
            if i.observed != o.state {
                tracing::info!(instance_id = %i.id, host_id, from = ?i.observed, to = ?o.state, "observed");
            }
            let was = i.observed;
            i.observed = o.state;
            let guest_stop_reason = o.stopped_by_guest && was == ObservedState::Stopped;
            if !guest_stop_reason {
                i.observed_reason = o.reason;
            }
            // The guest powered itself off: the instance asked to stop, so
            // its intent follows (EC2's instance-initiated shutdown), and
            // nothing starts it again. Only on the change into Stopped: a
            // later start by the operator is not undone by a report sent
            // before the host carried it out.
            if o.stopped_by_guest
                && o.state == ObservedState::Stopped
                && was != ObservedState::Stopped
                && i.desired == DesiredState::Running
            {
                i.desired = match i.shutdown_behavior {
                    ShutdownBehavior::Stop => DesiredState::Stopped,
                    ShutdownBehavior::Terminate => DesiredState::Terminated,
                };
                tracing::info!(instance_id = %i.id, desired = ?i.desired, "the guest powered off: instance-initiated shutdown");
                i.observed_reason = format!(
                    "the guest powered off (instance-initiated shutdown behavior: {})",
                    i.shutdown_behavior.as_str()
                );
            }
            self.sync_capacity(&o.instance_id);
        }
        seen
    }

    pub(super) fn mark_unreachable(&mut self, host_id: &str) {
        let Some(h) = self.hosts.get_mut(host_id) else {
            return;
        };
        h.health = HostHealth::Unreachable;
        tracing::warn!(host_id, "host unreachable");
        for i in self.instances.values_mut() {
            if i.host_id != host_id || i.is_final() {
                continue;
            }
            // Booted from a volume and stopped, as wanted: it stays stopped
            // (its host never starts it on its own), and a start moves it.
            let stays_stopped = i.root_volume.is_some()
                && i.desired == DesiredState::Stopped
                && i.observed == ObservedState::Stopped;
            if !stays_stopped {
                i.observed = ObservedState::Unknown;
            }
            i.observed_reason = "host unreachable".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use ferro_raft::StateMachine;

    #[test]
    fn an_older_report_never_overrides_a_newer_one() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 1, 1024);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        let o = |state, seq| Observation {
            instance_id: id.clone(),
            state,
            reason: String::new(),
            stopped_by_guest: false,
            seq,
            tap: String::new(),
        };
        let beat = |s: &mut ClusterState, observed: Vec<Observation>, listed_seq| {
            s.apply(Command::Heartbeat {
                host: HostReport {
                    id: "h1".into(),
                    az: "az-1".into(),
                    address: "http://h1:7420".into(),
                    vcpus_total: 1,
                    memory_total_mib: 1024,
                    cpu_model: "test".into(),
                    agent_version: "0".into(),
                    kvm_present: true,
                    disk_total_gib: 0,
                },
                observed,
                complete: true,
                now_ms: 1,
                listed_seq,
            })
            .unwrap();
        };
        // The agent answered the create (stamp 100); a heartbeat read
        // before it (50) does not list it: not absent.
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Running, 100)],
        })
        .unwrap();
        beat(&mut s, vec![], 50);
        assert_eq!(s.instances[&id].observed, ObservedState::Running);
        // A stale report of another state is ignored, a newer one applies.
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Stopped, 90)],
        })
        .unwrap();
        assert_eq!(s.instances[&id].observed, ObservedState::Running);
        beat(&mut s, vec![o(ObservedState::Running, 100)], 120);
        assert_eq!(s.instances[&id].observed_seq, 100);
        // Terminated: the capacity stays held until the host confirms.
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        // The agent is deleting it (stamp 150); a listing read before that
        // and before the create (a lagging heartbeat) does not list it.
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Deleting, 150)],
        })
        .unwrap();
        beat(&mut s, vec![], 140);
        assert!(
            s.instances[&id].holds_capacity,
            "a stale listing freed capacity"
        );
        assert_eq!(s.instances[&id].public_state(), PublicState::ShuttingDown);
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Absent, 300)],
        })
        .unwrap();
        assert!(!s.instances[&id].holds_capacity);
        assert_eq!(s.instances[&id].public_state(), PublicState::Terminated);
        // A heartbeat read before the delete still listing it: ignored.
        beat(&mut s, vec![o(ObservedState::Running, 200)], 250);
        assert_eq!(s.instances[&id].public_state(), PublicState::Terminated);
        // Unstamped reports (older agents) still apply.
        let mut s2 = bootstrapped();
        add_host(&mut s2, "h1", "az-1", 1, 1024);
        add_image(&mut s2);
        run(&mut s2, 1, &mut seq, spec()).unwrap();
        let id2 = s2.instances.keys().next().unwrap().clone();
        s2.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: id2.clone(),
                state: ObservedState::Running,
                reason: String::new(),
                stopped_by_guest: false,
                seq: 0,
                tap: String::new(),
            }],
        })
        .unwrap();
        assert_eq!(s2.instances[&id2].observed, ObservedState::Running);
    }

    #[test]
    fn unreachable_host_makes_instances_unknown_and_takes_nothing_new() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 8, 8192);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        s.apply(Command::MarkUnreachable {
            host_ids: vec!["h1".into()],
        })
        .unwrap();
        let i = s.instances.values().next().unwrap();
        assert_eq!(i.public_state(), PublicState::Unknown);
        assert_eq!(i.host_id, "h1");
        assert!(run(&mut s, 1, &mut seq, spec()).is_err());
        add_host(&mut s, "h1", "az-1", 8, 8192);
        assert_eq!(s.hosts["h1"].health, HostHealth::Healthy);
        let i = s.instances.values().next().unwrap();
        assert_eq!(i.observed, ObservedState::Absent);
        assert_eq!(i.host_id, "h1", "never moved");
    }
}
