//! The command tree (`ferro <area> <verb>`), parsed by clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The heading of the options that only controller commands use (`ferro
/// up` refuses them).
pub const CLIENT_OPTIONS: &str = "Controller client options (not for `ferro up`)";

/// Ferrocloud's command-line client.
#[derive(Debug, Parser)]
#[command(name = "ferro", version, about, propagate_version = true)]
pub struct Cli {
    /// Controller endpoint (http://host:port); overrides FERRO_ENDPOINT and
    /// the config file.
    #[arg(long, global = true, value_name = "URL", help_heading = CLIENT_OPTIONS)]
    pub endpoint: Option<String>,
    /// API key; overrides FERRO_API_KEY and the config file.
    #[arg(long, global = true, value_name = "KEY", help_heading = CLIENT_OPTIONS)]
    pub api_key: Option<String>,
    /// Configuration file (default ~/.config/ferro/config.toml).
    #[arg(long, global = true, value_name = "FILE", help_heading = CLIENT_OPTIONS)]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table, help_heading = CLIENT_OPTIONS)]
    pub output: Format,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// The areas.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Virtual machines.
    #[command(subcommand)]
    Instances(Instances),
    /// Hosts known to the controller; joining and revoking them.
    #[command(subcommand)]
    Hosts(Hosts),
    /// Kernel images.
    #[command(subcommand)]
    Images(Images),
    /// Key pairs.
    #[command(subcommand)]
    Keys(Keys),
    /// Controller cluster membership.
    #[command(subcommand)]
    Cluster(Cluster),
    /// API keys and their roles (admin keys only).
    #[command(subcommand)]
    ApiKeys(ApiKeys),
    /// VPCs: private IPv4 networks.
    #[command(subcommand)]
    Vpcs(Vpcs),
    /// Subnets of VPCs, one zone each.
    #[command(subcommand)]
    Subnets(Subnets),
    /// Security groups: stateful allow rules for instances' interfaces.
    #[command(subcommand)]
    SecurityGroups(SecurityGroups),
    /// Network interfaces: each instance's primary interface (eni-…).
    #[command(subcommand, alias = "network-interfaces")]
    Interfaces(Interfaces),
    /// Block volumes: replicated disks of one zone, attached to instances.
    #[command(subcommand)]
    Volumes(Volumes),
    /// Availability zones.
    #[command(subcommand)]
    Azs(ListOnly),
    /// Instance types.
    #[command(subcommand)]
    Types(ListOnly),
    /// The all-in-one cloud on this machine: a controller, an agent and a
    /// test instance.
    Up(Up),
}

/// Host commands.
#[derive(Debug, Subcommand)]
pub enum Hosts {
    /// List them.
    List,
    /// Make a one-time token for host HOST_ID to join with (admin key): put
    /// it in the agent's configuration as `join_token`. The agent trades it
    /// for the host's own credential and certificate on its first start.
    Join {
        /// The agent's `host_id` (1 to 63 letters, digits and '-').
        host_id: String,
        /// How long the token works, in seconds (at most 604800).
        #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
        ttl: u32,
    },
    /// Revoke host HOST_ID's credential (admin key): its heartbeats are
    /// refused from then on, until it joins again with a new token.
    Revoke {
        /// The host id.
        host_id: String,
    },
}

/// Areas that only list.
#[derive(Debug, Subcommand)]
pub enum ListOnly {
    /// List them.
    List,
}

/// `--wait` and its timeout.
#[derive(Debug, Clone, Copy, Args)]
pub struct Wait {
    /// Wait until the instances reach the target state.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait at most.
    #[arg(long, default_value_t = 180, value_name = "SECS")]
    pub timeout: u64,
}

/// Instance commands.
#[derive(Debug, Subcommand)]
pub enum Instances {
    /// Launch instances.
    Run(Box<Run>),
    /// List instances.
    List(ListInstances),
    /// Show instances in detail.
    Describe {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Start stopped instances.
    Start {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        /// Waiting.
        wait: Wait,
    },
    /// Stop running instances.
    Stop {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Stop hard at once instead of asking the guest to shut down.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        /// Waiting.
        wait: Wait,
    },
    /// Reboot running instances.
    Reboot {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        /// Waiting.
        wait: Wait,
    },
    /// Terminate instances (deletes them from their hosts).
    Terminate {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        /// Waiting.
        wait: Wait,
    },
    /// Print an instance's serial console output.
    Console {
        /// Instance id.
        id: String,
    },
    /// Change an instance's attributes: its type and user data (while it is
    /// stopped; its next start uses them), what a power-off from inside the
    /// guest does, its security groups. All or nothing.
    Modify {
        /// Instance id.
        id: String,
        /// stop or terminate.
        #[arg(long, value_name = "BEHAVIOR", value_parser = ["stop", "terminate"])]
        shutdown_behavior: Option<String>,
        /// The primary interface's security groups from now on (all of its
        /// VPC); repeatable.
        #[arg(long = "security-group", value_name = "SG_ID")]
        security_groups: Vec<String>,
        /// The instance type from now on, e.g. f1.micro (stopped only).
        #[arg(long = "type", visible_alias = "instance-type", value_name = "TYPE")]
        instance_type: Option<String>,
        /// File whose contents become the user data (at most 16 KiB;
        /// stopped only).
        #[arg(
            long,
            visible_alias = "user-data-file",
            value_name = "FILE",
            conflicts_with = "no_user_data"
        )]
        user_data: Option<PathBuf>,
        /// Remove the user data (stopped only).
        #[arg(long)]
        no_user_data: bool,
    },
}

