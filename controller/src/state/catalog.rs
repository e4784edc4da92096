//! The catalog: images, key pairs, placement groups and tags.

use super::*;

impl ClusterState {
    /// An image by id or name.
    pub fn find_image(&self, id_or_name: &str) -> Option<&Image> {
        self.images
            .get(id_or_name)
            .or_else(|| self.images.values().find(|i| i.name == id_or_name))
    }

    pub(super) fn register_image(&mut self, image: Image) -> Response {
        check_name("name", &image.name)?;
        check_tags(&image.tags)?;
        if !image.kernel_path.starts_with('/') {
            return invalid("kernel_path: must be an absolute path");
        }
        for (f, p) in [
            ("initrd_path", &image.initrd_path),
            ("rootdisk_path", &image.rootdisk_path),
        ] {
            if !p.is_empty() && !p.starts_with('/') {
                return invalid(format!("{f}: must be an absolute path"));
            }
        }
        if self.find_image(&image.name).is_some() || self.images.contains_key(&image.id) {
            return Err(E::AlreadyExists(format!(
                "name: an image {:?} exists",
                image.name
            )));
        }
        self.images.insert(image.id.clone(), image.clone());
        Ok(Output::Image(image))
    }

    pub(super) fn deregister_image(&mut self, id_or_name: &str) -> Response {
        let Some(id) = self.find_image(id_or_name).map(|i| i.id.clone()) else {
            return Err(E::NotFound(format!("image_id: no image {id_or_name:?}")));
        };
        if let Some(user) = self
            .instances
            .values()
            .find(|i| i.image_id == id && !i.is_final())
        {
            return Err(E::FailedPrecondition(format!(
                "image_id: {id} is used by instance {}",
                user.id
            )));
        }
        // A root volume still being filled from it needs its file on the
        // replica hosts (a replica is never made blank in its place).
        if let Some(v) = self.volumes.values().find(|v| {
            v.state == VolumeState::Creating && v.source_image.as_deref() == Some(id.as_str())
        }) {
            return Err(E::FailedPrecondition(format!(
                "image_id: {id} is being copied into volume {}; deregister it once that is available",
                v.id
            )));
        }
        self.images.remove(&id);
        Ok(Output::Done)
    }

    pub(super) fn add_key_pair(&mut self, k: KeyPair) -> Response {
        check_name("key_name", &k.name)?;
        check_tags(&k.tags)?;
        if self.key_pairs.contains_key(&k.name) {
            return Err(E::AlreadyExists(format!(
                "key_name: a key pair {:?} exists",
                k.name
            )));
        }
        self.key_pairs.insert(k.name.clone(), k.clone());
        Ok(Output::KeyPair(k))
    }

    pub(super) fn create_group(&mut self, g: PlacementGroup) -> Response {
        check_name("name", &g.name)?;
        check_tags(&g.tags)?;
        if self.groups.contains_key(&g.name) {
            return Err(E::AlreadyExists(format!(
                "name: a placement group {:?} exists",
                g.name
            )));
        }
        self.groups.insert(g.name.clone(), g.clone());
        Ok(Output::Group(g))
    }

    pub(super) fn delete_group(&mut self, name: &str) -> Response {
        let Some(g) = self.groups.get(name) else {
            return Err(E::NotFound(format!("name: no placement group {name:?}")));
        };
        if let Some(m) = g.members.iter().next() {
            return Err(E::FailedPrecondition(format!(
                "name: placement group {name:?} still holds instance {m}"
            )));
        }
        self.groups.remove(name);
        Ok(Output::Done)
    }

    /// The tags of resource `id`, whatever its kind.
    pub(super) fn tags_mut(&mut self, id: &str) -> Option<&mut Tags> {
        if let Some(i) = self.instances.get_mut(id) {
            return Some(&mut i.tags);
        }
        if let Some(i) = self.images.get_mut(id) {
            return Some(&mut i.tags);
        }
        if let Some(k) = self.key_pairs.values_mut().find(|k| k.id == id) {
            return Some(&mut k.tags);
        }
        if let Some(g) = self.groups.values_mut().find(|g| g.id == id) {
            return Some(&mut g.tags);
        }
        if let Some(v) = self.vpcs.get_mut(id) {
            return Some(&mut v.tags);
        }
        if let Some(s) = self.subnets.get_mut(id) {
            return Some(&mut s.tags);
        }
        if let Some(g) = self.security_groups.get_mut(id) {
            return Some(&mut g.tags);
        }
        if let Some(v) = self.volumes.get_mut(id) {
            return Some(&mut v.tags);
        }
        self.hosts.get_mut(id).map(|h| &mut h.tags)
    }

    pub(super) fn check_resources(&mut self, ids: &[String]) -> Result<(), StateError> {
        if ids.is_empty() {
            return invalid("resource_ids: at least one id is required");
        }
        for id in ids {
            if self.tags_mut(id).is_none() {
                return Err(E::NotFound(format!("resource_ids: no resource {id:?}")));
            }
        }
        Ok(())
    }

    pub(super) fn create_tags(&mut self, ids: &[String], tags: Tags) -> Response {
        check_tags(&tags)?;
        self.check_resources(ids)?;
        for id in ids {
            let t = self.tags_mut(id).expect("checked above");
            let mut merged = t.clone();
            merged.extend(tags.clone());
            check_tags(&merged)?;
        }
        for id in ids {
            self.tags_mut(id)
                .expect("checked above")
                .extend(tags.clone());
        }
        Ok(Output::Done)
    }

    pub(super) fn delete_tags(&mut self, ids: &[String], tags: &[(String, String)]) -> Response {
        self.check_resources(ids)?;
        for id in ids {
            let t = self.tags_mut(id).expect("checked above");
            for (k, v) in tags {
                if v.is_empty() || t.get(k) == Some(v) {
                    t.remove(k);
                }
            }
        }
        Ok(Output::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use ferro_raft::StateMachine;

    #[test]
    fn tags_on_any_resource() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 4, 4096);
        add_image(&mut s);
        let tags: Tags = [("env".to_string(), "prod".to_string())].into();
        s.apply(Command::CreateDefaultVpc {
            vpc_id: "vpc-d".into(),
            subnet_ids: vec!["subnet-d1".into(), "subnet-d2".into()],
            now_ms: 1,
        })
        .unwrap();
        let sg = default_group_id("vpc-d");
        s.apply(Command::CreateTags {
            resource_ids: vec!["h1".into(), "img-1".into(), sg.clone()],
            tags: tags.clone(),
        })
        .unwrap();
        assert_eq!(s.hosts["h1"].tags, tags);
        assert_eq!(s.security_groups[&sg].tags, tags);
        let e = s.apply(Command::CreateTags {
            resource_ids: vec!["nope".into()],
            tags,
        });
        assert!(matches!(e, Err(StateError::NotFound(_))));
        s.apply(Command::DeleteTags {
            resource_ids: vec!["h1".into()],
            tags: vec![("env".into(), String::new())],
        })
        .unwrap();
        assert!(s.hosts["h1"].tags.is_empty());
    }
}
