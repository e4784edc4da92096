//! `ferro up`: the all-in-one cloud on this machine.
//!
//! Starts a single-node `ferro-controller`, one `ferro-agent` and its
//! host's `ferro-netd` and `ferro-blockd` (volumes of type `single`, one
//! replica: there is one host) as child processes (binaries next to `ferro`), with
//! the configs it writes under the data directory ([`files`]); waits until
//! they are healthy; registers the test guest as an image whose command
//! line has `ferro.exit=idle`; launches an instance with a key pair into
//! the default VPC, waits for `running`, describes it and prints its
//! console, which shows the guest's DHCP lease and what it read from the
//! metadata service (its instance id, its key). Then it stays in the foreground until Ctrl-C (or SIGTERM),
//! terminates every instance of the cloud (unless `--keep`, which leaves
//! them for the next `ferro up` on the data directory to resume) and stops
//! the daemons. With `--demo` it does not wait for Ctrl-C.

pub mod files;
pub mod host;
pub mod supervise;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_client::ComputeClient;

use crate::args::Up;
use crate::client::{Client, ClientError};
use crate::commands::{self, CommandError};
use crate::config::Config;
use crate::spinner::Spinner;
use files::Layout;
use host::{guest_kernel, preflight, Binaries};
use supervise::{Daemon, SuperviseError};

/// The name the test guest is registered under.
pub const IMAGE_NAME: &str = "ferro-test-guest";
/// Kernel command line extras of the test image: stay up after the self-test.
pub const IMAGE_CMDLINE: &str = "ferro.exit=idle";
/// The guest's console line that ends its self-test.
pub const SELFTEST_DONE: &str = "ferro-guest: selftest done";
/// The guest's console lines that end its metadata reads (the last path,
/// or giving up).
pub const METADATA_DONE: [&str; 2] = [
    "ferro-guest: imds public-keys/0/openssh-key",
    "ferro-guest: imds failed",
];
/// The demo instance's key pair.
pub const KEY_NAME: &str = "ferro-up";
/// How long to wait for the guest's network lines after its self-test.
const NETWORK_WAIT: Duration = Duration::from_secs(30);
/// How long a daemon gets between SIGTERM and SIGKILL (more than
/// blockd's own 20 s limit for closing its volumes).
const STOP_GRACE: Duration = Duration::from_secs(25);

/// Why `ferro up` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// Not root or no usable /dev/kvm.
    #[error("ferro up needs {0}")]
    Preflight(String),
    /// A binary is not next to `ferro`.
    #[error("{} not found (build it: cargo build -p {package})", .0.display(), package = .1)]
    MissingBinary(PathBuf, &'static str),
    /// The test guest could not be found or built.
    #[error("cannot get the test guest kernel: {0}")]
    Guest(String),
    /// The data directory.
    #[error(transparent)]
    Files(#[from] files::FilesError),
    /// A daemon.
    #[error(transparent)]
    Daemon(#[from] SuperviseError),
    /// A call to the controller.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Something did not happen in time.
    #[error("timed out after {}s waiting for {what}", .0.as_secs(), what = .1)]
    Timeout(Duration, String),
    /// Signal handlers.
    #[error("cannot install signal handlers")]
    Signal(#[source] std::io::Error),
    /// Ctrl-C or SIGTERM before the all-in-one was up.
    #[error("interrupted")]
    Interrupted,
    /// The controller's address is taken.
    #[error(
        "--listen {0}: {1} (another `ferro up`? pass another address, or port 0 for any free one)"
    )]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
    /// The EC2 endpoint's address is taken.
    #[error(
        "--ec2-listen {0}: {1} (another `ferro up`? pass another address, or port 0 for any free one)"
    )]
    Ec2Listen(std::net::SocketAddr, #[source] std::io::Error),
    /// The guest never finished its self-test.
    #[error("the guest's console never showed `{SELFTEST_DONE}`; it was:\n{0}")]
    Selftest(String),
}

impl From<ClientError> for UpError {
    fn from(e: ClientError) -> Self {
        UpError::Command(e.into())
    }
}

/// The running daemons, stopped in order (agent, blockd, netd, then
/// controller).
#[derive(Debug, Default)]
struct Daemons {
    controller: Option<Daemon>,
    agent: Option<Daemon>,
    netd: Option<Daemon>,
    blockd: Option<Daemon>,
}