/// `ferro instances run`.
#[derive(Debug, Args)]
pub struct Run {
    /// Image id or name.
    #[arg(long)]
    pub image: String,
    /// Instance type, e.g. f1.small (see `ferro types list`).
    #[arg(long = "type", value_name = "TYPE")]
    pub instance_type: String,
    /// How many, 1 to 100.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Availability zone; the scheduler picks when not given.
    #[arg(long)]
    pub az: Option<String>,
    /// Key pair name.
    #[arg(long)]
    pub key_name: Option<String>,
    /// File whose contents become the user-data disk (at most 16 KiB).
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// Placement group name.
    #[arg(long)]
    pub placement_group: Option<String>,
    /// Spread over hosts instead of bin-packing.
    #[arg(long)]
    pub spread: bool,
    /// The subnet of the primary interface (pins the zone); default: the
    /// default subnet of the zone it is placed in.
    #[arg(long, value_name = "SUBNET_ID")]
    pub subnet: Option<String>,
    /// The primary private address (with --subnet and --count 1).
    #[arg(long, value_name = "IP")]
    pub private_ip: Option<String>,
    /// A security group of the interface's VPC; repeatable; default: the
    /// VPC's default group.
    #[arg(long = "security-group", value_name = "SG_ID")]
    pub security_groups: Vec<String>,
    /// A blank volume made for each instance and attached to it:
    /// DEVICE=SIZE_GIB[,type=single|standard|durable][,delete-on-termination=true|false]
    /// (e.g. /dev/vdb=10,type=durable); repeatable.
    #[arg(long = "block-device", value_name = "DEVICE=SIZE_GIB[,…]")]
    pub block_devices: Vec<String>,
    /// Boot from a volume made from the image's root disk (/dev/vda), so
    /// a stopped instance can start on another host of its zone:
    /// SIZE_GIB[,type=single|standard|durable][,delete-on-termination=true|false].
    #[arg(long = "root-volume", value_name = "SIZE_GIB[,…]")]
    pub root_volume: Option<String>,
    /// What a power-off from inside the guest does (a reboot from inside
    /// always keeps it running).
    #[arg(long, value_name = "BEHAVIOR", value_parser = ["stop", "terminate"], default_value = "stop")]
    pub shutdown_behavior: String,
    /// Tag KEY=VALUE; repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Idempotency token; one is made up when not given, so retries at a
    /// new leader never launch twice.
    #[arg(long)]
    pub client_token: Option<String>,
    #[command(flatten)]
    /// Waiting for `running`.
    pub wait: Wait,
}

/// `ferro instances list` filters.
#[derive(Debug, Args)]
pub struct ListInstances {
    /// Only instances in this state (pending, running, stopped, …); repeatable.
    #[arg(long = "state")]
    pub states: Vec<String>,
    /// Only instances in this zone; repeatable.
    #[arg(long = "az")]
    pub azs: Vec<String>,
    /// Only instances on this host; repeatable.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Only instances with this tag (KEY or KEY=VALUE); repeatable.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Interface filters: VPC, subnet, address, group.
    #[command(flatten)]
    pub net: NetFilters,
}

/// Filters on an instance's primary interface (`instances list`,
/// `interfaces list`); each repeatable, any value matches.
#[derive(Debug, Default, Args)]
pub struct NetFilters {
    /// Only in this VPC.
    #[arg(long = "vpc", value_name = "VPC_ID")]
    pub vpcs: Vec<String>,
    /// Only in this subnet.
    #[arg(long = "subnet", value_name = "SUBNET_ID")]
    pub subnets: Vec<String>,
    /// Only with this private IPv4 address.
    #[arg(long = "private-ip", value_name = "IP")]
    pub private_ips: Vec<String>,
    /// Only in this security group: an id (sg-…) or a name.
    #[arg(long = "group", value_name = "SG_ID|NAME")]
    pub groups: Vec<String>,
}

