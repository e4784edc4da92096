//! Block volumes: creation (validation, client tokens, replica placement
//! by free disk space), attachments to stopped instances, deletion, and
//! what terminating an instance does to its volumes.
//!
//! A new volume is `creating` until the ferro-blockd of every replica host
//! reports holding it at its epoch ([`ClusterState::report_replicas`]),
//! then `available`. DeleteVolume makes it `deleting`: its replica hosts
//! are told to remove their replicas, and the record (with the disk space
//! it takes on those hosts) goes once none reports holding it. Attaching
//! to a running instance (hot-attach) is refused.

use super::network::dependency;
use super::query::{any_of, check_exist, tags_match, Page, Paging, DEFAULT_PAGE};
use super::*;

/// The largest volume, GiB (EC2's 16 TiB).
pub const MAX_VOLUME_GIB: u64 = 16_384;

/// A placement candidate: one host as the replica placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskCandidate<'a> {
    /// Host id.
    pub id: &'a str,
    /// Zone.
    pub az: &'a str,
    /// Heartbeating.
    pub healthy: bool,
    /// Disk space offered, GiB (0: not reported).
    pub total_gib: u64,
    /// Disk space not yet given to replicas, GiB.
    pub free_gib: u64,
}

/// Choose `n` distinct hosts of zone `az` for a volume of `size_gib`:
/// healthy, reporting disk space, with the most free space first (ties by
/// id). Pure, so every replica chooses the same hosts.
pub fn place_replicas(
    hosts: &[DiskCandidate<'_>],
    az: &str,
    size_gib: u64,
    n: usize,
) -> Result<Vec<String>, StateError> {
    let mut fit: Vec<&DiskCandidate> = hosts
        .iter()
        .filter(|h| h.az == az && h.healthy && h.total_gib > 0)
        .collect();
    if fit.len() < n {
        return Err(E::ResourceExhausted(format!(
            "no host in AZ {az} reports disk space for {n} replicas \
             ({} healthy hosts there report any)",
            fit.len()
        )));
    }
    fit.retain(|h| h.free_gib >= size_gib);
    if fit.len() < n {
        return Err(E::ResourceExhausted(format!(
            "size_gib: {size_gib} GiB does not fit on {n} distinct hosts of AZ {az} \
             ({} have that much free)",
            fit.len()
        )));
    }
    fit.sort_by(|a, b| b.free_gib.cmp(&a.free_gib).then(a.id.cmp(b.id)));
    Ok(fit.iter().take(n).map(|h| h.id.to_string()).collect())
}

/// The device name of an instance's root volume.
pub const ROOT_DEVICE: &str = "/dev/vda";

/// Check a device name: `/dev/vdb` to `/dev/vdz` (`vda` is the root disk).
pub fn check_device(device: &str) -> Result<(), StateError> {
    match device.strip_prefix("/dev/vd").map(str::as_bytes) {
        Some([c]) if (b'b'..=b'z').contains(c) => Ok(()),
        _ => invalid(format!(
            "device: {device:?} is not one of /dev/vdb to /dev/vdz"
        )),
    }
}

/// What DescribeVolumes asks for.
#[derive(Clone, Debug, Default)]
pub struct VolumeFilter {
    /// Only these (all must exist).
    pub ids: Vec<String>,
    /// Only in these zones.
    pub azs: Vec<String>,
    /// Only attached to these instances.
    pub instances: Vec<String>,
    /// Only in these states.
    pub states: Vec<String>,
    /// Every tag (key, and value when not empty) must match.
    pub tags: Vec<(String, String)>,
    /// Page size (0: 100; at most 1000).
    pub max_results: u32,
    /// The last id of the previous page.
    pub next_token: String,
}

/// DescribeVolumes over a state: filter, order by id, page.
pub fn describe_volumes(s: &ClusterState, f: &VolumeFilter) -> Result<Page<Volume>, StateError> {
    check_exist(&s.volumes, &f.ids, "volume_ids", "volume")?;
    let states = f
        .states
        .iter()
        .map(|st| {
            VolumeState::parse(st)
                .ok_or_else(|| E::InvalidArgument(format!("states: no volume state {st:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let paging = Paging::new(f.max_results, &f.next_token, DEFAULT_PAGE)?;
    let attached_to = |v: &Volume| {
        f.instances.is_empty()
            || v.attachment
                .as_ref()
                .is_some_and(|a| f.instances.contains(&a.instance_id))
    };
    let matching = paging.rest(&s.volumes).filter(|v| {
        any_of(&f.ids, &v.id)
            && any_of(&f.azs, &v.az)
            && (states.is_empty() || states.contains(&v.state))
            && attached_to(v)
            && tags_match(&v.tags, &f.tags)
    });
    let (page, next) = paging.page(matching, |v| v.id.as_str());
    Ok((page.into_iter().cloned().collect(), next))
}

/// The attachments of instance `id` (volume id, attachment), by device.
pub fn attachments_of(s: &ClusterState, id: &str) -> Vec<(String, VolumeAttachment)> {
    let mut v: Vec<(String, VolumeAttachment)> = s
        .volumes
        .values()
        .filter_map(|v| {
            let a = v.attachment.as_ref()?;
            (a.instance_id == id).then(|| (v.id.clone(), a.clone()))
        })
        .collect();
    v.sort_by(|a, b| a.1.device.cmp(&b.1.device));
    v
}

/// Whether host `host_id` reporting `held` holds its replica of `v`: in
/// sync at `v`'s epoch, or at any while `v` is being deleted. (A replica
/// out of sync takes the epoch too, to be resynced, but is not held until
/// it is back in sync.)
fn holds(v: &Volume, host_id: &str, held: &BTreeMap<String, u64>) -> bool {
    match held.get(&v.id) {
        Some(_) if v.state == VolumeState::Deleting => true,
        Some(&epoch) => epoch >= v.epoch && !v.out_of_sync.contains(host_id),
        None => false,
    }
}

/// Records the incarnation `host_id` reports for `v`'s replica, if any;
/// true if it is new or changed. A change on a volume past `creating`
/// means the replica file was made again, blank: an in-sync replica then
/// leaves the set, and the epoch goes up (for one already out of sync
/// too: a primary that dropped it itself would otherwise resync it from
/// its dirty map, as if its old contents were there), so no primary
/// writes to it, reads from it or resyncs it but a new one, by checksum.
fn note_incarnation(v: &mut Volume, host_id: &str, incarnations: &BTreeMap<String, u64>) -> bool {
    v.incarnations.retain(|h, _| v.replicas.contains(h));
    let Some(&now) = incarnations.get(&v.id) else {
        return false;
    };
    let before = v.incarnations.insert(host_id.to_string(), now);
    let remade = before.is_some_and(|b| b != now);
    let counts = !matches!(v.state, VolumeState::Creating | VolumeState::Deleting);
    if remade && counts {
        v.out_of_sync.insert(host_id.to_string());
        v.held.remove(host_id);
        v.epoch += 1;
        v.clean = false;
        tracing::warn!(volume_id = %v.id, host_id, epoch = v.epoch,
            "replica file made again (blank): out of sync until resynced");
        if v.in_sync().next().is_none() {
            tracing::error!(volume_id = %v.id,
                "no replica of the volume is in sync any more: its data is on no host");
        }
    }
    before != Some(now)
}

fn running(i: &Instance) -> bool {
    i.desired == DesiredState::Running
}

impl ClusterState {
    fn check_volume(&self, spec: &VolumeSpec) -> Result<VolumeType, StateError> {
        if spec.size_gib == 0 || spec.size_gib > MAX_VOLUME_GIB {
            return invalid(format!("size_gib: must be 1 to {MAX_VOLUME_GIB}"));
        }
        if !self.azs.contains_key(&spec.az) {
            return Err(E::NotFound(format!(
                "availability_zone: no zone {:?}",
                spec.az
            )));
        }
        let ty = match spec.volume_type.as_str() {
            "" => VolumeType::Standard,
            t => VolumeType::parse(t).ok_or_else(|| {
                E::InvalidArgument(format!(
                    "volume_type: {t:?} is not \"single\", \"standard\" or \"durable\""
                ))
            })?,
        };
        let t = &spec.client_token;
        if t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid("client_token: at most 64 printable ASCII characters");
        }
        check_tags(&spec.tags)?;
        Ok(ty)
    }

    pub(super) fn create_volume(&mut self, spec: VolumeSpec, id: String, now_ms: u64) -> Response {
        let request_sha256 = sha256_hex(&serde_json::to_vec(&spec).unwrap_or_default());
        if let Some(t) = self.volume_tokens.get(&spec.client_token) {
            if t.request_sha256 != request_sha256 {
                return invalid(format!(
                    "client_token: {:?} was used with different parameters \
                     (IdempotentParameterMismatch)",
                    spec.client_token
                ));
            }
            return match self.volumes.get(&t.volume_id) {
                Some(v) => Ok(Output::Volume(v.clone())),
                None => Err(E::NotFound(format!(
                    "client_token: its volume {} is deleted",
                    t.volume_id
                ))),
            };
        }
        let ty = self.check_volume(&spec)?;
        if self.volumes.contains_key(&id) {
            return Err(E::AlreadyExists(format!("volume_id: {id} exists")));
        }
        let candidates: Vec<DiskCandidate> = self
            .hosts
            .values()
            .map(|h| DiskCandidate {
                id: &h.id,
                az: &h.az,
                healthy: h.health == HostHealth::Healthy,
                total_gib: h.disk_total_gib,
                free_gib: h.free_disk_gib(),
            })
            .collect();
        let replicas = place_replicas(&candidates, &spec.az, spec.size_gib, ty.replicas())?;
        for r in &replicas {
            let h = self.hosts.get_mut(r).expect("placed on a known host");
            h.disk_allocated_gib += spec.size_gib;
        }
        let v = Volume {
            id: id.clone(),
            size_gib: spec.size_gib,
            az: spec.az.clone(),
            volume_type: ty,
            tags: spec.tags,
            created_at_ms: now_ms,
            // Until every replica host's blockd reports holding it.
            state: VolumeState::Creating,
            attachment: None,
            replicas,
            epoch: 1,
            client_token: spec.client_token.clone(),
            held: BTreeSet::new(),
            out_of_sync: BTreeSet::new(),
            source_image: None,
            session: 0,
            session_host: String::new(),
            clean: false,
            incarnations: BTreeMap::new(),
        };
        tracing::info!(volume_id = %id, replicas = ?v.replicas, "volume placed");
        self.volumes.insert(id.clone(), v.clone());
        if !spec.client_token.is_empty() {
            self.volume_tokens.insert(
                spec.client_token,
                VolumeToken {
                    request_sha256,
                    volume_id: id,
                },
            );
        }
        Ok(Output::Volume(v))
    }

    /// The volumes of a launch (for each of `instances`, placed on
    /// `hosts`: its root volume made from `image` when `spec.root_volume`
    /// asks for one, then `spec.block_devices` blank), checked and placed,
    /// each attached to its instance; nothing changes here, so a launch
    /// that fails later leaves nothing behind. Replicas go to hosts of each
    /// instance's zone, counting the space the volumes placed before take.
    pub(super) fn plan_launch_volumes(
        &self,
        spec: &RunSpec,
        image: &Image,
        instances: &[String],
        hosts: &[String],
        volume_ids: &[String],
        now_ms: u64,
    ) -> Result<Vec<Volume>, StateError> {
        for (k, d) in spec.block_devices.iter().enumerate() {
            check_device(&d.device)
                .map_err(|e| E::InvalidArgument(format!("block_device_mappings[{k}]: {e}")))?;
            if spec.block_devices[..k].iter().any(|o| o.device == d.device) {
                return invalid(format!(
                    "block_device_mappings[{k}]: device {} is given twice",
                    d.device
                ));
            }
        }
        // (the field errors name, the spec, the image it is made from)
        let mut devices: Vec<(String, BlockDeviceSpec, Option<String>)> = Vec::new();
        if let Some(r) = &spec.root_volume {
            if image.rootdisk_path.is_empty() {
                return invalid(format!(
                    "root_volume: image {} has no root disk to make a volume from",
                    image.id
                ));
            }
            let root = BlockDeviceSpec {
                device: ROOT_DEVICE.into(),
                ..r.clone()
            };
            devices.push(("root_volume".into(), root, Some(image.id.clone())));
        }
        for (k, d) in spec.block_devices.iter().enumerate() {
            devices.push((format!("block_device_mappings[{k}]"), d.clone(), None));
        }
        let need = instances.len() * devices.len();
        if volume_ids.len() < need
            || volume_ids[..need]
                .iter()
                .any(|v| !ferro_proto::is_volume_id(v) || self.volumes.contains_key(v))
        {
            return invalid("volume ids: too few or not fresh");
        }
        let mut planned: BTreeMap<&str, u64> = BTreeMap::new();
        let mut out = Vec::with_capacity(need);
        let ids = volume_ids[..need].chunks(devices.len().max(1));
        for ((instance_id, host_id), vol_ids) in instances.iter().zip(hosts).zip(ids) {
            let az = &self.hosts[host_id].az;
            for ((field, d, source_image), id) in devices.iter().zip(vol_ids) {
                let vspec = VolumeSpec {
                    size_gib: d.size_gib,
                    az: az.clone(),
                    volume_type: d.volume_type.clone(),
                    tags: Tags::default(),
                    client_token: String::new(),
                };
                let ty = self
                    .check_volume(&vspec)
                    .map_err(|e| E::InvalidArgument(format!("{field}: {e}")))?;
                let candidates: Vec<DiskCandidate> = self
                    .hosts
                    .values()
                    .map(|h| DiskCandidate {
                        id: &h.id,
                        az: &h.az,
                        healthy: h.health == HostHealth::Healthy,
                        total_gib: h.disk_total_gib,
                        free_gib: h
                            .free_disk_gib()
                            .saturating_sub(planned.get(h.id.as_str()).copied().unwrap_or(0)),
                    })
                    .collect();
                let replicas = place_replicas(&candidates, az, d.size_gib, ty.replicas()).map_err(
                    |e| match e {
                        E::ResourceExhausted(m) => E::ResourceExhausted(format!("{field}: {m}")),
                        e => e,
                    },
                )?;
                for r in &replicas {
                    let h = self
                        .hosts
                        .get_key_value(r)
                        .expect("placed on a known host")
                        .0;
                    *planned.entry(h.as_str()).or_default() += d.size_gib;
                }
                out.push(Volume {
                    id: id.clone(),
                    size_gib: d.size_gib,
                    az: az.clone(),
                    volume_type: ty,
                    tags: Tags::default(),
                    created_at_ms: now_ms,
                    state: VolumeState::Creating,
                    attachment: Some(VolumeAttachment {
                        instance_id: instance_id.clone(),
                        device: d.device.clone(),
                        state: AttachmentState::Attached,
                        delete_on_termination: d.delete_on_termination,
                    }),
                    replicas,
                    epoch: 1,
                    client_token: String::new(),
                    held: BTreeSet::new(),
                    out_of_sync: BTreeSet::new(),
                    source_image: source_image.clone(),
                    session: 0,
                    session_host: String::new(),
                    clean: false,
                    incarnations: BTreeMap::new(),
                });
            }
        }
        Ok(out)
    }

    /// Record volumes [`Self::plan_launch_volumes`] planned and take their
    /// space on their replica hosts.
    pub(super) fn add_launch_volumes(&mut self, volumes: Vec<Volume>) {
        for v in volumes {
            for r in &v.replicas {
                if let Some(h) = self.hosts.get_mut(r) {
                    h.disk_allocated_gib += v.size_gib;
                }
            }
            tracing::info!(volume_id = %v.id, replicas = ?v.replicas, instance_id = ?v.attachment.as_ref().map(|a| &a.instance_id), "launch volume placed");
            self.volumes.insert(v.id.clone(), v);
        }
    }

    fn volume(&self, id: &str) -> Result<&Volume, StateError> {
        self.volumes
            .get(id)
            .ok_or_else(|| E::NotFound(format!("volume_id: no volume {id:?}")))
    }

    /// Remove volume `id` and free its space on its replica hosts.
    fn remove_volume(&mut self, id: &str) {
        let Some(v) = self.volumes.remove(id) else {
            return;
        };
        for r in &v.replicas {
            if let Some(h) = self.hosts.get_mut(r) {
                h.disk_allocated_gib = h.disk_allocated_gib.saturating_sub(v.size_gib);
            }
        }
        self.volume_tokens.retain(|_, t| t.volume_id != id);
        tracing::info!(volume_id = %id, "volume deleted");
    }

    pub(super) fn delete_volume(&mut self, id: &str) -> Response {
        let v = self.volume(id)?;
        if let Some(a) = &v.attachment {
            return Err(dependency(format!(
                "volume {id} is attached to {} (VolumeInUse): detach it first",
                a.instance_id
            )));
        }
        self.start_deleting(id);
        Ok(Output::Done)
    }

    /// Volume `id` is to go: `deleting` until no replica host holds it
    /// (gone at once when none does).
    fn start_deleting(&mut self, id: &str) {
        let Some(v) = self.volumes.get_mut(id) else {
            return;
        };
        v.attachment = None;
        if v.held.is_empty() {
            self.remove_volume(id);
        } else {
            v.state = VolumeState::Deleting;
            tracing::info!(volume_id = %id, held = ?v.held, "volume deleting");
        }
    }

    /// Host `host_id`'s blockd holds `held` (volume → the epoch it has
    /// caught up to), and nothing else; `incarnations` gives the
    /// incarnation of those replica files it reported one for. For every
    /// volume with a replica on that host: a replica whose incarnation
    /// changed was made again, blank, and leaves the in-sync set with the
    /// epoch raised (unless the volume is still `creating`, when every
    /// replica is blank or the image alike); the host counts as holding it
    /// when it reports the volume's epoch and is in sync (any epoch while
    /// deleting). A `creating` volume that every replica host holds
    /// becomes `available`; a `deleting` one that none holds any more is
    /// removed. Returns how many volumes changed.
    pub(crate) fn report_replicas(
        &mut self,
        host_id: &str,
        held: &BTreeMap<String, u64>,
        incarnations: &BTreeMap<String, u64>,
    ) -> u32 {
        let mut changed = 0;
        let mut gone = Vec::new();
        for v in self.volumes.values_mut() {
            if !v.replicas.iter().any(|r| r == host_id) {
                continue;
            }
            let replaced = note_incarnation(v, host_id, incarnations);
            let holds = holds(v, host_id, held);
            let before = (v.state, v.held.contains(host_id));
            if holds {
                v.held.insert(host_id.to_string());
            } else {
                v.held.remove(host_id);
            }
            if v.state == VolumeState::Creating && v.replicas.iter().all(|r| v.held.contains(r)) {
                // A launch's volume is attached from the start.
                v.state = if v.attachment.is_some() {
                    VolumeState::InUse
                } else {
                    VolumeState::Available
                };
                tracing::info!(volume_id = %v.id, state = v.state.as_str(), "every replica is held");
            }
            if v.state == VolumeState::Deleting && v.held.is_empty() {
                gone.push(v.id.clone());
            }
            if replaced || before != (v.state, v.held.contains(host_id)) {
                changed += 1;
            }
        }
        for id in gone {
            self.remove_volume(&id);
        }
        changed
    }

    /// Volume `volume_id`, when `caller` may act as its primary (the host
    /// serving it to its instance, or a replica host in sync) at `epoch`,
    /// its current one; else PermissionDenied, or FailedPrecondition for
    /// an older (fenced) or never granted epoch.
    fn primary_at(&self, volume_id: &str, epoch: u64, caller: &str) -> Result<&Volume, StateError> {
        let v = self.volume(volume_id)?;
        if !self.serves(v, caller) && !v.in_sync().any(|r| r == caller) {
            return Err(E::PermissionDenied(format!(
                "host {caller} neither serves {volume_id} nor holds a replica of it in sync"
            )));
        }
        if epoch != v.epoch {
            return Err(E::FailedPrecondition(format!(
                "epoch: {epoch} is not {volume_id}'s current epoch {} (fenced)",
                v.epoch
            )));
        }
        Ok(v)
    }

    /// Whether `host` serves `v`: it runs the instance `v` is attached to.
    fn serves(&self, v: &Volume, host: &str) -> bool {
        v.attachment
            .as_ref()
            .and_then(|a| self.instances.get(&a.instance_id))
            .is_some_and(|i| i.host_id == host)
    }

    /// Volume `volume_id`'s primary `caller`, holding `epoch`, reports
    /// replica host `replica` failed. When `epoch` is the volume's current
    /// one, `replica` leaves the in-sync set and the epoch goes up by one
    /// (returned): every replica still in sync takes the new epoch from its
    /// watch, so a primary of the old epoch can no longer write anywhere.
    /// An older epoch is refused (the caller was fenced: someone else
    /// changed the set first), and so is removing the last replica in sync
    /// besides the caller's own.
    pub(super) fn remove_replica(
        &mut self,
        volume_id: &str,
        epoch: u64,
        replica: &str,
        caller: &str,
    ) -> Response {
        let v = self.primary_at(volume_id, epoch, caller)?;
        if replica == caller || !v.in_sync().any(|r| r == replica) {
            return invalid(format!(
                "replica_host_id: {replica} is not another in-sync replica of {volume_id}"
            ));
        }
        if v.in_sync().count() < 2 {
            return Err(E::FailedPrecondition(format!(
                "replica_host_id: {replica} is the last replica of {volume_id} in sync"
            )));
        }
        let v = self.volumes.get_mut(volume_id).expect("checked above");
        v.out_of_sync.insert(replica.to_string());
        v.held.remove(replica);
        v.epoch += 1;
        v.clean = false;
        tracing::warn!(
            volume_id,
            replica,
            epoch = v.epoch,
            "replica out of sync: epoch raised"
        );
        Ok(Output::Epoch(v.epoch))
    }

    /// Volume `volume_id`'s primary `caller`, holding `epoch`, has resynced
    /// the out-of-sync replica host `replica` (copied every region it
    /// missed). When `epoch` is still the volume's, `replica` is back in
    /// the in-sync set and the epoch goes up by one (returned), so the set
    /// change is fenced like a removal: a primary that did not make it
    /// can no longer write. Refused: a caller neither serving the volume
    /// nor in sync, an older or newer epoch, and a replica that is not one
    /// of the volume's out of sync.
    pub(super) fn add_replica(
        &mut self,
        volume_id: &str,
        epoch: u64,
        replica: &str,
        caller: &str,
    ) -> Response {
        let v = self.primary_at(volume_id, epoch, caller)?;
        if !v.out_of_sync.contains(replica) || !v.replicas.iter().any(|r| r == replica) {
            return invalid(format!(
                "replica_host_id: {replica} is not a replica of {volume_id} out of sync"
            ));
        }
        let v = self.volumes.get_mut(volume_id).expect("checked above");
        v.out_of_sync.remove(replica);
        v.epoch += 1;
        v.clean = false;
        tracing::info!(
            volume_id,
            replica,
            caller,
            epoch = v.epoch,
            "replica resynced, back in sync: epoch raised"
        );
        Ok(Output::Epoch(v.epoch))
    }

    /// Volume `volume_id`'s serving host `caller` (the host of the instance
    /// it is attached to), holding `epoch`, is about to serve it: a new
    /// session begins and the volume is no longer closed clean; returned:
    /// the session, whether it was clean, and the epoch to serve at. When
    /// the previous session was another host's and was not closed clean,
    /// that primary may still be writing (its host cut off, or its guest
    /// still shutting down): the epoch is raised, which fences it at every
    /// replica before this one writes. Refused: a caller not serving the
    /// volume (PermissionDenied), an epoch not the volume's.
    pub(super) fn open_volume_session(
        &mut self,
        volume_id: &str,
        epoch: u64,
        caller: &str,
    ) -> Response {
        let v = self.primary_at(volume_id, epoch, caller)?;
        if !self.serves(v, caller) {
            return Err(E::PermissionDenied(format!(
                "host {caller} does not serve {volume_id} (the host of the instance it is \
                 attached to does)"
            )));
        }
        let v = self.volumes.get_mut(volume_id).expect("checked above");
        let was_clean = std::mem::take(&mut v.clean);
        if !was_clean && !v.session_host.is_empty() && v.session_host != caller {
            v.epoch += 1;
        }
        v.session += 1;
        v.session_host = caller.to_string();
        tracing::info!(
            volume_id,
            caller,
            epoch = v.epoch,
            session = v.session,
            was_clean,
            "volume session opened"
        );
        Ok(Output::Session {
            session: v.session,
            was_clean,
            epoch: v.epoch,
        })
    }

    /// The primary `caller` of session `session` at `epoch` closed volume
    /// `volume_id` clean (it may no longer serve it, nor hold a replica).
    /// Refused when another session began since, another host opened it,
    /// or the epoch moved: the volume then stays not clean, and its next
    /// primary compares its replicas.
    pub(super) fn close_volume_session(
        &mut self,
        volume_id: &str,
        epoch: u64,
        session: u64,
        caller: &str,
    ) -> Response {
        let v = self.volume(volume_id)?;
        if session != v.session || caller != v.session_host {
            return Err(E::FailedPrecondition(format!(
                "session: {session} of host {caller} is not {volume_id}'s current session {} \
                 of host {:?}",
                v.session, v.session_host
            )));
        }
        if epoch != v.epoch {
            return Err(E::FailedPrecondition(format!(
                "epoch: {epoch} is not {volume_id}'s current epoch {} (fenced)",
                v.epoch
            )));
        }
        let v = self.volumes.get_mut(volume_id).expect("checked above");
        v.clean = true;
        tracing::info!(
            volume_id,
            caller,
            epoch,
            session,
            "volume session closed clean"
        );
        Ok(Output::Done)
    }

    /// Whether [`Self::report_replicas`] would change anything (so that a
    /// report that changes nothing writes nothing to the log).
    pub fn replicas_report_changes(
        &self,
        host_id: &str,
        held: &BTreeMap<String, u64>,
        incarnations: &BTreeMap<String, u64>,
    ) -> bool {
        // A volume's state only moves when a host's membership in `held`
        // does (it moves on as soon as the last one needed arrives).
        self.volumes
            .values()
            .filter(|v| v.replicas.iter().any(|r| r == host_id))
            .any(|v| {
                holds(v, host_id, held) != v.held.contains(host_id)
                    || incarnations
                        .get(&v.id)
                        .is_some_and(|i| v.incarnations.get(host_id) != Some(i))
            })
    }

    pub(super) fn attach_volume(
        &mut self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
        delete_on_termination: bool,
    ) -> Response {
        let v = self.volume(volume_id)?;
        let Some(i) = self.instances.get(instance_id) else {
            return Err(E::NotFound(format!(
                "instance_id: no instance {instance_id:?}"
            )));
        };
        if i.desired == DesiredState::Terminated {
            return Err(E::FailedPrecondition(format!(
                "instance_id: {instance_id} is terminated"
            )));
        }
        if i.az != v.az {
            return invalid(format!(
                "instance_id: {instance_id} is in {}, the volume in {}",
                i.az, v.az
            ));
        }
        if let Some(a) = &v.attachment {
            return Err(E::FailedPrecondition(format!(
                "volume_id: {volume_id} is attached to {} (VolumeInUse)",
                a.instance_id
            )));
        }
        if v.state != VolumeState::Available {
            return Err(E::FailedPrecondition(format!(
                "volume_id: {volume_id} is {}, not available",
                v.state.as_str()
            )));
        }
        check_device(device)?;
        let taken = self.volumes.values().find(|o| {
            o.attachment
                .as_ref()
                .is_some_and(|a| a.instance_id == instance_id && a.device == device)
        });
        if let Some(o) = taken {
            return invalid(format!(
                "device: {device} is in use on {instance_id} by {}",
                o.id
            ));
        }
        if running(i) {
            return Err(E::FailedPrecondition(
                "IncorrectInstanceState: hot-attach comes later; stop the instance first".into(),
            ));
        }
        let a = VolumeAttachment {
            instance_id: instance_id.into(),
            device: device.into(),
            // Takes effect at the instance's next start (dataplane later).
            state: AttachmentState::Attached,
            delete_on_termination,
        };
        let v = self.volumes.get_mut(volume_id).expect("checked above");
        v.attachment = Some(a.clone());
        v.state = VolumeState::InUse;
        if !v.out_of_sync.is_empty() {
            // A replica host may be resyncing the others as no one's
            // primary: the new epoch fences it (its copying and its
            // AddReplica), so only the serving host's resync counts.
            v.epoch += 1;
            v.clean = false;
        }
        tracing::info!(
            volume_id,
            instance_id,
            device,
            epoch = v.epoch,
            "volume attached"
        );
        Ok(Output::Attachment {
            volume_id: volume_id.into(),
            attachment: a,
        })
    }

    pub(super) fn detach_volume(
        &mut self,
        volume_id: &str,
        instance_id: &str,
        force: bool,
    ) -> Response {
        let v = self.volume(volume_id)?;
        let Some(a) = &v.attachment else {
            return Err(E::FailedPrecondition(format!(
                "volume_id: {volume_id} is not attached (IncorrectState)"
            )));
        };
        if !instance_id.is_empty() && a.instance_id != instance_id {
            return invalid(format!(
                "instance_id: {volume_id} is attached to {}, not {instance_id}",
                a.instance_id
            ));
        }
        let inst = self.instances.get(&a.instance_id);
        if inst.is_some_and(|i| !i.is_final() && i.root_volume.as_deref() == Some(volume_id)) {
            return Err(E::FailedPrecondition(format!(
                "volume_id: {volume_id} is the root volume of {}: it boots from it \
                 (terminate the instance to free it)",
                a.instance_id
            )));
        }
        let on_running = inst.is_some_and(running);
        if on_running && !force {
            return Err(E::FailedPrecondition(format!(
                "IncorrectInstanceState: {} is running; hot-detach comes later: \
                 stop the instance first, or force",
                a.instance_id
            )));
        }
        let v = self.volumes.get_mut(volume_id).expect("checked above");
        if on_running {
            // Its host's blockd may still serve it to the running VMM
            // until its watch says otherwise: the new epoch fences that
            // primary at every replica, so a primary elsewhere (an attach
            // and start on another host) never shares the replicas with
            // it.
            v.epoch += 1;
            v.clean = false;
        }
        let mut a = v.attachment.take().expect("checked above");
        // A launch's volume still being made stays so until its replicas
        // hold it.
        if v.state != VolumeState::Creating {
            v.state = VolumeState::Available;
        }
        a.state = AttachmentState::Detached;
        tracing::info!(volume_id, instance_id = %a.instance_id, force, "volume detached");
        Ok(Output::Attachment {
            volume_id: volume_id.into(),
            attachment: a,
        })
    }

    /// Instance `id` is final: its volumes with delete-on-termination are
    /// deleted, the others detached.
    pub(super) fn release_volumes(&mut self, id: &str) {
        let mine: Vec<(String, bool)> = self
            .volumes
            .values()
            .filter_map(|v| {
                let a = v.attachment.as_ref()?;
                (a.instance_id == id).then(|| (v.id.clone(), a.delete_on_termination))
            })
            .collect();
        for (vol, delete) in mine {
            if delete {
                self.start_deleting(&vol);
            } else if let Some(v) = self.volumes.get_mut(&vol) {
                v.attachment = None;
                // One still being made stays so until its replicas hold it.
                if v.state != VolumeState::Creating {
                    v.state = VolumeState::Available;
                }
                tracing::info!(volume_id = %vol, instance_id = id, "detached: instance terminated");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use ferro_raft::StateMachine;

    fn disk_host(s: &mut ClusterState, id: &str, az: &str, disk_gib: u64) {
        s.apply(Command::Heartbeat {
            host: HostReport {
                id: id.into(),
                az: az.into(),
                address: format!("http://{id}:7420"),
                vcpus_total: 8,
                memory_total_mib: 8192,
                cpu_model: "test".into(),
                agent_version: "0".into(),
                kvm_present: true,
                disk_total_gib: disk_gib,
            },
            observed: vec![],
            complete: true,
            now_ms: 10,
            listed_seq: 0,
        })
        .unwrap();
    }

    fn vspec(size: u64, ty: &str) -> VolumeSpec {
        VolumeSpec {
            size_gib: size,
            az: "az-1".into(),
            volume_type: ty.into(),
            ..VolumeSpec::default()
        }
    }

    /// Create, then report every replica held (as the replica hosts'
    /// blockd would): the volume is `available`.
    fn create(s: &mut ClusterState, id: &str, spec: VolumeSpec) -> Response {
        let out = create_only(s, id, spec)?;
        let Output::Volume(v) = &out else {
            return Ok(out);
        };
        for h in &v.replicas {
            let mut held = holding(s, h);
            held.insert(v.id.clone(), v.epoch);
            report(s, h, held);
        }
        Ok(Output::Volume(s.volumes[&v.id].clone()))
    }

    fn create_only(s: &mut ClusterState, id: &str, spec: VolumeSpec) -> Response {
        s.apply(Command::CreateVolume {
            spec,
            volume_id: id.into(),
            now_ms: 7,
        })
    }

    /// What host `h` holds now (every volume it is recorded holding).
    fn holding(s: &ClusterState, h: &str) -> BTreeMap<String, u64> {
        s.volumes
            .values()
            .filter(|v| v.held.contains(h))
            .map(|v| (v.id.clone(), v.epoch))
            .collect()
    }

    fn report(s: &mut ClusterState, host: &str, held: BTreeMap<String, u64>) -> u32 {
        let would = s.replicas_report_changes(host, &held, &BTreeMap::new());
        let Output::Count(n) = s
            .apply(Command::ReportReplicas {
                host_id: host.into(),
                held,
                incarnations: BTreeMap::new(),
            })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(would, n > 0, "the read-only check agrees");
        n
    }

    fn attach(s: &mut ClusterState, vol: &str, inst: &str, dev: &str, dot: bool) -> Response {
        s.apply(Command::AttachVolume {
            volume_id: vol.into(),
            instance_id: inst.into(),
            device: dev.into(),
            delete_on_termination: dot,
        })
    }

    fn detach(s: &mut ClusterState, vol: &str, force: bool) -> Response {
        s.apply(Command::DetachVolume {
            volume_id: vol.into(),
            instance_id: String::new(),
            force,
        })
    }

    /// A cluster with hosts h1..h3 in az-1 (100, 300, 200 GiB), h4 in
    /// az-2 and an instance `i` in az-1, stopped (or running).
    fn cluster(stopped: bool) -> (ClusterState, String) {
        let mut s = bootstrapped();
        disk_host(&mut s, "h1", "az-1", 100);
        disk_host(&mut s, "h2", "az-1", 300);
        disk_host(&mut s, "h3", "az-1", 200);
        disk_host(&mut s, "h4", "az-2", 1000);
        add_image(&mut s);
        let mut seq = 0;
        let sp = RunSpec {
            az: "az-1".into(),
            ..spec()
        };
        run(&mut s, 1, &mut seq, sp).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        if stopped {
            s.apply(Command::SetDesired {
                ids: vec![id.clone()],
                desired: DesiredState::Stopped,
            })
            .unwrap();
        }
        (s, id)
    }

    fn free(s: &ClusterState) -> Vec<u64> {
        s.hosts.values().map(Host::free_disk_gib).collect()
    }

    #[test]
    fn placement_takes_distinct_healthy_hosts_of_the_zone_by_free_disk() {
        let c = |id, az, healthy, total, free| DiskCandidate {
            id,
            az,
            healthy,
            total_gib: total,
            free_gib: free,
        };
        let hosts = [
            c("a", "az-1", true, 100, 100),
            c("b", "az-1", true, 300, 50),
            c("c", "az-1", true, 200, 200),
            c("d", "az-2", true, 900, 900),
            c("e", "az-1", false, 900, 900),
            c("f", "az-1", true, 0, 0),
        ];
        assert_eq!(place_replicas(&hosts, "az-1", 10, 2).unwrap(), ["c", "a"]);
        assert_eq!(
            place_replicas(&hosts, "az-1", 10, 3).unwrap(),
            ["c", "a", "b"]
        );
        let e = place_replicas(&hosts, "az-1", 60, 3).unwrap_err();
        assert!(
            matches!(&e, E::ResourceExhausted(m) if m.starts_with("size_gib")),
            "{e}"
        );
        let e = place_replicas(&hosts, "az-2", 1, 2).unwrap_err();
        assert!(
            e.to_string()
                .contains("no host in AZ az-2 reports disk space for 2 replicas"),
            "{e}"
        );
    }

    #[test]
    fn create_places_replicas_allocates_and_delete_frees() {
        let (mut s, _) = cluster(true);
        let Output::Volume(v) = create(&mut s, "vol-1", vspec(50, "durable")).unwrap() else {
            panic!()
        };
        assert_eq!(v.replicas, ["h2", "h3", "h1"]);
        assert_eq!((v.state, v.epoch), (VolumeState::Available, 1));
        assert_eq!(free(&s), [50, 250, 150, 1000]);
        let Output::Volume(v) = create(&mut s, "vol-2", vspec(10, "")).unwrap() else {
            panic!()
        };
        assert_eq!(v.volume_type, VolumeType::Standard);
        assert_eq!(v.replicas, ["h2", "h3"]);
        s.apply(Command::DeleteVolume { id: "vol-1".into() })
            .unwrap();
        s.apply(Command::DeleteVolume { id: "vol-2".into() })
            .unwrap();
        // Held until the replica hosts report them gone.
        assert_eq!(s.volumes["vol-1"].state, VolumeState::Deleting);
        assert_eq!(free(&s), [50, 240, 140, 1000]);
        for h in ["h1", "h2", "h3"] {
            report(&mut s, h, BTreeMap::new());
        }
        assert_eq!(free(&s), [100, 300, 200, 1000]);
        assert!(s.volumes.is_empty());
    }

    #[test]
    fn a_session_closed_clean_is_seen_by_the_next_one_only_and_an_epoch_move_clears_it() {
        let (mut s, inst) = cluster(true);
        create(&mut s, "vol-1", vspec(10, "durable")).unwrap();
        attach(&mut s, "vol-1", &inst, "/dev/vdb", false).unwrap();
        let serving = s.instances[&inst].host_id.clone();
        let other = ["h1", "h2", "h3"]
            .into_iter()
            .find(|h| *h != serving)
            .unwrap()
            .to_string();
        let open = |s: &mut ClusterState, epoch, caller: &str| {
            s.apply(Command::OpenVolumeSession {
                volume_id: "vol-1".into(),
                epoch,
                caller: caller.into(),
            })
        };
        let close = |s: &mut ClusterState, epoch, session, caller: &str| {
            s.apply(Command::CloseVolumeSession {
                volume_id: "vol-1".into(),
                epoch,
                session,
                caller: caller.into(),
            })
        };
        let session = |session, was_clean, epoch| Output::Session {
            session,
            was_clean,
            epoch,
        };
        let before = s.clone();
        // Only the serving host, at the current epoch: not another replica
        // host, not a host of another zone.
        for (epoch, caller, want) in [
            (1, other.as_str(), "does not serve"),
            (1, "h4", "host h4 neither serves"),
            (0, serving.as_str(), "epoch: 0"),
        ] {
            let e = open(&mut s, epoch, caller).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        assert_eq!(s, before, "nothing changed");
        // Never closed: not clean; the same host again raises nothing.
        assert_eq!(open(&mut s, 1, &serving).unwrap(), session(1, false, 1));
        assert_eq!(open(&mut s, 1, &serving).unwrap(), session(2, false, 1));
        // Only the current session of its own host closes, at its epoch.
        for (epoch, session, caller, want) in [
            (1, 1, serving.as_str(), "current session 2"),
            (1, 2, other.as_str(), "current session 2"),
            (0, 2, serving.as_str(), "epoch: 0"),
        ] {
            let e = close(&mut s, epoch, session, caller).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        assert!(!s.volumes["vol-1"].clean);
        close(&mut s, 1, 2, &serving).unwrap();
        assert!(s.volumes["vol-1"].clean);
        // The next session sees it, and opening clears it.
        assert_eq!(open(&mut s, 1, &serving).unwrap(), session(3, true, 1));
        // Moved to another host while not closed clean: the old primary
        // may still write, so the epoch goes up and fences it.
        s.instances.get_mut(&inst).unwrap().host_id = other.clone();
        assert_eq!(open(&mut s, 1, &other).unwrap(), session(4, false, 2));
        let e = close(&mut s, 1, 3, &serving).unwrap_err();
        assert!(e.to_string().contains("current session 4"), "{e}");
        // Closed clean, a move raises nothing.
        close(&mut s, 2, 4, &other).unwrap();
        s.instances.get_mut(&inst).unwrap().host_id = serving.clone();
        assert_eq!(open(&mut s, 2, &serving).unwrap(), session(5, true, 2));
        // A set change clears it, and fences a close at the old epoch.
        close(&mut s, 2, 5, &serving).unwrap();
        let backup = s.volumes["vol-1"]
            .in_sync()
            .find(|r| **r != serving)
            .unwrap()
            .clone();
        s.apply(Command::RemoveReplica {
            volume_id: "vol-1".into(),
            epoch: 2,
            replica: backup,
            caller: serving.clone(),
        })
        .unwrap();
        assert!(!s.volumes["vol-1"].clean);
        let e = close(&mut s, 2, 5, &serving).unwrap_err();
        assert!(e.to_string().contains("epoch: 2 is not"), "{e}");
        assert_eq!(open(&mut s, 3, &serving).unwrap(), session(6, false, 3));
    }

    #[test]
    fn removing_a_failed_replica_raises_the_epoch_and_fences_the_old_one() {
        let (mut s, _) = cluster(true);
        create(&mut s, "vol-1", vspec(10, "durable")).unwrap();
        assert_eq!(s.volumes["vol-1"].replicas, ["h2", "h3", "h1"]);
        let rm = |s: &mut ClusterState, epoch, replica: &str, caller: &str| {
            s.apply(Command::RemoveReplica {
                volume_id: "vol-1".into(),
                epoch,
                replica: replica.into(),
                caller: caller.into(),
            })
        };
        let before = s.clone();
        for (epoch, replica, caller, want) in [
            (1, "h3", "h4", "host h4 neither serves"),
            (0, "h3", "h2", "epoch: 0 is not"),
            (1, "h2", "h2", "replica_host_id"),
            (1, "h9", "h2", "replica_host_id"),
        ] {
            let e = rm(&mut s, epoch, replica, caller).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        assert_eq!(s, before, "nothing changed");
        assert_eq!(rm(&mut s, 1, "h3", "h2").unwrap(), Output::Epoch(2));
        let v = &s.volumes["vol-1"];
        assert_eq!(v.in_sync().collect::<Vec<_>>(), ["h2", "h1"]);
        assert!(!v.held.contains("h3"));
        // The replica out of sync can no longer act as a primary, and a
        // caller still at epoch 1 is fenced.
        let e = rm(&mut s, 2, "h1", "h3").unwrap_err();
        assert!(matches!(e, E::PermissionDenied(_)), "{e}");
        let e = rm(&mut s, 1, "h1", "h2").unwrap_err();
        assert!(matches!(e, E::FailedPrecondition(_)), "{e}");
        // A report at the old epoch is not "held"; at the new one it is.
        let held = |e: u64| BTreeMap::from([("vol-1".to_string(), e)]);
        report(&mut s, "h3", held(1));
        assert!(!s.volumes["vol-1"].held.contains("h3"));
        report(&mut s, "h1", held(2));
        assert!(s.volumes["vol-1"].held.contains("h1"));
    }

    #[test]
    fn a_replica_file_made_again_leaves_the_in_sync_set_and_raises_the_epoch() {
        let (mut s, _) = cluster(true);
        create_only(&mut s, "vol-1", vspec(10, "durable")).unwrap();
        let rep = |s: &mut ClusterState, host: &str, epoch: u64, inc: u64| -> u32 {
            let held = BTreeMap::from([("vol-1".to_string(), epoch)]);
            let incarnations = BTreeMap::from([("vol-1".to_string(), inc)]);
            let would = s.replicas_report_changes(host, &held, &incarnations);
            let Output::Count(n) = s
                .apply(Command::ReportReplicas {
                    host_id: host.into(),
                    held,
                    incarnations,
                })
                .unwrap()
            else {
                panic!()
            };
            assert_eq!(would, n > 0, "the read-only check agrees");
            n
        };
        // While the volume is being created every copy is blank (or the
        // image): a file made again loses nothing.
        rep(&mut s, "h1", 1, 10);
        assert!(
            rep(&mut s, "h1", 1, 11) > 0,
            "a new incarnation is recorded"
        );
        assert_eq!(s.volumes["vol-1"].epoch, 1);
        rep(&mut s, "h2", 1, 20);
        rep(&mut s, "h3", 1, 30);
        assert_eq!(s.volumes["vol-1"].state, VolumeState::Available);
        assert_eq!(rep(&mut s, "h2", 1, 20), 0, "the same report again");
        // h2's file is made again: its blank copy must not count.
        assert!(rep(&mut s, "h2", 1, 21) > 0);
        let v = &s.volumes["vol-1"];
        assert_eq!(v.epoch, 2, "the primary is fenced and re-learns its set");
        assert!(v.out_of_sync.contains("h2") && !v.held.contains("h2"));
        assert!(!v.clean);
        // Taking the new epoch does not bring it back: only a resync does.
        rep(&mut s, "h2", 2, 21);
        assert!(!s.volumes["vol-1"].held.contains("h2"));
        assert_eq!(s.volumes["vol-1"].epoch, 2);
        // Made again while out of sync: the epoch goes up all the same
        // (no primary may resync it from what it knew of the old file).
        rep(&mut s, "h2", 2, 22);
        assert_eq!(s.volumes["vol-1"].epoch, 3);
        assert!(s.volumes["vol-1"].out_of_sync.contains("h2"));
        // A blockd from before incarnations (none reported) changes none.
        report(&mut s, "h3", BTreeMap::from([("vol-1".to_string(), 3)]));
        assert_eq!(s.volumes["vol-1"].incarnations["h3"], 30);
        assert!(s.volumes["vol-1"].held.contains("h3"));
    }

    #[test]
    fn a_resynced_replica_is_put_back_in_sync_only_by_a_primary_at_the_epoch() {
        let (mut s, _) = cluster(true);
        create(&mut s, "vol-1", vspec(10, "durable")).unwrap();
        let cmd = |remove: bool, epoch, replica: &str, caller: &str| {
            let (volume_id, replica, caller) = ("vol-1".into(), replica.into(), caller.into());
            if remove {
                Command::RemoveReplica {
                    volume_id,
                    epoch,
                    replica,
                    caller,
                }
            } else {
                Command::AddReplica {
                    volume_id,
                    epoch,
                    replica,
                    caller,
                }
            }
        };
        // Nothing is out of sync yet: nothing to put back.
        let e = s.apply(cmd(false, 1, "h3", "h2")).unwrap_err();
        assert!(e.to_string().contains("replica_host_id"), "{e}");
        assert_eq!(s.apply(cmd(true, 1, "h3", "h2")).unwrap(), Output::Epoch(2));
        // h3 comes back and reports the epoch it was given: not held while
        // out of sync.
        let held = |e: u64| BTreeMap::from([("vol-1".to_string(), e)]);
        report(&mut s, "h3", held(2));
        assert!(!s.volumes["vol-1"].held.contains("h3"));
        let before = s.clone();
        for (epoch, replica, caller, want) in [
            // The replica itself, out of sync, or a host without a replica.
            (2, "h3", "h3", "host h3 neither serves"),
            (2, "h3", "h4", "host h4 neither serves"),
            // An older epoch (fenced) or one never granted.
            (1, "h3", "h2", "epoch: 1 is not"),
            (3, "h3", "h2", "epoch: 3 is not"),
            // Unknown hosts, or replicas already in sync.
            (2, "h9", "h2", "replica_host_id"),
            (2, "h1", "h2", "replica_host_id"),
            (2, "", "h2", "replica_host_id"),
        ] {
            let e = s.apply(cmd(false, epoch, replica, caller)).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        let e = s.apply(cmd(false, 1, "h3", "h2")).unwrap_err();
        assert!(matches!(e, E::FailedPrecondition(_)), "{e}");
        let e = s.apply(cmd(false, 2, "h3", "h4")).unwrap_err();
        assert!(matches!(e, E::PermissionDenied(_)), "{e}");
        assert_eq!(s, before, "nothing changed");
        // Any in-sync replica host may; the epoch goes up once more.
        assert_eq!(
            s.apply(cmd(false, 2, "h3", "h1")).unwrap(),
            Output::Epoch(3)
        );
        let v = &s.volumes["vol-1"];
        assert_eq!(v.in_sync().collect::<Vec<_>>(), ["h2", "h3", "h1"]);
        assert!(v.out_of_sync.is_empty());
        // Not twice; and the primary of the epoch before is fenced.
        let e = s.apply(cmd(false, 3, "h3", "h2")).unwrap_err();
        assert!(e.to_string().contains("replica_host_id"), "{e}");
        let e = s.apply(cmd(true, 2, "h3", "h2")).unwrap_err();
        assert!(matches!(e, E::FailedPrecondition(_)), "{e}");
        // Held once it reports the new epoch.
        report(&mut s, "h3", held(3));
        assert!(s.volumes["vol-1"].held.contains("h3"));
    }

    #[test]
    fn the_first_replica_in_sync_resyncs_an_unattached_volume_and_attaching_fences_it() {
        use crate::api::hostvol::host_volumes;
        let (mut s, inst) = cluster(true);
        create(&mut s, "vol-1", vspec(10, "durable")).unwrap();
        let told = |s: &ClusterState, h: &str| host_volumes(s, h).replicas[0].resync.clone();
        let nobody = Vec::<String>::new();
        for h in ["h1", "h2", "h3"] {
            assert_eq!(told(&s, h), nobody, "{h}: nothing out of sync");
        }
        // h2, the first in placement, drops h3: h2 is told to resync it.
        s.apply(Command::RemoveReplica {
            volume_id: "vol-1".into(),
            epoch: 1,
            replica: "h3".into(),
            caller: "h2".into(),
        })
        .unwrap();
        assert_eq!(told(&s, "h2"), ["h3"]);
        assert_eq!(told(&s, "h1"), nobody);
        assert_eq!(told(&s, "h3"), nobody);
        // Attached: its serving host resyncs; the epoch moves on, so a
        // resync begun at epoch 2 cannot put h3 back.
        attach(&mut s, "vol-1", &inst, "/dev/vdb", false).unwrap();
        assert_eq!(s.volumes["vol-1"].epoch, 3);
        assert_eq!(told(&s, "h2"), nobody);
        let e = s
            .apply(Command::AddReplica {
                volume_id: "vol-1".into(),
                epoch: 2,
                replica: "h3".into(),
                caller: "h2".into(),
            })
            .unwrap_err();
        assert!(matches!(e, E::FailedPrecondition(_)), "{e}");
        // Detached again: back to the first replica in sync.
        detach(&mut s, "vol-1", false).unwrap();
        assert_eq!(told(&s, "h2"), ["h3"]);
        // Being deleted: nothing to resync.
        s.apply(Command::DeleteVolume { id: "vol-1".into() })
            .unwrap();
        assert_eq!(s.volumes["vol-1"].state, VolumeState::Deleting);
        assert_eq!(told(&s, "h2"), nobody);
    }

    #[test]
    fn a_volume_is_available_once_every_replica_host_holds_it_at_its_epoch() {
        let (mut s, _) = cluster(true);
        create_only(&mut s, "vol-1", vspec(10, "durable")).unwrap();
        let v = || s.volumes["vol-1"].clone();
        assert_eq!(v().state, VolumeState::Creating);
        let held = |e: u64| BTreeMap::from([("vol-1".to_string(), e)]);
        // A host without a replica of it, or an older epoch: nothing.
        assert_eq!(report(&mut s, "h4", held(1)), 0);
        assert_eq!(report(&mut s, "h1", held(0)), 0);
        assert_eq!(report(&mut s, "h1", held(1)), 1);
        assert_eq!(report(&mut s, "h1", held(1)), 0, "the same report again");
        assert_eq!(report(&mut s, "h2", held(1)), 1);
        assert_eq!(s.volumes["vol-1"].state, VolumeState::Creating);
        report(&mut s, "h3", held(1));
        assert_eq!(s.volumes["vol-1"].state, VolumeState::Available);
        // A replica lost later is no longer held (the volume stays usable
        // on the others: failover is blockd's and the epoch's business).
        report(&mut s, "h3", BTreeMap::new());
        let v = &s.volumes["vol-1"];
        assert_eq!(v.state, VolumeState::Available);
        assert_eq!(v.held, BTreeSet::from(["h1".into(), "h2".into()]));
        // Deleting: gone once the last holder reports it gone.
        s.apply(Command::DeleteVolume { id: "vol-1".into() })
            .unwrap();
        report(&mut s, "h1", BTreeMap::new());
        assert_eq!(s.volumes["vol-1"].state, VolumeState::Deleting);
        report(&mut s, "h2", BTreeMap::new());
        assert!(!s.volumes.contains_key("vol-1"));
        // Never held anywhere: gone at once.
        create_only(&mut s, "vol-2", vspec(10, "")).unwrap();
        s.apply(Command::DeleteVolume { id: "vol-2".into() })
            .unwrap();
        assert!(s.volumes.is_empty());
        assert_eq!(free(&s), [100, 300, 200, 1000]);
    }

    #[test]
    fn bad_volumes_are_refused_naming_the_field_and_change_nothing() {
        let (mut s, _) = cluster(true);
        let before = s.clone();
        let cases = [
            (vspec(0, ""), "size_gib"),
            (vspec(MAX_VOLUME_GIB + 1, ""), "size_gib"),
            (vspec(150, "durable"), "size_gib"),
            (vspec(1, "gp3"), "volume_type"),
            (
                VolumeSpec {
                    az: "az-9".into(),
                    ..vspec(1, "")
                },
                "availability_zone",
            ),
            (
                VolumeSpec {
                    client_token: "a b".into(),
                    ..vspec(1, "")
                },
                "client_token",
            ),
        ];
        for (sp, field) in cases {
            let e = create(&mut s, "vol-1", sp).unwrap_err();
            assert!(e.to_string().starts_with(field), "{field}: {e}");
        }
        // az-2's only host: not enough hosts for two replicas.
        let e = create(
            &mut s,
            "vol-1",
            VolumeSpec {
                az: "az-2".into(),
                ..vspec(1, "")
            },
        )
        .unwrap_err();
        assert!(matches!(e, E::ResourceExhausted(_)), "{e}");
        assert_eq!(s, before, "nothing changed");
    }

    #[test]
    fn a_launch_makes_its_block_devices_attached_or_changes_nothing() {
        let (mut s, _) = cluster(false);
        let free_before: u64 = free(&s).iter().sum();
        let bd = |dev: &str, size: u64, ty: &str| BlockDeviceSpec {
            device: dev.into(),
            size_gib: size,
            volume_type: ty.into(),
            delete_on_termination: true,
        };
        let sp = |devs: Vec<BlockDeviceSpec>| RunSpec {
            az: "az-1".into(),
            block_devices: devs,
            ..spec()
        };
        let mut seq = 100;
        let before = s.clone();
        for (devs, want) in [
            (
                vec![bd("/dev/vda", 1, "")],
                "block_device_mappings[0]: device",
            ),
            (
                vec![bd("/dev/vdb", 1, ""), bd("/dev/vdb", 1, "")],
                "block_device_mappings[1]: device /dev/vdb is given twice",
            ),
            (
                vec![bd("/dev/vdb", 0, "")],
                "block_device_mappings[0]: size_gib",
            ),
            (
                vec![bd("/dev/vdb", 1, "gold")],
                "block_device_mappings[0]: volume_type",
            ),
            // Durable needs three hosts with 250 GiB free: az-1 has one.
            (
                vec![bd("/dev/vdb", 1, ""), bd("/dev/vdc", 250, "durable")],
                "block_device_mappings[1]",
            ),
        ] {
            let e = run(&mut s, 1, &mut seq, sp(devs)).unwrap_err();
            assert!(e.to_string().starts_with(want), "{want}: {e}");
            assert_eq!(s, before, "{want}: the state changed");
        }
        // Two instances, each with a standard and a durable volume: the
        // space of all four counted together (the second instance's
        // durable 90 GiB fits only because the first one's is counted).
        let keep = BlockDeviceSpec {
            delete_on_termination: false,
            ..bd("/dev/vdc", 45, "durable")
        };
        let out = run(&mut s, 2, &mut seq, sp(vec![bd("/dev/vdb", 10, ""), keep])).unwrap();
        let Output::Launched { instances, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(s.volumes.len(), 4);
        for i in &instances {
            let a = attachments_of(&s, &i.id);
            let devs: Vec<(&str, bool)> = a
                .iter()
                .map(|(_, a)| (a.device.as_str(), a.delete_on_termination))
                .collect();
            assert_eq!(devs, [("/dev/vdb", true), ("/dev/vdc", false)]);
        }
        let taken = free_before - free(&s).iter().sum::<u64>();
        assert_eq!(taken, 2 * (10 * 2 + 45 * 3));
        // Made on every replica host: in use (attached), not available.
        assert!(s.volumes.values().all(|v| v.state == VolumeState::Creating));
        for v in s.volumes.clone().values() {
            for h in &v.replicas {
                let mut held = holding(&s, h);
                held.insert(v.id.clone(), v.epoch);
                report(&mut s, h, held);
            }
        }
        assert!(s.volumes.values().all(|v| v.state == VolumeState::InUse));
    }

    #[test]
    fn a_client_token_returns_the_same_volume_or_refuses_other_parameters() {
        let (mut s, _) = cluster(true);
        let sp = VolumeSpec {
            client_token: "t1".into(),
            ..vspec(10, "")
        };
        let a = create(&mut s, "vol-1", sp.clone()).unwrap();
        let b = create(&mut s, "vol-2", sp.clone()).unwrap();
        assert_eq!(a, b);
        assert_eq!(s.volumes.len(), 1);
        let e = create(&mut s, "vol-3", vspec(11, "")).map(|_| ());
        assert!(e.is_ok(), "no token: a new volume");
        let e = create(&mut s, "vol-4", VolumeSpec { size_gib: 12, ..sp }).unwrap_err();
        assert!(
            e.to_string().starts_with("client_token") && matches!(e, E::InvalidArgument(_)),
            "{e}"
        );
    }

    #[test]
    fn attach_needs_a_stopped_instance_of_the_zone_and_a_free_device() {
        let (mut s, id) = cluster(true);
        create(&mut s, "vol-1", vspec(10, "")).unwrap();
        create(&mut s, "vol-2", vspec(10, "")).unwrap();
        let before = s.clone();
        for (vol, inst, dev, want) in [
            ("vol-9", id.as_str(), "/dev/vdb", "volume_id"),
            ("vol-1", "i-nope", "/dev/vdb", "instance_id"),
            ("vol-1", id.as_str(), "/dev/vda", "device"),
            ("vol-1", id.as_str(), "/dev/sdb", "device"),
        ] {
            let e = attach(&mut s, vol, inst, dev, false).unwrap_err();
            assert!(e.to_string().starts_with(want), "{want}: {e}");
        }
        assert_eq!(s, before);
        let Output::Attachment { attachment, .. } =
            attach(&mut s, "vol-1", &id, "/dev/vdb", false).unwrap()
        else {
            panic!()
        };
        assert_eq!(attachment.state, AttachmentState::Attached);
        assert_eq!(s.volumes["vol-1"].state, VolumeState::InUse);
        let e = attach(&mut s, "vol-2", &id, "/dev/vdb", false).unwrap_err();
        assert!(e.to_string().starts_with("device"), "{e}");
        let e = attach(&mut s, "vol-1", &id, "/dev/vdc", false).unwrap_err();
        assert!(e.to_string().contains("VolumeInUse"), "{e}");
        let e = s
            .apply(Command::DeleteVolume { id: "vol-1".into() })
            .unwrap_err();
        assert!(
            matches!(&e, E::FailedPrecondition(m) if m.starts_with("DependencyViolation")),
            "{e}"
        );
        // Started again: neither attach nor (unforced) detach.
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Running,
        })
        .unwrap();
        let e = attach(&mut s, "vol-2", &id, "/dev/vdc", false).unwrap_err();
        assert_eq!(
            e,
            E::FailedPrecondition(
                "IncorrectInstanceState: hot-attach comes later; stop the instance first".into()
            )
        );
        let e = detach(&mut s, "vol-1", false).unwrap_err();
        assert!(e.to_string().contains("IncorrectInstanceState"), "{e}");
        let epoch = s.volumes["vol-1"].epoch;
        let Output::Attachment { attachment, .. } = detach(&mut s, "vol-1", true).unwrap() else {
            panic!()
        };
        assert_eq!(attachment.state, AttachmentState::Detached);
        assert_eq!(s.volumes["vol-1"].state, VolumeState::Available);
        // Forced off a running instance: the epoch fences its primary.
        assert_eq!(s.volumes["vol-1"].epoch, epoch + 1);
        let e = detach(&mut s, "vol-1", false).unwrap_err();
        assert!(e.to_string().contains("not attached"), "{e}");
    }

    #[test]
    fn an_instance_in_another_zone_or_terminated_is_refused() {
        let (mut s, id) = cluster(true);
        disk_host(&mut s, "h5", "az-2", 1000);
        create(
            &mut s,
            "vol-2",
            VolumeSpec {
                az: "az-2".into(),
                ..vspec(10, "")
            },
        )
        .unwrap();
        let e = attach(&mut s, "vol-2", &id, "/dev/vdb", false).unwrap_err();
        assert!(
            e.to_string().starts_with("instance_id") && e.to_string().contains("az-2"),
            "{e}"
        );
        create(&mut s, "vol-1", vspec(10, "")).unwrap();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        let e = attach(&mut s, "vol-1", &id, "/dev/vdb", false).unwrap_err();
        assert!(e.to_string().contains("terminated"), "{e}");
    }

    /// Once the instance is gone from its host, a delete-on-termination
    /// volume is deleted (its space freed), the other one detached.
    #[test]
    fn termination_deletes_or_detaches_its_volumes() {
        let (mut s, id) = cluster(true);
        create(&mut s, "vol-1", vspec(10, "")).unwrap();
        create(&mut s, "vol-2", vspec(20, "")).unwrap();
        attach(&mut s, "vol-1", &id, "/dev/vdb", true).unwrap();
        attach(&mut s, "vol-2", &id, "/dev/vdc", false).unwrap();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        // Never on its host (observed absent): final at once.
        assert!(s.instances[&id].is_final());
        let v = &s.volumes["vol-1"];
        assert_eq!(
            (v.state, v.attachment.is_none()),
            (VolumeState::Deleting, true)
        );
        let v = &s.volumes["vol-2"];
        assert_eq!(
            (v.state, v.attachment.is_none()),
            (VolumeState::Available, true)
        );
        for h in ["h2", "h3"] {
            let mut held = holding(&s, h);
            held.remove("vol-1");
            report(&mut s, h, held);
        }
        assert!(!s.volumes.contains_key("vol-1"));
        assert_eq!(free(&s), [100, 280, 180, 1000]);
    }

    #[test]
    fn a_format_3_state_upgrades_without_volumes() {
        let (s, _) = cluster(true);
        let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
        let o = json.as_object_mut().unwrap();
        o.remove("volumes");
        o.remove("volume_tokens");
        o.insert("format".into(), 3.into());
        for h in o["hosts"].as_object_mut().unwrap().values_mut() {
            let h = h.as_object_mut().unwrap();
            h.remove("disk_total_gib");
            h.remove("disk_allocated_gib");
        }
        let mut old: ClusterState = serde_json::from_value(json).unwrap();
        old.upgrade().unwrap();
        assert_eq!(old.format, STATE_FORMAT);
        assert!(old.volumes.is_empty() && old.volume_tokens.is_empty());
        assert!(old.hosts.values().all(|h| h.disk_total_gib == 0));
    }

    #[test]
    fn an_image_being_copied_into_a_volume_stays_registered() {
        let mut s = bootstrapped();
        disk_host(&mut s, "h1", "az-1", 100);
        disk_host(&mut s, "h2", "az-1", 100);
        add_image(&mut s);
        s.images.get_mut("img-1").unwrap().rootdisk_path = "/images/root.raw".into();
        let mut seq = 0;
        let boot = RunSpec {
            az: "az-1".into(),
            root_volume: Some(BlockDeviceSpec {
                size_gib: 2,
                delete_on_termination: false,
                ..BlockDeviceSpec::default()
            }),
            ..spec()
        };
        run(&mut s, 1, &mut seq, boot).unwrap();
        let i = s.instances.values().next().unwrap().clone();
        let root = i.root_volume.clone().unwrap();
        // Terminated before its host ever had it: gone at once, its root
        // volume kept, still being made.
        s.apply(Command::SetDesired {
            ids: vec![i.id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        assert!(s.instances[&i.id].is_final());
        assert_eq!(s.volumes[&root].state, VolumeState::Creating);
        let before = s.clone();
        let e = s
            .apply(Command::DeregisterImage {
                image: "img-1".into(),
            })
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("is being copied into volume {root}")),
            "{e}"
        );
        assert_eq!(s, before);
        for h in s.volumes[&root].replicas.clone() {
            let mut held = holding(&s, &h);
            held.insert(root.clone(), 1);
            report(&mut s, &h, held);
        }
        assert_eq!(s.volumes[&root].state, VolumeState::Available);
        s.apply(Command::DeregisterImage {
            image: "img-1".into(),
        })
        .unwrap();
    }

    #[test]
    fn boot_from_volume_makes_a_root_volume_and_a_stopped_instance_moves_when_its_host_is_gone() {
        let mut s = bootstrapped();
        disk_host(&mut s, "h1", "az-1", 100);
        disk_host(&mut s, "h2", "az-1", 100);
        add_image(&mut s);
        let mut seq = 0;
        let boot = RunSpec {
            az: "az-1".into(),
            root_volume: Some(BlockDeviceSpec {
                size_gib: 2,
                delete_on_termination: true,
                ..BlockDeviceSpec::default()
            }),
            ..spec()
        };
        // The image has no root disk: named, nothing changes.
        let before = s.clone();
        let e = run(&mut s, 1, &mut seq, boot.clone()).unwrap_err();
        assert!(
            e.to_string()
                .contains("root_volume: image img-1 has no root disk"),
            "{e}"
        );
        assert_eq!(s, before);
        s.images.get_mut("img-1").unwrap().rootdisk_path = "/images/root.raw".into();
        run(&mut s, 1, &mut seq, boot).unwrap();
        let i = s.instances.values().next().unwrap().clone();
        let root = i.root_volume.clone().expect("booted from a volume");
        let v = &s.volumes[&root];
        assert_eq!(v.source_image.as_deref(), Some("img-1"));
        assert_eq!(v.attachment.as_ref().unwrap().device, ROOT_DEVICE);
        assert_eq!(v.state, VolumeState::Creating);
        // Its replica hosts fill it from the image while it is made.
        let on = crate::api::hostvol::host_volumes(&s, &v.replicas[0]);
        assert_eq!(on.replicas[0].source_path, "/images/root.raw");
        for h in v.replicas.clone() {
            let mut held = holding(&s, &h);
            held.insert(root.clone(), 1);
            report(&mut s, &h, held);
        }
        assert_eq!(s.volumes[&root].state, VolumeState::InUse);
        let on = crate::api::hostvol::host_volumes(&s, "h1");
        assert_eq!(
            on.replicas[0].source_path, "",
            "made: resyncs come from peers"
        );
        // The root volume cannot be detached, even forced.
        let e = detach(&mut s, &root, true).unwrap_err();
        assert!(e.to_string().contains("is the root volume of"), "{e}");
        // Stopped on its host, which then goes away.
        let from = i.host_id.clone();
        let to = if from == "h1" { "h2" } else { "h1" };
        let see = |s: &mut ClusterState, state| {
            s.apply(Command::Observe {
                host_id: from.clone(),
                observed: vec![Observation {
                    instance_id: i.id.clone(),
                    state,
                    reason: String::new(),
                    stopped_by_guest: false,
                    seq: 0,
                    tap: String::new(),
                }],
            })
            .unwrap();
        };
        see(&mut s, ObservedState::Running);
        let set = |s: &mut ClusterState, desired| {
            s.apply(Command::SetDesired {
                ids: vec![i.id.clone()],
                desired,
            })
        };
        set(&mut s, DesiredState::Stopped).unwrap();
        see(&mut s, ObservedState::Stopped);
        s.apply(Command::MarkUnreachable {
            host_ids: vec![from.clone()],
        })
        .unwrap();
        let lost = &s.instances[&i.id];
        assert_eq!(lost.observed, ObservedState::Stopped, "known stopped");
        // Started: bound to the other host, absent there, capacity moved.
        let (vcpus_from, vcpus_to) = (s.hosts[&from].vcpus_allocated, s.hosts[to].vcpus_allocated);
        set(&mut s, DesiredState::Running).unwrap();
        let moved = &s.instances[&i.id];
        assert_eq!(
            (moved.host_id.as_str(), moved.observed),
            (to, ObservedState::Absent)
        );
        assert_eq!(s.hosts[&from].vcpus_allocated, vcpus_from - i.vcpus);
        assert_eq!(s.hosts[to].vcpus_allocated, vcpus_to + i.vcpus);
        // The old host's late report of it is not an observation of it.
        see(&mut s, ObservedState::Stopped);
        assert_eq!(s.instances[&i.id].observed, ObservedState::Absent);
        // Its volume is served by the new host now.
        let served = crate::api::hostvol::host_volumes(&s, to);
        assert_eq!(served.serve.len(), 1);
        assert!(crate::api::hostvol::host_volumes(&s, &from)
            .serve
            .is_empty());
    }

    #[test]
    fn a_start_that_cannot_move_changes_nothing_and_an_instance_store_instance_never_moves() {
        let mut s = bootstrapped();
        disk_host(&mut s, "h1", "az-1", 100);
        add_image(&mut s);
        s.images.get_mut("img-1").unwrap().rootdisk_path = "/images/root.raw".into();
        let mut seq = 0;
        let boot = RunSpec {
            az: "az-1".into(),
            root_volume: Some(BlockDeviceSpec {
                size_gib: 1,
                volume_type: "".into(),
                ..BlockDeviceSpec::default()
            }),
            ..spec()
        };
        // Two replicas need two hosts.
        let e = run(&mut s, 1, &mut seq, boot.clone()).unwrap_err();
        assert!(e.to_string().starts_with("root_volume: "), "{e}");
        disk_host(&mut s, "h2", "az-1", 100);
        run(&mut s, 1, &mut seq, boot).unwrap();
        run(
            &mut s,
            1,
            &mut seq,
            RunSpec {
                az: "az-1".into(),
                ..spec()
            },
        )
        .unwrap();
        let ids: Vec<String> = s.instances.keys().cloned().collect();
        for id in &ids {
            let host = s.instances[id].host_id.clone();
            s.apply(Command::SetDesired {
                ids: vec![id.clone()],
                desired: DesiredState::Stopped,
            })
            .unwrap();
            s.apply(Command::Observe {
                host_id: host,
                observed: vec![Observation {
                    instance_id: id.clone(),
                    state: ObservedState::Stopped,
                    reason: String::new(),
                    stopped_by_guest: false,
                    seq: 0,
                    tap: String::new(),
                }],
            })
            .unwrap();
        }
        s.apply(Command::MarkUnreachable {
            host_ids: vec!["h1".into(), "h2".into()],
        })
        .unwrap();
        let before = s.clone();
        let e = s
            .apply(Command::SetDesired {
                ids: ids.clone(),
                desired: DesiredState::Running,
            })
            .unwrap_err();
        assert!(
            e.to_string().contains("InsufficientInstanceCapacity"),
            "{e}"
        );
        assert_eq!(s, before, "nothing changed");
        // A host comes back: the volume-backed one moves there (or stays,
        // if that was its host); the instance-store one never moves.
        disk_host(&mut s, "h1", "az-1", 100);
        let homes: Vec<String> = ids.iter().map(|i| s.instances[i].host_id.clone()).collect();
        s.apply(Command::SetDesired {
            ids: ids.clone(),
            desired: DesiredState::Running,
        })
        .unwrap();
        for (id, home) in ids.iter().zip(homes) {
            let i = &s.instances[id];
            if i.root_volume.is_some() {
                assert_eq!(i.host_id, "h1");
            } else {
                assert_eq!(i.host_id, home, "instance-store: bound for life");
            }
        }
    }
}
