//! Instances: launch (validation, placement, client tokens), intent
//! changes, reboots, capacity and purging.

use super::*;

impl ClusterState {
    pub(super) fn check_run(&self, spec: &RunSpec) -> Result<(InstanceType, Image), StateError> {
        if spec.count == 0 || spec.count > 100 {
            return invalid("count: must be 1 to 100");
        }
        let Some(ty) = self.instance_types.get(&spec.instance_type) else {
            return Err(E::NotFound(format!(
                "instance_type: no instance type {:?}",
                spec.instance_type
            )));
        };
        let Some(image) = self.find_image(&spec.image) else {
            return Err(E::NotFound(format!("image_id: no image {:?}", spec.image)));
        };
        if !spec.az.is_empty() && !self.azs.contains_key(&spec.az) {
            return Err(E::NotFound(format!(
                "availability_zone: no zone {:?}",
                spec.az
            )));
        }
        if !spec.key_name.is_empty() && !self.key_pairs.contains_key(&spec.key_name) {
            return Err(E::NotFound(format!(
                "key_name: no key pair {:?}",
                spec.key_name
            )));
        }
        if !spec.placement_group.is_empty() && !self.groups.contains_key(&spec.placement_group) {
            return Err(E::NotFound(format!(
                "placement_group: no placement group {:?}",
                spec.placement_group
            )));
        }
        check_user_data(&spec.user_data)?;
        let t = &spec.client_token;
        if t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid("client_token: at most 64 printable ASCII characters");
        }
        check_tags(&spec.tags)?;
        Ok((ty.clone(), image.clone()))
    }

    pub(super) fn run_instances(
        &mut self,
        spec: RunSpec,
        ids: Vec<String>,
        reservation_id: String,
        now_ms: u64,
        volume_ids: Vec<String>,
    ) -> Response {
        let request_sha256 = hex(&Sha256::digest(
            serde_json::to_vec(&spec).unwrap_or_default(),
        ));
        if let Some(rec) = self.tokens.get(&spec.client_token) {
            if rec.request_sha256 != request_sha256 {
                return invalid(format!(
                    "client_token: {:?} was used with different parameters \
                     (IdempotentParameterMismatch)",
                    spec.client_token
                ));
            }
            let instances = rec
                .instance_ids
                .iter()
                .filter_map(|id| self.instances.get(id).cloned())
                .collect();
            return Ok(Output::Launched {
                reservation_id: rec.reservation_id.clone(),
                instances,
            });
        }
        let (ty, image) = self.check_run(&spec)?;
        let count = spec.count as usize;
        if ids.len() < count || ids.iter().any(|i| self.instances.contains_key(i)) {
            return invalid("instance ids: too few or not fresh");
        }
        // A subnet pins the zone the scheduler places in.
        let subnet = self.launch_subnet(&spec)?.cloned();
        let mut placed_spec = spec.clone();
        if let Some(s) = &subnet {
            placed_spec.az = s.az.clone();
        }
        let placements = self.schedule(&placed_spec, &ty)?;
        // Every address is found before anything changes.
        let mut ipam = super::network::Ipam::default();
        let mut networks = Vec::with_capacity(count);
        for (id, host_id) in ids.iter().zip(&placements) {
            let candidates = match &subnet {
                Some(s) => vec![s.clone()],
                None => self.default_subnets(&self.hosts[host_id].az),
            };
            let mut got = None;
            let mut last_err = None;
            for s in &candidates {
                match self.allocate(id, s, &spec.private_ip, &spec.security_group_ids, &mut ipam) {
                    Ok(n) => {
                        got = Some(n);
                        break;
                    }
                    Err(e @ E::ResourceExhausted(_)) => last_err = Some(e),
                    Err(e) => return Err(e),
                }
            }
            if let (None, Some(e)) = (&got, last_err) {
                return Err(e);
            }
            networks.push(got);
        }
        let volumes = self.plan_launch_volumes(
            &spec,
            &image,
            &ids[..count],
            &placements,
            &volume_ids,
            now_ms,
        )?;
        let mut out = Vec::with_capacity(count);
        for ((id, host_id), network) in ids.into_iter().zip(placements).zip(networks) {
            let az = self.hosts[&host_id].az.clone();
            let inst = Instance {
                id: id.clone(),
                reservation_id: reservation_id.clone(),
                instance_type: ty.name.clone(),
                vcpus: ty.vcpus,
                memory_mib: ty.memory_mib,
                image_id: image.id.clone(),
                az,
                host_id,
                key_name: spec.key_name.clone(),
                placement_group: spec.placement_group.clone(),
                user_data: spec.user_data.clone(),
                tags: spec.tags.clone(),
                client_token: spec.client_token.clone(),
                desired: DesiredState::Running,
                observed: ObservedState::Absent,
                observed_reason: String::new(),
                observed_seq: 0,
                network,
                reboots_requested: 0,
                reboots_done: 0,
                holds_capacity: false,
                launched_at_ms: now_ms,
                shutdown_behavior: spec.shutdown_behavior,
                root_volume: volumes
                    .iter()
                    .find(|v| {
                        v.source_image.is_some()
                            && v.attachment.as_ref().is_some_and(|a| a.instance_id == id)
                    })
                    .map(|v| v.id.clone()),
            };
            tracing::info!(instance_id = %id, host_id = %inst.host_id, "placed");
            self.instances.insert(id.clone(), inst);
            self.sync_capacity(&id);
            out.push(self.instances[&id].clone());
        }
        self.add_launch_volumes(volumes);
        if !spec.client_token.is_empty() {
            self.tokens.insert(
                spec.client_token.clone(),
                TokenRecord {
                    request_sha256,
                    reservation_id: reservation_id.clone(),
                    instance_ids: out.iter().map(|i| i.id.clone()).collect(),
                },
            );
        }
        Ok(Output::Launched {
            reservation_id,
            instances: out,
        })
    }

    /// Pick hosts for `spec.count` instances of `ty`.
    pub(super) fn schedule(
        &self,
        spec: &RunSpec,
        ty: &InstanceType,
    ) -> Result<Vec<String>, StateError> {
        let group = self.groups.get(&spec.placement_group);
        let mut members_on: BTreeMap<&str, u32> = BTreeMap::new();
        let mut group_az = None;
        for m in group.iter().flat_map(|g| g.members.iter()) {
            if let Some(i) = self.instances.get(m) {
                *members_on.entry(i.host_id.as_str()).or_default() += 1;
                group_az.get_or_insert(i.az.as_str());
            }
        }
        let group_kind = group.map(|g| match g.strategy {
            GroupStrategy::Spread => scheduler::Group::Spread,
            GroupStrategy::Cluster => scheduler::Group::Cluster,
        });
        let mut az = (!spec.az.is_empty()).then_some(spec.az.as_str());
        if group_kind == Some(scheduler::Group::Cluster) && az.is_none() {
            az = group_az;
        }
        let hosts: Vec<&Host> = self.hosts.values().collect();
        let mut candidates: Vec<scheduler::Candidate> = hosts
            .iter()
            .enumerate()
            .map(|(index, h)| scheduler::Candidate {
                index,
                az: h.az.clone(),
                healthy: h.health == HostHealth::Healthy,
                vcpus_total: h.vcpus_total,
                memory_total_mib: h.memory_total_mib,
                free_vcpus: h.free_vcpus(),
                free_memory_mib: h.free_memory_mib(),
                group_members: members_on.get(h.id.as_str()).copied().unwrap_or(0),
            })
            .collect();
        let req = scheduler::Request {
            vcpus: ty.vcpus,
            memory_mib: ty.memory_mib,
            az,
            group: group_kind,
            strategy: if spec.spread {
                scheduler::Strategy::Spread
            } else {
                scheduler::Strategy::BinPack
            },
        };
        let placed = scheduler::place(&mut candidates, &req, spec.count as usize)
            .map_err(|e| E::ResourceExhausted(format!("insufficient capacity: {e}")))?;
        Ok(placed.into_iter().map(|i| hosts[i].id.clone()).collect())
    }

    /// Count or release the instance's capacity on its host and its
    /// placement group membership, to match whether it is final.
    pub(super) fn sync_capacity(&mut self, id: &str) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        let hold = !inst.is_final();
        if hold == inst.holds_capacity {
            return;
        }
        inst.holds_capacity = hold;
        if let Some(h) = self.hosts.get_mut(&inst.host_id) {
            if hold {
                h.vcpus_allocated += inst.vcpus;
                h.memory_allocated_mib += inst.memory_mib;
                h.instances += 1;
            } else {
                h.vcpus_allocated = h.vcpus_allocated.saturating_sub(inst.vcpus);
                h.memory_allocated_mib = h.memory_allocated_mib.saturating_sub(inst.memory_mib);
                h.instances = h.instances.saturating_sub(1);
            }
        }
        if let Some(g) = self.groups.get_mut(&inst.placement_group) {
            if hold {
                g.members.insert(inst.id.clone());
            } else {
                g.members.remove(&inst.id);
            }
        }
        if !hold {
            self.release_volumes(id);
        }
    }

    pub(super) fn check_ids(&self, ids: &[String]) -> Result<(), StateError> {
        if ids.is_empty() {
            return invalid("instance_ids: at least one id is required");
        }
        for id in ids {
            if !self.instances.contains_key(id) {
                return Err(E::NotFound(format!("instance_ids: no instance {id:?}")));
            }
        }
        Ok(())
    }

    pub(super) fn set_desired(&mut self, ids: &[String], desired: DesiredState) -> Response {
        self.check_ids(ids)?;
        for id in ids {
            let i = &self.instances[id];
            if i.desired == DesiredState::Terminated && desired != DesiredState::Terminated {
                return Err(E::FailedPrecondition(format!(
                    "instance_ids: {id} is terminated"
                )));
            }
        }
        // An instance booted from a volume, stopped on a host that went
        // away, starts on another host of its zone: its disks are volumes.
        // Every new host is found before anything changes.
        let mut moves = Vec::new();
        if desired == DesiredState::Running {
            for id in ids {
                if self.movable(&self.instances[id]) {
                    let to = self.replace(id, &moves)?;
                    moves.push((id.clone(), to));
                }
            }
        }
        for (id, to) in moves {
            self.move_instance(&id, to);
        }
        let mut changes = Vec::with_capacity(ids.len());
        for id in ids {
            let i = self.instances.get_mut(id).expect("checked above");
            let previous = i.public_state();
            i.desired = desired;
            tracing::info!(instance_id = %id, ?desired, "intent changed");
            self.sync_capacity(id);
            let current = self.instances[id].public_state();
            changes.push(StateChange {
                id: id.clone(),
                previous,
                current,
            });
        }
        Ok(Output::Changes(changes))
    }

    /// Whether `i` starts on another host: booted from a volume, stopped
    /// (wanted and seen so: its host never runs it again on its own), and
    /// its host is not healthy.
    fn movable(&self, i: &Instance) -> bool {
        i.root_volume.is_some()
            && i.desired == DesiredState::Stopped
            && i.observed == ObservedState::Stopped
            && self
                .hosts
                .get(&i.host_id)
                .is_none_or(|h| h.health != HostHealth::Healthy)
    }

    /// A healthy host of `id`'s zone with room for it, counting the
    /// `planned` moves before it.
    fn replace(&self, id: &str, planned: &[(String, String)]) -> Result<String, StateError> {
        let i = &self.instances[id];
        let Some(ty) = self.instance_types.get(&i.instance_type) else {
            return Err(E::FailedPrecondition(format!(
                "instance_ids: {id}'s type {} no longer exists",
                i.instance_type
            )));
        };
        let mut sim = self.clone_hosts_for(planned);
        let fits = |h: &Host| {
            h.az == i.az
                && h.health == HostHealth::Healthy
                && h.free_vcpus() >= ty.vcpus
                && h.free_memory_mib() >= ty.memory_mib
        };
        // The emptiest host that fits, ties by id.
        let best = sim
            .values_mut()
            .filter(|h| fits(h))
            .max_by(|a, b| {
                (a.free_memory_mib(), std::cmp::Reverse(&a.id))
                    .cmp(&(b.free_memory_mib(), std::cmp::Reverse(&b.id)))
            })
            .map(|h| h.id.clone());
        best.ok_or_else(|| {
            E::ResourceExhausted(format!(
                "InsufficientInstanceCapacity: {id}'s host {} is unreachable and no other \
                 host of {} has room for it",
                i.host_id, i.az
            ))
        })
    }

    /// The hosts with the `planned` moves' capacity taken.
    fn clone_hosts_for(&self, planned: &[(String, String)]) -> BTreeMap<String, Host> {
        let mut hosts = self.hosts.clone();
        for (id, to) in planned {
            let i = &self.instances[id];
            if let Some(h) = hosts.get_mut(to) {
                h.vcpus_allocated += i.vcpus;
                h.memory_allocated_mib += i.memory_mib;
            }
        }
        hosts
    }

    /// Bind instance `id` to host `to`: its capacity moves there, and it is
    /// absent there until created.
    fn move_instance(&mut self, id: &str, to: String) {
        let i = self.instances.get_mut(id).expect("a known instance");
        let from = std::mem::replace(&mut i.host_id, to.clone());
        i.observed = ObservedState::Absent;
        i.observed_seq = 0;
        i.observed_reason = format!("moved from unreachable host {from}");
        if let Some(n) = i.network.as_mut() {
            n.tap.clear();
        }
        let (vcpus, memory, held) = (i.vcpus, i.memory_mib, i.holds_capacity);
        tracing::info!(instance_id = %id, from = %from, to = %to, "stopped instance moved to another host of its zone");
        if !held {
            return;
        }
        if let Some(h) = self.hosts.get_mut(&from) {
            h.vcpus_allocated = h.vcpus_allocated.saturating_sub(vcpus);
            h.memory_allocated_mib = h.memory_allocated_mib.saturating_sub(memory);
            h.instances = h.instances.saturating_sub(1);
        }
        if let Some(h) = self.hosts.get_mut(&to) {
            h.vcpus_allocated += vcpus;
            h.memory_allocated_mib += memory;
            h.instances += 1;
        }
    }

    pub(super) fn reboot(&mut self, ids: &[String]) -> Response {
        self.check_ids(ids)?;
        for id in ids {
            if self.instances[id].desired != DesiredState::Running {
                return Err(E::FailedPrecondition(format!(
                    "instance_ids: {id} is not running"
                )));
            }
        }
        let mut changes = Vec::new();
        for id in ids {
            let i = self.instances.get_mut(id).expect("checked above");
            let previous = i.public_state();
            i.reboots_requested += 1;
            changes.push(StateChange {
                id: id.clone(),
                previous,
                current: i.public_state(),
            });
        }
        Ok(Output::Changes(changes))
    }

    pub(super) fn purge_instances(&mut self, ids: &[String]) {
        let mut gone = BTreeSet::new();
        for id in ids {
            if self.instances.get(id).is_some_and(Instance::is_final) {
                self.instances.remove(id);
                gone.insert(id.clone());
            }
        }
        if gone.is_empty() {
            return;
        }
        for g in self.groups.values_mut() {
            g.members.retain(|m| !gone.contains(m));
        }
        let instances = &self.instances;
        self.tokens
            .retain(|_, t| t.instance_ids.iter().any(|i| instances.contains_key(i)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use ferro_raft::StateMachine;

    #[test]
    fn run_places_and_counts_capacity() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 2, 1024);
        add_image(&mut s);
        let mut seq = 0;
        let out = run(&mut s, 2, &mut seq, spec()).unwrap();
        let Output::Launched { instances, .. } = out else {
            panic!()
        };
        assert_eq!(instances.len(), 2);
        assert_eq!(s.hosts["h1"].vcpus_allocated, 2);
        let e = run(&mut s, 1, &mut seq, spec()).unwrap_err();
        assert!(matches!(e, StateError::ResourceExhausted(_)), "{e}");
    }

    #[test]
    fn client_token_is_idempotent() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 8, 8192);
        add_image(&mut s);
        let mut seq = 0;
        let sp = RunSpec {
            client_token: "t1".into(),
            ..spec()
        };
        let a = run(&mut s, 2, &mut seq, sp.clone()).unwrap();
        let b = run(&mut s, 2, &mut seq, sp.clone()).unwrap();
        assert_eq!(a, b);
        assert_eq!(s.instances.len(), 2);
        let other = RunSpec {
            instance_type: "f1.nano".into(),
            ..sp
        };
        let e = run(&mut s, 2, &mut seq, other).unwrap_err();
        assert!(e.to_string().starts_with("client_token"), "{e}");
    }

    #[test]
    fn terminate_releases_capacity_once_deleted() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 1, 1024);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        // Observed running on the host.
        let obs = |state| Command::Heartbeat {
            host: HostReport {
                id: "h1".into(),
                az: "az-1".into(),
                address: "http://h1:7420".into(),
                vcpus_total: 1,
                memory_total_mib: 1024,
                cpu_model: String::new(),
                agent_version: String::new(),
                kvm_present: true,
                disk_total_gib: 0,
            },
            observed: state,
            complete: true,
            now_ms: 20,
            listed_seq: 0,
        };
        s.apply(obs(vec![Observation {
            instance_id: id.clone(),
            state: ObservedState::Running,
            reason: String::new(),
            stopped_by_guest: false,
            seq: 0,
            tap: String::new(),
        }]))
        .unwrap();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        assert_eq!(s.instances[&id].public_state(), PublicState::ShuttingDown);
        assert_eq!(s.hosts["h1"].vcpus_allocated, 1, "still on the host");
        s.apply(obs(vec![])).unwrap();
        assert_eq!(s.instances[&id].public_state(), PublicState::Terminated);
        assert_eq!(s.hosts["h1"].vcpus_allocated, 0);
        // A copy reported afterwards (a create answered late) does not
        // bring it back nor take room: the reconciler deletes it.
        s.apply(obs(vec![Observation {
            instance_id: id.clone(),
            state: ObservedState::Created,
            reason: String::new(),
            stopped_by_guest: false,
            seq: 0,
            tap: String::new(),
        }]))
        .unwrap();
        assert_eq!(s.instances[&id].public_state(), PublicState::Terminated);
        assert_eq!(s.hosts["h1"].vcpus_allocated, 0);
        let e = s.apply(Command::SetDesired {
            ids: vec![id],
            desired: DesiredState::Running,
        });
        assert!(matches!(e, Err(StateError::FailedPrecondition(_))));
    }

    #[test]
    fn a_guest_power_off_sets_the_intent_by_shutdown_behavior() {
        for (behavior, want) in [
            (ShutdownBehavior::Stop, DesiredState::Stopped),
            (ShutdownBehavior::Terminate, DesiredState::Terminated),
        ] {
            let mut s = bootstrapped();
            add_host(&mut s, "h1", "az-1", 1, 1024);
            add_image(&mut s);
            let mut seq = 0;
            let sp = RunSpec {
                shutdown_behavior: behavior,
                ..spec()
            };
            run(&mut s, 1, &mut seq, sp).unwrap();
            let id = s.instances.keys().next().unwrap().clone();
            let see = |s: &mut ClusterState, state, by_guest| {
                s.apply(Command::Observe {
                    host_id: "h1".into(),
                    observed: vec![Observation {
                        instance_id: id.clone(),
                        state,
                        reason: String::new(),
                        stopped_by_guest: by_guest,
                        seq: 0,
                        tap: String::new(),
                    }],
                })
                .unwrap();
            };
            see(&mut s, ObservedState::Running, false);
            // Stopped by the agent (not the guest): the intent stays.
            see(&mut s, ObservedState::Stopped, false);
            assert_eq!(s.instances[&id].desired, DesiredState::Running);
            see(&mut s, ObservedState::Running, false);
            see(&mut s, ObservedState::Stopped, true);
            assert_eq!(s.instances[&id].desired, want, "{behavior:?}");
            assert!(s.instances[&id].observed_reason.contains(behavior.as_str()));
        }
    }

    #[test]
    fn modify_instance_attribute_changes_what_a_power_off_does() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 1, 1024);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        assert_eq!(s.instances[&id].shutdown_behavior, ShutdownBehavior::Stop);
        s.apply(Command::SetShutdownBehavior {
            id: id.clone(),
            behavior: ShutdownBehavior::Terminate,
        })
        .unwrap();
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: id.clone(),
                state: ObservedState::Stopped,
                reason: String::new(),
                stopped_by_guest: true,
                seq: 0,
                tap: String::new(),
            }],
        })
        .unwrap();
        assert_eq!(s.instances[&id].desired, DesiredState::Terminated);
        // A terminated instance cannot change; an unknown one is NOT_FOUND.
        let e = s
            .apply(Command::SetShutdownBehavior {
                id: id.clone(),
                behavior: ShutdownBehavior::Stop,
            })
            .unwrap_err();
        assert!(matches!(e, E::FailedPrecondition(_)), "{e:?}");
        let e = s
            .apply(Command::SetShutdownBehavior {
                id: "i-nope".into(),
                behavior: ShutdownBehavior::Stop,
            })
            .unwrap_err();
        assert!(matches!(e, E::NotFound(_)), "{e:?}");
    }
}