impl Daemons {
    fn check(&mut self) -> Result<(), SuperviseError> {
        for d in [
            &mut self.controller,
            &mut self.agent,
            &mut self.netd,
            &mut self.blockd,
        ]
        .into_iter()
        .flatten()
        {
            d.check()?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), SuperviseError> {
        for d in [
            self.agent.take(),
            self.blockd.take(),
            self.netd.take(),
            self.controller.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut d = d;
            note(&format!("stopping {}", d.name()));
            d.stop(STOP_GRACE)?;
        }
        Ok(())
    }
}

/// An API key for the EC2 endpoint, made once per data directory and kept
/// in [`Layout::ec2_env`]; printed for `aws configure`.
async fn ec2_credentials(client: &mut Client, layout: &Layout) -> Result<(), UpError> {
    let path = layout.ec2_env();
    let endpoint = layout.ec2_endpoint();
    let kept = std::fs::read_to_string(&path)
        .ok()
        .filter(|t| t.contains("AWS_SECRET_ACCESS_KEY="));
    let text = match kept {
        Some(t) => {
            t.lines()
                .map(|l| match l.split_once('=') {
                    Some(("FERRO_EC2_ENDPOINT", _)) => format!("FERRO_EC2_ENDPOINT={endpoint}"),
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        }
        None => {
            let req = pb::CreateApiKeyRequest {
                name: format!("ec2-{}", files::AIO_HOST_ID),
                role: "user".into(),
                ..Default::default()
            };
            let r = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).create_api_key(req).await }
                })
                .await
                .map_err(CommandError::from)?;
            let id = r.key.map(|k| k.id).unwrap_or_default();
            format!(
                "AWS_ACCESS_KEY_ID={id}\nAWS_SECRET_ACCESS_KEY={}\nAWS_DEFAULT_REGION=local\n\
                 FERRO_EC2_ENDPOINT={endpoint}\n",
                r.ec2_secret_access_key
            )
        }
    };
    files::write_private(&path, &text)?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    };
    note(&format!(
        "EC2 endpoint {endpoint} (region local): access key id {}, secret access key {} \
         (in {}; e.g. `set -a; . {}; aws ec2 describe-instances --endpoint-url {endpoint}`)",
        field("AWS_ACCESS_KEY_ID"),
        field("AWS_SECRET_ACCESS_KEY"),
        path.display(),
        path.display()
    ));
    Ok(())
}

/// Progress for people, on stderr.
fn note(msg: &str) {
    eprintln!("== {msg}");
}

/// Runs `ferro up`.
pub async fn run(up: Up) -> Result<(), UpError> {
    preflight()?;
    let bins = Binaries::find()?;
    let kernel = guest_kernel(up.image_kernel.as_deref())?;
    let mut layout = Layout::with_listen(&up.data_dir, up.listen)?;
    if up.ec2_listen.port() != 0 {
        layout.ec2_addr = up.ec2_listen;
    }
    if let Err(e) = std::net::TcpListener::bind(layout.ec2_addr) {
        return Err(UpError::Ec2Listen(layout.ec2_addr, e));
    }
    if let Err(e) = std::net::TcpListener::bind(layout.controller_addr) {
        return Err(UpError::Listen(layout.controller_addr, e));
    }
    layout.create_dirs()?;
    // From here on Ctrl-C must not kill `ferro` before it has stopped its
    // children.
    let mut signals = Signals::install()?;
    let mut daemons = Daemons::default();
    let result = tokio::select! {
        r = bring_up(&up, &bins, &kernel, &layout, &mut daemons) => r,
        () = signals.recv() => Err(UpError::Interrupted),
    };
    let result = match result {
        Ok(mut launched) => {
            let ctx = Context {
                up: &up,
                layout: &layout,
            };
            finish(ctx, &mut launched, &mut daemons, &mut signals).await
        }
        Err(e) => Err(e),
    };
    if !up.keep || up.demo {
        // netd removes a VPC's devices once nothing of it is left here;
        // give it a moment to see the instances gone.
        wait_netd_clean(&layout.netd_prefix).await;
    }
    let stopped = daemons.stop();
    if !up.keep || up.demo {
        // netd leaves its (now empty) nftables tables: it never tears the
        // dataplane down on its own.
        let table = format!("ferro_{}", layout.netd_prefix);
        for family in ["bridge", "ip"] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", family, &table])
                .stderr(std::process::Stdio::null())
                .status();
        }
        // The agent leaves its (now empty) cgroup parent behind.
        for d in files::cgroup_dirs(&layout.cgroup_parent) {
            let _ = std::fs::remove_dir(d);
        }
    }
    result?;
    stopped?;
    note("done");
    Ok(())
}

