//! Real `ferro-controller` processes for multi-node tests: one config,
//! data directory and log per node under a scratch directory, every
//! process killed and everything removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on `ip`.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("cannot bind a loopback address")
        .local_addr()
        .unwrap()
        .port()
}

/// Controller processes on loopback addresses.
pub struct Procs {
    /// The scratch directory (configs `n<i>.toml`, data `n<i>/`, logs).
    pub dir: PathBuf,
    /// `ip:port` of each node; node `i + 1` is at index `i`.
    pub addrs: Vec<String>,
    /// `http` or `https`.
    pub scheme: &'static str,
    bin: PathBuf,
    children: Vec<Option<Child>>,
}

impl Procs {
    /// Writes the configuration of one node per address in `ips` (node
    /// ids 1, 2, ...). The first `initial` nodes are the cluster's initial
    /// members; a later node knows them and itself and waits to be added.
    /// `extra` is appended to every node's TOML (`dir` is the scratch
    /// directory). Nothing is started.
    pub fn new(
        name: &str,
        ips: &[&str],
        initial: usize,
        extra: impl Fn(&PathBuf) -> String,
    ) -> Self {
        let bin = ferro_testkit::workspace_bin("ferro-controller", "ferro-controller");
        let dir = ferro_testkit::scratch(name);
        let addrs: Vec<String> = ips
            .iter()
            .map(|ip| format!("{ip}:{}", free_port(ip)))
            .collect();
        let peers: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("\"{}={a}\"", i + 1))
            .collect();
        let extra = extra(&dir);
        for (i, addr) in addrs.iter().enumerate() {
            let mut members = peers[..initial].to_vec();
            if i >= initial {
                members.push(peers[i].clone());
            }
            let data = dir.join(format!("n{}", i + 1));
            std::fs::create_dir_all(&data).unwrap();
            // `{ip}` in the extra lines is each node's own address.
            let ip = addr.rsplit_once(':').map_or("", |(h, _)| h);
            let cfg = format!(
                "node_id = {id}\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\npeers = [{members}]\n{extra}",
                id = i + 1,
                data = data.display(),
                members = members.join(", "),
                extra = extra.replace("{ip}", ip),
            );
            std::fs::write(dir.join(format!("n{}.toml", i + 1)), cfg).unwrap();
        }
        let scheme = if extra.contains("tls_cert_file") {
            "https"
        } else {
            "http"
        };
        Self {
            children: addrs.iter().map(|_| None).collect(),
            dir,
            addrs,
            scheme,
            bin,
        }
    }

    /// Starts node index `i` (its log appended to `n<i+1>.log`).
    pub fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{}.log", i + 1)))
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(self.dir.join(format!("n{}.toml", i + 1)))
            .env("FERRO_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start ferro-controller");
        self.children[i] = Some(child);
    }

    /// SIGKILL node index `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        let mut child = self.children[i].take().expect("node is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Send `sig` (e.g. "STOP", "CONT") to node index `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        let child = self.children[i].as_ref().expect("node is running");
        let ok = ferro_testkit::tool("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .expect("cannot run kill")
            .success();
        assert!(ok, "kill -{sig} of node {} failed", i + 1);
    }

    /// The URL of node index `i`.
    pub fn url(&self, i: usize) -> String {
        format!("{}://{}", self.scheme, self.addrs[i])
    }

    /// The URLs of the nodes at `indexes`.
    pub fn urls(&self, indexes: &[usize]) -> Vec<String> {
        indexes.iter().map(|&i| self.url(i)).collect()
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        (1..=self.addrs.len())
            .map(|i| {
                let text =
                    std::fs::read_to_string(self.dir.join(format!("n{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- node {i} ---\n{}\n", tail.join("\n"))
            })
            .collect()
    }

    /// What node index `i` says of itself (ClusterStatus), if it answers
    /// within 2 s.
    pub async fn status(
        &self,
        i: usize,
        key: &str,
    ) -> Option<ferro_proto::compute::v1::ClusterStatusResponse> {
        use ferro_proto::compute::v1 as pb;
        let ch = tonic::transport::Channel::from_shared(self.url(i))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .connect_lazy();
        pb::cluster_client::ClusterClient::with_interceptor(ch, super::Bearer::new(key))
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// The node among `among` (indexes) that says it leads, if one does.
    pub async fn leader(&self, key: &str, among: &[usize]) -> Option<usize> {
        for &i in among {
            let s = self.status(i, key).await;
            if s.and_then(|s| s.node).is_some_and(|n| n.role == "leader") {
                return Some(i);
            }
        }
        None
    }

    /// Waits up to `secs` for a leader among `among`; panics with the
    /// nodes' logs.
    pub async fn wait_leader(&self, key: &str, among: &[usize], secs: u64) -> usize {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(i) = self.leader(key, among).await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no leader among nodes {among:?} after {secs} s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The admin API key, once the node that bootstrapped wrote it.
    pub async fn admin_key(&self, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let key = (1..=self.addrs.len()).find_map(|i| {
                std::fs::read_to_string(self.dir.join(format!("n{i}/admin.key")))
                    .ok()
                    .map(|k| k.trim().to_string())
                    .filter(|k| !k.is_empty())
            });
            if let Some(k) = key {
                return k;
            }
            assert!(
                Instant::now() < deadline,
                "no node bootstrapped the cluster in {secs} s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