/// Network interface commands.
#[derive(Debug, Subcommand)]
pub enum Interfaces {
    /// List interfaces.
    List(ListInterfaces),
}

/// `ferro interfaces list` filters.
#[derive(Debug, Default, Args)]
pub struct ListInterfaces {
    /// Only the interface of this instance; repeatable.
    #[arg(long = "instance", value_name = "INSTANCE_ID")]
    pub instances: Vec<String>,
    /// Only interfaces in this zone; repeatable.
    #[arg(long = "az")]
    pub azs: Vec<String>,
    /// Only interfaces whose instance has this tag (KEY or KEY=VALUE);
    /// repeatable.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// VPC, subnet, address and group filters.
    #[command(flatten)]
    pub net: NetFilters,
}

/// Image commands.
#[derive(Debug, Subcommand)]
pub enum Images {
    /// Register an image whose files exist on every host.
    Register {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Absolute path of the ELF vmlinux or bzImage.
        #[arg(long)]
        kernel: PathBuf,
        /// Absolute path of an initrd.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Absolute path of a raw root disk.
        #[arg(long)]
        rootdisk: Option<PathBuf>,
        /// Kernel command line extras for every instance of the image.
        #[arg(long, default_value = "")]
        cmdline_extra: String,
        /// Tag KEY=VALUE; repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// List images.
    List,
    /// Deregister an image (id or name).
    Deregister {
        /// Image id or name.
        image: String,
    },
}

/// Key pair commands.
#[derive(Debug, Subcommand)]
pub enum Keys {
    /// Create an Ed25519 key pair; the private key (OpenSSH format) is
    /// shown only now: printed, or written to `--private-key-file`.
    Create {
        /// Unique name.
        name: String,
        /// Write the private key to this new file (mode 0600) instead of
        /// printing it.
        #[arg(long)]
        private_key_file: Option<std::path::PathBuf>,
    },
    /// Import an OpenSSH public key.
    Import {
        /// Unique name.
        name: String,
        /// File holding the public key line.
        #[arg(long, value_name = "FILE")]
        public_key_file: PathBuf,
    },
    /// List key pairs.
    List,
    /// Delete a key pair.
    Delete {
        /// Name.
        name: String,
    },
}

/// VPC commands.
#[derive(Debug, Subcommand)]
pub enum Vpcs {
    /// Create a VPC.
    Create {
        /// Its IPv4 block, /16 to /28 (e.g. 10.0.0.0/16).
        #[arg(long, value_name = "CIDR")]
        cidr: String,
        /// Tag KEY=VALUE; repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// List VPCs.
    List {
        /// Only VPCs with this tag (KEY or KEY=VALUE); repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a VPC (refused while it has subnets).
    Delete {
        /// VPC id.
        id: String,
    },
}

/// Subnet commands.
#[derive(Debug, Subcommand)]
pub enum Subnets {
    /// Create a subnet.
    Create {
        /// Its VPC.
        #[arg(long, value_name = "VPC_ID")]
        vpc: String,
        /// Its block, inside the VPC's, /16 to /28.
        #[arg(long, value_name = "CIDR")]
        cidr: String,
        /// Its zone.
        #[arg(long, value_name = "AZ")]
        az: String,
        /// Tag KEY=VALUE; repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// List subnets.
    List {
        /// Only those of this VPC.
        #[arg(long, value_name = "VPC_ID")]
        vpc: Option<String>,
        /// Only subnets with this tag (KEY or KEY=VALUE); repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a subnet.
    Delete {
        /// Subnet id.
        id: String,
    },
}

/// Security group commands.
#[derive(Debug, Subcommand)]
pub enum SecurityGroups {
    /// Create a group (all egress allowed, no ingress).
    Create {
        /// Its VPC.
        #[arg(long, value_name = "VPC_ID")]
        vpc: String,
        /// Unique in the VPC.
        #[arg(long)]
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Tag KEY=VALUE; repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// List groups with their rules.
    List {
        /// Only those of this VPC.
        #[arg(long, value_name = "VPC_ID")]
        vpc: Option<String>,
        /// Only groups of this name.
        #[arg(long)]
        name: Option<String>,
        /// Only groups with this tag (KEY or KEY=VALUE); repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a group nothing uses.
    Delete {
        /// Group id.
        id: String,
    },
    /// Allow traffic: add a rule.
    Authorize(RuleArgs),
    /// Remove a rule.
    Revoke(RuleArgs),
}

/// One security group rule.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Group id.
    pub id: String,
    /// An egress rule (default: ingress).
    #[arg(long)]
    pub egress: bool,
    /// tcp, udp, icmp or all.
    #[arg(long, value_parser = ["tcp", "udp", "icmp", "all"])]
    pub protocol: String,
    /// A port or range (80, 8000-8080); tcp and udp only.
    #[arg(long)]
    pub port: Option<String>,
    /// The peer block (e.g. 0.0.0.0/0).
    #[arg(long, conflicts_with = "group", required_unless_present = "group")]
    pub cidr: Option<String>,
    /// The peer group (its members), of the same VPC.
    #[arg(long, value_name = "SG_ID")]
    pub group: Option<String>,
}

/// Volume commands.
#[derive(Debug, Subcommand)]
pub enum Volumes {
    /// Create a volume (its replicas on distinct hosts of the zone).
    Create {
        /// Size in GiB, 1 to 16384.
        #[arg(long, value_name = "GIB")]
        size: u64,
        /// Its availability zone.
        #[arg(long)]
        az: String,
        /// single (1 replica: lost with its host), standard (2 replicas) or
        /// durable (3 replicas).
        #[arg(long = "type", default_value = "standard", value_parser = ["single", "standard", "durable"])]
        volume_type: String,
        /// Tag KEY=VALUE; repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// With --wait: until it is available (every replica made).
        #[command(flatten)]
        wait: Wait,
    },
    /// List volumes.
    List {
        /// Only those of this zone.
        #[arg(long)]
        az: Option<String>,
        /// Only those attached to this instance.
        #[arg(long, value_name = "INSTANCE_ID")]
        instance: Option<String>,
    },
    /// Attach a volume to a stopped instance (from its next start).
    Attach {
        /// Volume id.
        volume: String,
        /// Instance id.
        instance: String,
        /// Device name, /dev/vdb to /dev/vdz.
        #[arg(long)]
        device: String,
        /// Delete the volume when the instance is terminated.
        #[arg(long)]
        delete_on_termination: bool,
    },
    /// Detach a volume.
    Detach {
        /// Volume id.
        volume: String,
        /// Detach from a running instance too.
        #[arg(long)]
        force: bool,
    },
    /// Delete a volume that is not attached.
    Delete {
        /// Volume id.
        volume: String,
        /// With --wait: until every replica is removed and it is gone.
        #[command(flatten)]
        wait: Wait,
    },
}

/// API key commands.
#[derive(Debug, Subcommand)]
pub enum ApiKeys {
    /// Make a key; its secret is shown only now.
    Create {
        /// Unique name.
        name: String,
        /// What it may do: user (the compute API) or admin (also keys,
        /// hosts and the cluster). Host keys come only from a host joining.
        #[arg(long, value_parser = ["user", "admin"], default_value = "user")]
        role: String,
    },
    /// List keys (never their secrets).
    List,
    /// Delete a key: calls with it fail from then on.
    Delete {
        /// Key id (ak-…).
        id: String,
    },
}

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum Cluster {
    /// Members and leader.
    Status,
    /// Add a controller node as a voter.
    AddNode {
        /// Its node id.
        #[arg(long)]
        node_id: u64,
        /// Its gRPC address, host:port.
        #[arg(long)]
        address: String,
    },
    /// Remove a controller node.
    RemoveNode {
        /// Its node id.
        node_id: u64,
    },
}

/// `ferro up`.
#[derive(Debug, Clone, Args)]
pub struct Up {
    /// Where the controller and the agent keep their state and configs.
    #[arg(long, default_value = "/var/lib/ferro", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Kernel of the test image; default: build the test guest
    /// (`bash tests/guest/build.sh`, from the repository).
    #[arg(long, value_name = "PATH")]
    pub image_kernel: Option<PathBuf>,
    /// Do everything, print the console, clean up and exit (for CI).
    #[arg(long)]
    pub demo: bool,
    /// On Ctrl-C, leave every instance running (VMMs outlive their agent)
    /// for the next `ferro up` on this data directory, which resumes them;
    /// by default Ctrl-C terminates them all.
    #[arg(long)]
    pub keep: bool,
    /// Seconds to wait for each step (daemons healthy, instance running).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub timeout: u64,
    /// The controller's address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7400", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// The controller's EC2 Query endpoint, for the aws CLI and boto3
    /// (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8788", value_name = "ADDR")]
    pub ec2_listen: std::net::SocketAddr,
    /// vCPUs the host offers to instances (default: its CPUs); more than
    /// the host has overcommits them.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest memory the host offers, in MiB (capped at the host's memory
    /// minus 256 MiB).
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub memory: u64,
    /// Disk space the host offers volumes, GiB (their replica files are
    /// sparse, under the data directory; one host holds one replica, so
    /// volumes are of type `single`); 0: no volumes and no ferro-blockd.
    #[arg(long, default_value_t = 20, value_name = "GIB")]
    pub volume_gib: u64,
}
