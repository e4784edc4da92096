//! ModifyInstanceAttribute: an instance's type (and with it its vCPUs,
//! memory and their room on its host), user data, shutdown behaviour and
//! groups, changed all or none by one command.

use super::*;

/// Check user data against [`MAX_USER_DATA`].
pub(super) fn check_user_data(data: &[u8]) -> Result<(), StateError> {
    if data.len() > MAX_USER_DATA {
        return invalid(format!(
            "user_data: {} bytes, at most {MAX_USER_DATA} (16 KiB)",
            data.len()
        ));
    }
    Ok(())
}

/// What [`ClusterState::check_change`] found, ready to write.
struct Checked {
    ty: Option<InstanceType>,
    groups: Option<Vec<String>>,
}

impl ClusterState {
    /// Apply `change` to instance `id`: everything is checked first, so a
    /// refusal changes nothing.
    pub(super) fn modify_instance(&mut self, id: &str, change: InstanceChange) -> Response {
        let checked = self.check_change(id, &change)?;
        let i = self.instances.get_mut(id).expect("checked above");
        if let Some(groups) = checked.groups {
            if let Some(n) = i.network.as_mut() {
                n.security_groups = groups;
            }
        }
        if let Some(b) = change.shutdown_behavior {
            i.shutdown_behavior = b;
        }
        if let Some(data) = change.user_data {
            tracing::info!(instance_id = %id, bytes = data.len(), "user data changed");
            i.user_data = data;
        }
        if let Some(ty) = checked.ty {
            let (old_vcpus, old_mem) = (i.vcpus, i.memory_mib);
            tracing::info!(instance_id = %id, from = %i.instance_type, to = %ty.name, "instance type changed");
            i.instance_type = ty.name;
            i.vcpus = ty.vcpus;
            i.memory_mib = ty.memory_mib;
            if i.holds_capacity {
                if let Some(h) = self.hosts.get_mut(&i.host_id) {
                    h.vcpus_allocated = h.vcpus_allocated.saturating_sub(old_vcpus) + ty.vcpus;
                    h.memory_allocated_mib =
                        h.memory_allocated_mib.saturating_sub(old_mem) + ty.memory_mib;
                }
            }
        }
        Ok(Output::Done)
    }

    /// Every rule of `change` for instance `id`, without changing anything.
    fn check_change(&self, id: &str, change: &InstanceChange) -> Result<Checked, StateError> {
        let Some(i) = self.instances.get(id) else {
            return Err(E::NotFound(format!("instance_id: no instance {id:?}")));
        };
        if i.desired == DesiredState::Terminated {
            return Err(E::FailedPrecondition(format!(
                "instance_id: {id} is terminated"
            )));
        }
        let resized = change.instance_type.is_some();
        if !resized
            && change.user_data.is_none()
            && change.shutdown_behavior.is_none()
            && change.security_groups.is_empty()
        {
            return invalid(
                "instance_id: give an attribute to change (instance_type, user_data, \
                 instance_initiated_shutdown_behavior or security_group_ids)",
            );
        }
        if let Some(data) = &change.user_data {
            check_user_data(data)?;
        }
        let ty =
            match &change.instance_type {
                None => None,
                Some(name) => Some(self.instance_types.get(name).cloned().ok_or_else(|| {
                    E::NotFound(format!("instance_type: no instance type {name:?}"))
                })?),
            };
        let groups = if change.security_groups.is_empty() {
            None
        } else {
            Some(self.check_instance_groups(id, &change.security_groups)?)
        };
        if resized || change.user_data.is_some() {
            let state = i.public_state();
            if state != PublicState::Stopped {
                let field = if resized {
                    "instance_type"
                } else {
                    "user_data"
                };
                return Err(E::FailedPrecondition(format!(
                    "{field}: {id} is {}, not stopped: its type and user data change only \
                     while it is stopped; stop the instance first (IncorrectInstanceState)",
                    format!("{state:?}").to_lowercase()
                )));
            }
        }
        if let Some(ty) = &ty {
            self.check_room(i, ty)?;
        }
        Ok(Checked { ty, groups })
    }