/// What was launched (to terminate on the way out).
#[derive(Debug)]
struct Launched {
    client: Client,
    instances: Vec<String>,
    key: String,
}

async fn bring_up(
    up: &Up,
    bins: &Binaries,
    kernel: &Path,
    layout: &Layout,
    daemons: &mut Daemons,
) -> Result<Launched, UpError> {
    let timeout = Duration::from_secs(up.timeout);
    files::write_private(&layout.controller_config(), &files::controller_toml(layout))?;

    note(&format!(
        "starting ferro-controller on {} (log {})",
        layout.endpoint(),
        layout.log("controller").display()
    ));
    daemons.controller = Some(spawn(
        "ferro-controller",
        &bins.controller,
        &layout.controller_config(),
        &layout.log("controller"),
    )?);
    // The controller writes the admin key when it bootstraps the cluster
    // (on the first run with this data directory).
    let key_file = layout.admin_key();
    wait_healthy(daemons, timeout, "the controller's admin key", || {
        let exists = key_file.is_file();
        async move {
            exists
                .then_some(())
                .ok_or_else(|| "no admin.key yet".to_string())
        }
    })
    .await?;
    let key = std::fs::read_to_string(&key_file)
        .map_err(|e| files::FilesError::Read(key_file.clone(), e))?
        .trim()
        .to_string();
    files::write_private(&layout.client_config(), &files::client_toml(layout, &key))?;
    let cfg = Config {
        endpoint: layout.endpoint(),
        endpoints: vec![layout.endpoint()],
        api_key: Some(key.clone()),
        ca_file: None,
        endpoint_is_default: false,
    };
    let mut client = Client::new(&cfg).map_err(CommandError::from)?;
    wait_healthy(daemons, timeout, "the controller to answer", || {
        let mut c = client.clone();
        async move {
            let r = c
                .call(|ch| async move {
                    ComputeClient::new(ch)
                        .describe_availability_zones(pb::DescribeAvailabilityZonesRequest {})
                        .await
                })
                .await;
            r.map(|_| ()).map_err(|e| e.to_string())
        }
    })
    .await?;

    let vcpus = up
        .vcpus
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    // The host joins with a one-time token, as any host does; a data dir
    // whose agent joined before keeps its credentials and ignores it.
    let join = pb::CreateJoinTokenRequest {
        host_id: files::AIO_HOST_ID.into(),
        ttl_seconds: 600,
    };
    let token = client
        .call(|ch| {
            let join = join.clone();
            async move { ComputeClient::new(ch).create_join_token(join).await }
        })
        .await
        .map_err(CommandError::from)?
        .token;
    let agent_cfg = files::agent_toml(layout, &bins.vmm, vcpus, up.memory, up.volume_gib, &token);
    files::write_private(&layout.agent_config(), &agent_cfg)?;
    note(&format!(
        "starting ferro-agent on {} (log {})",
        layout.agent_addr,
        layout.log("agent").display()
    ));
    daemons.agent = Some(spawn(
        "ferro-agent",
        &bins.agent,
        &layout.agent_config(),
        &layout.log("agent"),
    )?);
    // A data directory of an earlier run keeps its host record healthy
    // with the earlier agent's address until the new agent's first
    // heartbeat: wait for that heartbeat (its address), or calls the
    // controller relays to the agent (console output) go to a dead port.
    let port = format!(":{}", layout.agent_addr.port());
    wait_healthy(daemons, timeout, "the agent's first heartbeat", || {
        let mut c = client.clone();
        let port = port.clone();
        async move {
            let r = c
                .call(|ch| async move {
                    ComputeClient::new(ch)
                        .describe_hosts(pb::DescribeHostsRequest::default())
                        .await
                })
                .await;
            let healthy = pb::HostHealth::Healthy as i32;
            let this_agent = |h: &pb::Host| {
                h.health == healthy && h.address.trim_end_matches('/').ends_with(&port)
            };
            match r {
                Ok(h) if h.hosts.iter().any(this_agent) => Ok(()),
                Ok(h) => Err(format!(
                    "{} hosts, none healthy at the agent's address{port}",
                    h.hosts.len()
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await?;
    files::write_private(&layout.netd_config(), &files::netd_toml(layout))?;
    note(&format!(
        "starting ferro-netd (log {})",
        layout.log("netd").display()
    ));
    daemons.netd = Some(spawn(
        "ferro-netd",
        &bins.netd,
        &layout.netd_config(),
        &layout.log("netd"),
    )?);

    if up.volume_gib > 0 {
        start_blockd(bins, layout, daemons, timeout).await?;
    }

    ec2_credentials(&mut client, layout).await?;
    let image = ensure_image(&mut client, kernel).await?;
    note(&format!(
        "image {} ({}) registered: {}",
        image.name, image.image_id, image.kernel_path
    ));
    // A data directory an earlier `ferro up --keep` left running: resume
    // its instances instead of launching another.
    let earlier = live_instances(&mut client).await?;
    if !earlier.is_empty() && !up.demo {
        note(&format!(
            "resuming the instances an earlier `ferro up --keep` left: {}",
            earlier.join(", ")
        ));
        return Ok(Launched {
            instances: earlier,
            client,
            key,
        });
    }
    let itype = smallest_type(&mut client).await?;
    let key_name = ensure_key_pair(&mut client, layout).await?;
    let req = pb::RunInstancesRequest {
        count: 1,
        instance_type: itype.clone(),
        image_id: image.image_id.clone(),
        key_name,
        client_token: commands::client_token(),
        tags: vec![pb::Tag {
            key: "launched-by".into(),
            value: "ferro-up".into(),
        }],
        ..Default::default()
    };
    let resp = client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).run_instances(req).await }
        })
        .await?;
    let launched = Launched {
        instances: resp
            .instances
            .iter()
            .map(|i| i.instance_id.clone())
            .collect(),
        client,
        key,
    };
    note(&format!(
        "launched {} ({itype})",
        launched.instances.join(", ")
    ));
    Ok(launched)
}

/// Waits for running, shows the instance and its console, then (unless
/// `--demo`) waits for Ctrl-C; terminates unless `--keep`.
async fn finish(
    ctx: Context<'_>,
    launched: &mut Launched,
    daemons: &mut Daemons,
    signals: &mut Signals,
) -> Result<(), UpError> {
    let Context { up, layout } = ctx;
    let key = launched.key.clone();
    let mut outcome = tokio::select! {
        r = show(up, launched, daemons) => r,
        () = signals.recv() => Err(UpError::Interrupted),
    };
    if outcome.is_ok() && !up.demo {
        let ferro = std::env::current_exe().unwrap_or_else(|_| "ferro".into());
        eprintln!(
            "\nThe cloud is up. In another shell:\n  {} --config {} instances list\n\
             (endpoint {}, admin key {key}). Ctrl-C stops it{}.",
            ferro.display(),
            layout.client_config().display(),
            layout.endpoint(),
            if up.keep {
                "; every instance keeps running for the next `ferro up` on this data directory"
            } else {
                " and terminates every instance"
            },
        );
        outcome = wait_for_signal(daemons, signals).await;
    }
    let keep = up.keep && !up.demo && outcome.is_ok();
    // Every instance of this cloud, not only the one launched here.
    if let Ok(all) = live_instances(&mut launched.client).await {
        for id in all {
            if !launched.instances.contains(&id) {
                launched.instances.push(id);
            }
        }
    }
    if !launched.instances.is_empty() {
        note(&format!("still running: {}", launched.instances.join(", ")));
    }
    let terminated = if keep {
        if !launched.instances.is_empty() {
            note(&format!(
                "left running (--keep): `ferro up --data-dir {}` resumes them",
                layout.root.display()
            ));
        }
        Ok(())
    } else {
        tokio::select! {
            r = terminate(up, launched) => r,
            () = signals.recv() => Err(UpError::Interrupted),
        }
    };
    outcome.and(terminated)
}

/// What `finish` needs to know.
#[derive(Clone, Copy)]
struct Context<'a> {
    up: &'a Up,
    layout: &'a Layout,
}

/// SIGINT and SIGTERM, caught for the whole run.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, UpError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt()).map_err(UpError::Signal)?,
            term: signal(SignalKind::terminate()).map_err(UpError::Signal)?,
        })
    }

    /// The next SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