    /// Whether `i`'s host has room for `i` as type `ty` (its own vCPUs and
    /// memory, which a stopped instance holds, count as free).
    fn check_room(&self, i: &Instance, ty: &InstanceType) -> Result<(), StateError> {
        let Some(h) = self.hosts.get(&i.host_id) else {
            return Ok(());
        };
        let (own_vcpus, own_mem) = if i.holds_capacity {
            (i.vcpus, i.memory_mib)
        } else {
            (0, 0)
        };
        let free_vcpus = h.free_vcpus() + own_vcpus;
        let free_mem = h.free_memory_mib() + own_mem;
        if ty.vcpus > free_vcpus || ty.memory_mib > free_mem {
            return Err(E::ResourceExhausted(format!(
                "instance_type: InsufficientInstanceCapacity: {}'s host {} has room for \
                 {free_vcpus} vCPUs and {free_mem} MiB, {} needs {} vCPUs and {} MiB",
                i.id, h.id, ty.name, ty.vcpus, ty.memory_mib
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use ferro_raft::StateMachine;

    /// A cluster with host h1 (`vcpus`, `mem` MiB) and one f1.small
    /// instance on it (1 vCPU, 512 MiB), observed in `observed`.
    fn one(
        vcpus: u32,
        mem: u64,
        observed: ObservedState,
        desired: DesiredState,
    ) -> (ClusterState, String) {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", vcpus, mem);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired,
        })
        .unwrap();
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: id.clone(),
                state: observed,
                reason: String::new(),
                stopped_by_guest: false,
                seq: 0,
                tap: String::new(),
            }],
        })
        .unwrap();
        (s, id)
    }

    fn stopped(vcpus: u32, mem: u64) -> (ClusterState, String) {
        one(vcpus, mem, ObservedState::Stopped, DesiredState::Stopped)
    }

    fn modify(s: &mut ClusterState, id: &str, change: InstanceChange) -> Response {
        s.apply(Command::ModifyInstance {
            id: id.into(),
            change,
        })
    }

    fn resize(ty: &str) -> InstanceChange {
        InstanceChange {
            instance_type: Some(ty.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_stopped_instance_changes_type_and_user_data_and_its_host_allocation() {
        let (mut s, id) = stopped(4, 4096);
        assert_eq!(
            (
                s.hosts["h1"].vcpus_allocated,
                s.hosts["h1"].memory_allocated_mib
            ),
            (1, 512)
        );
        modify(
            &mut s,
            &id,
            InstanceChange {
                instance_type: Some("f1.large".into()),
                user_data: Some(b"#!/bin/sh\necho new\n".to_vec()),
                ..Default::default()
            },
        )
        .unwrap();
        let i = &s.instances[&id];
        assert_eq!(
            (i.instance_type.as_str(), i.vcpus, i.memory_mib),
            ("f1.large", 2, 2048)
        );
        assert_eq!(i.user_data, b"#!/bin/sh\necho new\n");
        let h = &s.hosts["h1"];
        assert_eq!((h.vcpus_allocated, h.memory_allocated_mib), (2, 2048));
        // Smaller again gives the room back; empty user data removes it.
        modify(&mut s, &id, resize("f1.nano")).unwrap();
        modify(
            &mut s,
            &id,
            InstanceChange {
                user_data: Some(vec![]),
                ..Default::default()
            },
        )
        .unwrap();
        let h = &s.hosts["h1"];
        assert_eq!((h.vcpus_allocated, h.memory_allocated_mib), (1, 128));
        assert!(s.instances[&id].user_data.is_empty());
        // Terminated and gone: the new size is what is released.
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: id.clone(),
                state: ObservedState::Absent,
                reason: String::new(),
                stopped_by_guest: false,
                seq: 0,
                tap: String::new(),
            }],
        })
        .unwrap();
        let h = &s.hosts["h1"];
        assert_eq!((h.vcpus_allocated, h.memory_allocated_mib), (0, 0));
    }

    #[test]
    fn only_a_stopped_instance_changes_type_or_user_data() {
        use DesiredState as D;
        use ObservedState as O;
        for (observed, desired) in [
            (O::Running, D::Running),
            (O::Running, D::Stopped),
            (O::Stopping, D::Stopped),
            (O::Stopped, D::Running),
            (O::Absent, D::Running),
            (O::Failed, D::Running),
        ] {
            let (mut s, id) = one(4, 4096, observed, desired);
            let before = s.clone();
            let e = modify(&mut s, &id, resize("f1.medium")).unwrap_err();
            assert!(
                matches!(e, E::FailedPrecondition(_)),
                "{observed:?}/{desired:?}: {e}"
            );
            assert!(e.to_string().starts_with("instance_type:"), "{e}");
            assert!(e.to_string().contains("IncorrectInstanceState"), "{e}");
            let e = modify(
                &mut s,
                &id,
                InstanceChange {
                    user_data: Some(b"x".to_vec()),
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(e.to_string().starts_with("user_data:"), "{e}");
            assert_eq!(s, before, "refused: nothing changed");
            // The other attributes still change while it runs.
            modify(
                &mut s,
                &id,
                InstanceChange {
                    shutdown_behavior: Some(ShutdownBehavior::Terminate),
                    ..Default::default()
                },
            )
            .unwrap();
        }
        // Stopped after a failure, or never created on its host: stopped.
        for observed in [O::Failed, O::Absent, O::Created] {
            let (mut s, id) = one(4, 4096, observed, D::Stopped);
            modify(&mut s, &id, resize("f1.medium")).unwrap();
        }
    }

    #[test]
    fn a_type_the_host_has_no_room_for_is_refused_and_changes_nothing() {
        // 2 vCPUs, 2048 MiB; a second instance (f1.small: 1, 512) fills half.
        let (mut s, id) = stopped(2, 2048);
        let mut seq = 10;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        assert_eq!(s.hosts["h1"].vcpus_allocated, 2);
        let before = s.clone();
        // f1.medium: 2 vCPUs, one more than the host has free.
        let e = modify(
            &mut s,
            &id,
            InstanceChange {
                instance_type: Some("f1.medium".into()),
                user_data: Some(b"new".to_vec()),
                shutdown_behavior: Some(ShutdownBehavior::Terminate),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, E::ResourceExhausted(_)), "{e:?}");
        assert!(e.to_string().starts_with("instance_type:"), "{e}");
        assert!(
            e.to_string().contains("InsufficientInstanceCapacity"),
            "{e}"
        );
        assert_eq!(s, before, "nothing changed, not even the user data");
        // Smaller always fits.
        modify(&mut s, &id, resize("f1.micro")).unwrap();
        assert_eq!(s.hosts["h1"].memory_allocated_mib, 512 + 256);

        // Memory alone: 4 vCPUs, 1024 MiB, the instance holds 512 of them.
        let (mut s, id) = stopped(4, 1024);
        let before = s.clone();
        // f1.large: 2048 MiB, 1024 are free counting its own.
        let e = modify(&mut s, &id, resize("f1.large")).unwrap_err();
        assert!(matches!(e, E::ResourceExhausted(_)), "{e:?}");
        assert_eq!(s, before);
        // f1.medium: exactly what is free with its own 512 MiB.
        modify(&mut s, &id, resize("f1.medium")).unwrap();
        let h = &s.hosts["h1"];
        assert_eq!((h.vcpus_allocated, h.memory_allocated_mib), (2, 1024));
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let (mut s, id) = stopped(4, 4096);
        let before = s.clone();
        let e = modify(&mut s, &id, resize("f9.huge")).unwrap_err();
        assert!(matches!(e, E::NotFound(_)), "{e:?}");
        assert!(e.to_string().starts_with("instance_type:"), "{e}");
        let e = modify(
            &mut s,
            &id,
            InstanceChange {
                user_data: Some(vec![0; MAX_USER_DATA + 1]),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, E::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().starts_with("user_data:"), "{e}");
        modify(
            &mut s,
            &id,
            InstanceChange {
                user_data: Some(vec![0; MAX_USER_DATA]),
                ..Default::default()
            },
        )
        .unwrap();
        let mut s = before.clone();
        // Groups for an instance without an interface (none here: no
        // VPC) with a good type: refused, neither changes.
        let e = modify(
            &mut s,
            &id,
            InstanceChange {
                instance_type: Some("f1.micro".into()),
                security_groups: vec!["sg-nope".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("no network interface"), "{e}");
        assert_eq!(s, before);
        let e = modify(&mut s, &id, InstanceChange::default()).unwrap_err();
        assert!(matches!(e, E::InvalidArgument(_)), "{e:?}");
        let e = modify(&mut s, "i-nope", resize("f1.micro")).unwrap_err();
        assert!(matches!(e, E::NotFound(_)), "{e:?}");
        assert!(e.to_string().starts_with("instance_id:"), "{e}");
    }

    #[test]
    fn a_terminated_instance_changes_nothing() {
        let (mut s, id) = stopped(4, 4096);
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        let before = s.clone();
        for change in [
            resize("f1.micro"),
            InstanceChange {
                user_data: Some(b"x".to_vec()),
                ..Default::default()
            },
            InstanceChange {
                shutdown_behavior: Some(ShutdownBehavior::Stop),
                ..Default::default()
            },
        ] {
            let e = modify(&mut s, &id, change).unwrap_err();
            assert!(matches!(e, E::FailedPrecondition(_)), "{e:?}");
            assert!(e.to_string().contains("terminated"), "{e}");
        }
        assert_eq!(s, before);
    }

    #[test]
    fn the_command_survives_the_log_round_trip() {
        let c = Command::ModifyInstance {
            id: "i-1".into(),
            change: InstanceChange {
                instance_type: Some("f1.micro".into()),
                user_data: Some(vec![]),
                ..Default::default()
            },
        };
        let json = serde_json::to_string(&c).unwrap();
        let back: Command = serde_json::from_str(&json).unwrap();
        let Command::ModifyInstance { change, .. } = back else {
            panic!("{json}")
        };
        // Present and empty stays present: it removes the user data.
        assert_eq!(change.user_data, Some(vec![]));
        assert_eq!(change.shutdown_behavior, None);
    }
}