async fn show(up: &Up, launched: &mut Launched, daemons: &mut Daemons) -> Result<(), UpError> {
    let timeout = Duration::from_secs(up.timeout);
    let client = &mut launched.client;
    let ids = launched.instances.clone();
    let wait = crate::args::Wait {
        wait: true,
        timeout: up.timeout,
    };
    let waited = commands::wait_state(client, &ids, pb::InstanceState::Running, wait);
    tokio::select! {
        r = waited => { r?; }
        e = watch_daemons(daemons) => return Err(e.into()),
    }
    let req = pb::DescribeInstancesRequest {
        instance_ids: ids.clone(),
        ..Default::default()
    };
    let list = commands::describe_all(client, req).await?;
    for i in &list {
        print!("{}", crate::output::instance_detail(i));
    }
    let id = ids.first().cloned().unwrap_or_default();
    let console = wait_console(client, &id, timeout).await?;
    println!("== console of {id}:");
    print!("{console}");
    if !console.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// Every instance of the cloud that is not terminated (or shutting down).
async fn live_instances(client: &mut Client) -> Result<Vec<String>, UpError> {
    let gone = [
        pb::InstanceState::Terminated as i32,
        pb::InstanceState::ShuttingDown as i32,
    ];
    let list = commands::describe_all(client, pb::DescribeInstancesRequest::default()).await?;
    Ok(list
        .into_iter()
        .filter(|i| !gone.contains(&i.state))
        .map(|i| i.instance_id)
        .collect())
}

/// The demo key pair: made once (its private key kept in the data
/// directory for `ssh -i`), then reused.
async fn ensure_key_pair(client: &mut Client, layout: &Layout) -> Result<String, UpError> {
    let have = client
        .call(|ch| async move {
            ComputeClient::new(ch)
                .describe_key_pairs(pb::DescribeKeyPairsRequest::default())
                .await
        })
        .await?;
    if have.key_pairs.iter().any(|k| k.key_name == KEY_NAME) {
        return Ok(KEY_NAME.into());
    }
    let req = pb::CreateKeyPairRequest {
        key_name: KEY_NAME.into(),
        tags: vec![],
    };
    let made = client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).create_key_pair(req).await }
        })
        .await?;
    files::write_private(&layout.demo_key(), &made.private_key)?;
    note(&format!(
        "key pair {KEY_NAME} made (private key {})",
        layout.demo_key().display()
    ));
    Ok(KEY_NAME.into())
}

/// Waits (a few seconds at most) until no netd device of `prefix` is left.
async fn wait_netd_clean(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let left = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
            })
            .unwrap_or(false);
        if !left {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the console (through the controller) until the self-test is done
/// and then, for a while, until the guest has read the metadata service.
async fn wait_console(client: &mut Client, id: &str, timeout: Duration) -> Result<String, UpError> {
    let deadline = Instant::now() + timeout;
    let mut network_deadline = None;
    let mut spinner = Spinner::stderr();
    loop {
        let out = commands::console_bytes(client, id).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.contains(SELFTEST_DONE) {
            if has_whole_line(&text, &METADATA_DONE) {
                return Ok(text);
            }
            let until = *network_deadline.get_or_insert_with(|| Instant::now() + NETWORK_WAIT);
            if Instant::now() >= until {
                return Ok(text);
            }
            spinner.tick(&format!("waiting for {id}'s DHCP lease and metadata"));
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        if Instant::now() >= deadline {
            return Err(UpError::Selftest(text));
        }
        spinner.tick(&format!("waiting for the guest's self-test on {id}"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether a line of `text` starts with one of `prefixes` and is whole
/// (the serial console may be read in the middle of a line).
fn has_whole_line(text: &str, prefixes: &[&str]) -> bool {
    text.split_inclusive('\n')
        .any(|l| l.ends_with('\n') && prefixes.iter().any(|p| l.starts_with(p)))
}

async fn terminate(up: &Up, launched: &mut Launched) -> Result<(), UpError> {
    let client = &mut launched.client;
    if launched.instances.is_empty() {
        return Ok(());
    }
    note(&format!("terminating {}", launched.instances.join(", ")));
    commands::terminate_and_wait(client, &launched.instances, Duration::from_secs(up.timeout))
        .await?;
    launched.instances.clear();
    Ok(())
}

/// Ctrl-C or SIGTERM, or a daemon dying (an error).
async fn wait_for_signal(daemons: &mut Daemons, signals: &mut Signals) -> Result<(), UpError> {
    tokio::select! {
        () = signals.recv() => {}
        e = watch_daemons(daemons) => return Err(e.into()),
    }
    eprintln!();
    note("shutting down");
    Ok(())
}

/// Resolves only when a daemon has exited.
async fn watch_daemons(daemons: &mut Daemons) -> SuperviseError {
    loop {
        if let Err(e) = daemons.check() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls `probe` until it succeeds, a daemon dies or `timeout`; its
/// error is the status shown when time runs out.
async fn wait_healthy<F, Fut>(
    daemons: &mut Daemons,
    timeout: Duration,
    what: &str,
    mut probe: F,
) -> Result<(), UpError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    let mut spinner = Spinner::stderr();
    loop {
        daemons.check()?;
        let last = match probe().await {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            return Err(UpError::Timeout(timeout, format!("{what} (last: {last})")));
        }
        spinner.tick(&format!("waiting for {what}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Registers the test guest, or finds it registered by an earlier run.
async fn ensure_image(client: &mut Client, kernel: &Path) -> Result<pb::Image, UpError> {
    let req = commands::register_request(IMAGE_NAME, kernel, None, None, IMAGE_CMDLINE, Vec::new());
    match commands::register_image(client, req).await {
        Ok(img) => Ok(img),
        Err(e) if e.status().map(|s| s.code()) == Some(tonic::Code::AlreadyExists) => {
            let req = pb::DescribeImagesRequest {
                image_ids: vec![IMAGE_NAME.into()],
            };
            let resp = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).describe_images(req).await }
                })
                .await?;
            resp.images.into_iter().next().ok_or_else(|| e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The instance type with the least memory (then vCPUs).
async fn smallest_type(client: &mut Client) -> Result<String, UpError> {
    let resp = client
        .call(|ch| async move {
            ComputeClient::new(ch)
                .describe_instance_types(pb::DescribeInstanceTypesRequest::default())
                .await
        })
        .await?;
    resp.instance_types
        .iter()
        .min_by_key(|t| (t.memory_mib, t.vcpus))
        .map(|t| t.name.clone())
        .ok_or_else(|| CommandError::Usage("the controller offers no instance types".into()).into())
}

fn spawn(name: &str, bin: &Path, config: &Path, log: &Path) -> Result<Daemon, SuperviseError> {
    spawn_args(
        name,
        bin,
        &["--config".to_string(), config.display().to_string()],
        log,
    )
}

fn spawn_args(
    name: &str,
    bin: &Path,
    args: &[String],
    log: &Path,
) -> Result<Daemon, SuperviseError> {
    let level = std::env::var("FERRO_LOG").unwrap_or_else(|_| "info".into());
    Daemon::spawn(name, bin, args, &[("FERRO_LOG", &level)], log)
}

/// Starts ferro-blockd for the host: it speaks for the host with the key
/// the agent's join brought (so it starts once the host is healthy), keeps
/// the replicas in `<data>/blockd` and serves its replica server on the
/// loopback (no other host reaches it).
async fn start_blockd(
    bins: &Binaries,
    layout: &Layout,
    daemons: &mut Daemons,
    timeout: Duration,
) -> Result<(), UpError> {
    let key = layout.host_key();
    wait_healthy(daemons, timeout, "the host's key from its join", || {
        let exists = key.is_file();
        async move {
            exists
                .then_some(())
                .ok_or_else(|| "no host.key yet".to_string())
        }
    })
    .await?;
    note(&format!(
        "starting ferro-blockd (log {})",
        layout.log("blockd").display()
    ));
    let args = [
        "--controller".to_string(),
        layout.endpoint(),
        "--host-id".into(),
        files::AIO_HOST_ID.into(),
        "--api-key-file".into(),
        key.display().to_string(),
        "--data-dir".into(),
        layout.blockd_dir().display().to_string(),
        "--replica-listen".into(),
        "127.0.0.1:0".into(),
    ];
    daemons.blockd = Some(spawn_args(
        "ferro-blockd",
        &bins.blockd,
        &args,
        &layout.log("blockd"),
    )?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metadata_line_counts_once_it_is_whole() {
        let half = "ferro-guest: selftest done\nferro-guest: imds public-keys/0/openssh-key=ssh-e";
        assert!(!has_whole_line(half, &METADATA_DONE));
        let whole = format!("{half}d25519 AAAA\n");
        assert!(has_whole_line(&whole, &METADATA_DONE));
        assert!(has_whole_line(
            "x\nferro-guest: imds failed: timeout\n",
            &METADATA_DONE
        ));
        assert!(!has_whole_line(
            "ferro-guest: imds instance-id=i-1\n",
            &METADATA_DONE
        ));
    }
}
