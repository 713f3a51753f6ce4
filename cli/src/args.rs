//! The command line, as clap structs. Values are parsed into checked types
//! here (names, sizes), so commands never see a malformed one.

use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand};
use volumed_api::{BlockDeviceMapping, VolumeName};

#[derive(Debug, Parser)]
#[command(name = "vol", version, about = "Manage the volumes of a volumed host")]
pub struct Cli {
    /// Control socket of volumed [default: $VOLUMED_DATA_DIR/volumed.sock or ~/.local/share/volumed/volumed.sock]
    #[arg(long, global = true, env = "VOLUMED_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Print exactly one JSON document on stdout
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a volume
    Create {
        name: VolumeName,
        /// Size in bytes or with a binary unit: 10G, 10GiB, 512K, 1T (with
        /// --from-snapshot: the snapshot's size unless larger is given)
        #[arg(long, value_parser = parse_size, required_unless_present = "from_snapshot")]
        size: Option<u64>,
        /// Delete the volume when it is detached
        #[arg(long)]
        ephemeral: bool,
        /// Create the volume from this snapshot: usable at once, filled from the store
        #[arg(long, value_name = "ID")]
        from_snapshot: Option<String>,
        /// Unit of copy-on-write and snapshots: a power of two, 64K to 4M [default: 512K]
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
        /// Do not fill the volume in the background: fetch chunks only when touched
        #[arg(long, requires = "from_snapshot")]
        no_hydrate: bool,
        /// Wait until the restored volume is fully hydrated, showing progress
        #[arg(long, requires = "from_snapshot", conflicts_with = "no_hydrate")]
        wait: bool,
        /// A tag KEY=VALUE (repeatable), as EC2 tags
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_label)]
        tags: Vec<(String, String)>,
        /// Encrypt the volume's snapshots (every volume of an encrypted store
        /// is; refused on an unencrypted one)
        #[arg(long)]
        encrypted: bool,
        /// The key its snapshots are sealed under: a name, alias/NAME, id or
        /// ARN [default: the default key; a restored volume: its snapshot's]
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
    },
    /// List volumes
    List {
        /// Only volumes matching NAME=VALUE[,VALUE...] (repeatable; all must
        /// match), with EC2's DescribeVolumes filter names: status,
        /// volume-id, snapshot-id, size (GiB), volume-type, encrypted, tag:KEY,
        /// tag-key, attachment.instance-id, attachment.device,
        /// attachment.status, attachment.delete-on-termination
        #[arg(long = "filter", value_name = "NAME=VALUE", value_parser = parse_filter)]
        filters: Vec<volumed_api::VolumeFilter>,
    },
    /// Set tags on a volume (replacing the values of keys it has)
    Tag {
        name: VolumeName,
        /// KEY=VALUE
        #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_label)]
        tags: Vec<(String, String)>,
    },
    /// Remove tags from a volume (keys it does not have are ignored)
    Untag {
        name: VolumeName,
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Show one volume
    Inspect { name: VolumeName },
    /// Export a volume over NBD and print its URI
    Attach {
        name: VolumeName,
        /// The instance (VM) the volume is attached to, recorded with the attachment
        #[arg(long, value_name = "ID")]
        instance: Option<String>,
    },
    /// Stop exporting a volume; an ephemeral volume is deleted
    Detach { name: VolumeName },
    /// Grow a volume or change whether it is ephemeral
    Modify {
        name: VolumeName,
        /// New size (growing only)
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Delete the volume when it is detached
        #[arg(long, value_name = "true|false", action = ArgAction::Set)]
        ephemeral: Option<bool>,
    },
    /// Delete a volume that is not attached
    Delete { name: VolumeName },
    /// Take, list and inspect snapshots
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Delete chunk objects and manifest pages that no snapshot references any more
    Gc {
        /// Keep unreferenced objects younger than this (e.g. 0s, 10m, 1h)
        /// [default: the daemon's --gc-grace]
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
    },
    /// Show the daemon's status
    Status,
    /// Import a VM image (raw, qcow2, vmdk, vhdx, vpc, ova) into a new volume
    Import {
        /// An image file the daemon can read, or - for raw bytes on stdin
        source: String,
        name: VolumeName,
        /// The image's format [default: detected from its header]
        #[arg(long, value_parser = ["raw", "qcow2", "vmdk", "vhdx", "vpc", "ova"])]
        format: Option<String>,
        /// Unit of copy-on-write and snapshots: a power of two, 64K to 4M [default: 512K]
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
        /// Delete the volume when it is detached
        #[arg(long)]
        ephemeral: bool,
        /// Take a snapshot of the new volume at the end
        #[arg(long)]
        snapshot: bool,
        /// A label KEY=VALUE for that snapshot (repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, requires = "snapshot")]
        labels: Vec<(String, String)>,
        /// Expected SHA-256 of the image's logical bytes; a mismatch removes the volume
        #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
        sha256: Option<String>,
        /// Print the job id and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Export a snapshot, or a volume (snapshotted first), as an image
    Export {
        /// A snapshot id, or a volume name
        source: String,
        /// The image file to write (it must not exist), or - for raw on stdout
        dest: String,
        /// raw (sparse), qcow2, vmdk (stream-optimized), vhdx, vpc (VHD, fixed)
        #[arg(long, value_parser = ["raw", "qcow2", "vmdk", "vhdx", "vpc"], default_value = "raw")]
        format: String,
        /// zstd-compressed clusters (qcow2 only)
        #[arg(long)]
        compress: bool,
        /// Keep the snapshot a volume's export takes (deleted at the end otherwise)
        #[arg(long)]
        keep_snapshot: bool,
        /// Print the job id and return at once
        #[arg(long)]
        no_wait: bool,
    },
    /// Import and export jobs
    #[command(subcommand)]
    Job(JobCommand),
    /// Register, list and deregister images (AMIs)
    #[command(subcommand)]
    Image(ImageCommand),
    /// Launch instances from images, stop, start and terminate them
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// The host's encryption keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Snapshot policies: schedules and retention
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Delete what policies' retention no longer keeps (or, with
    /// --dry-run, print it)
    Prune {
        /// Only this policy's snapshots [default: every enabled policy's]
        #[arg(long, value_name = "NAME")]
        policy: Option<String>,
        /// Print what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// The recycle bin: deleted snapshots kept for a while, and its rules
    #[command(subcommand)]
    Bin(BinCommand),
}

/// What a policy is: `create` and `update` take the same flags.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    pub name: String,
    /// Volumes carrying this tag: tag:KEY=VALUE or tag:KEY (repeatable; any matches)
    #[arg(long = "select", value_name = "tag:K=V", value_parser = parse_select,
          required_unless_present_any = ["volumes", "instance"])]
    pub select: Vec<volumed_api::TagMatch>,
    /// These volumes (repeatable)
    #[arg(long = "volume", value_name = "NAME", conflicts_with = "select")]
    pub volumes: Vec<VolumeName>,
    /// The volumes attached to this instance
    #[arg(long, value_name = "ID", conflicts_with_all = ["select", "volumes"])]
    pub instance: Option<String>,
    /// A cron expression in UTC: 5 fields, or AWS's cron(...) with 6
    #[arg(long, value_name = "CRON", required_unless_present = "every")]
    pub schedule: Option<String>,
    /// An interval (1h, 30m, 1d), slots aligned to the epoch
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration,
          conflicts_with = "schedule")]
    pub every: Option<std::time::Duration>,
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Also keep every snapshot younger than this (30d, 12h)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub keep_within: Option<std::time::Duration>,
    /// A tag KEY=VALUE added to every snapshot the policy takes (repeatable)
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub tags: Vec<(String, String)>,
    /// Copy each volume's tags onto its snapshots
    #[arg(long)]
    pub copy_tags: bool,
    #[arg(long, default_value = "")]
    pub description: String,
    /// Keep the policy but run nothing
    #[arg(long)]
    pub disabled: bool,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a policy: snapshots on a schedule, pruned by its keep options
    Create(PolicyArgs),
    /// Replace a policy's settings (its run history stays)
    Update(PolicyArgs),
    /// List policies
    List,
    /// Show a policy, its next run and its last result
    Inspect { name: String },
    /// Delete a policy (its snapshots stay)
    Delete { name: String },
    /// Run every schedule of a policy once, now
    RunNow { name: String },
}

#[derive(Debug, Subcommand)]
pub enum BinCommand {
    /// List the snapshots and images in the recycle bin
    List,
    /// Bring a snapshot (snap-…) or an image (ami-…) back from the recycle
    /// bin, as it was
    Restore {
        #[arg(value_parser = parse_bin_id)]
        id: String,
    },
    /// Recycle-bin rules: which deleted snapshots are kept, how long
    #[command(subcommand)]
    Rule(BinRuleCommand),
}

#[derive(Debug, Subcommand)]
pub enum BinRuleCommand {
    /// Keep deleted resources (matching --select, or all but --exclude) for --retention
    Create {
        #[arg(long, value_parser = ["snapshot", "image"], default_value = "snapshot")]
        resource: String,
        /// How long (7d, 12h; up to 365d)
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: std::time::Duration,
        /// Only resources with this tag: tag:KEY=VALUE or tag:KEY (repeatable; any)
        #[arg(long = "select", value_name = "tag:K=V", value_parser = parse_select)]
        select: Vec<volumed_api::TagMatch>,
        /// Every resource but those with this tag (repeatable)
        #[arg(long = "exclude", value_name = "tag:K=V", value_parser = parse_select,
              conflicts_with = "select")]
        exclude: Vec<volumed_api::TagMatch>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the rules
    List,
    /// Delete a rule (what it keeps stays until its time ends)
    Delete { id: String },
    /// Lock a region-level rule: it cannot be deleted, shortened or
    /// narrowed until it is unlocked and the unlock delay has passed
    Lock {
        id: String,
        /// Days (7 to 30) the rule stays held after `unlock`
        #[arg(long = "unlock-delay-days", value_name = "DAYS")]
        unlock_delay_days: u64,
    },
    /// Unlock a rule: held for its unlock delay, then free
    Unlock { id: String },
}

fn parse_select(s: &str) -> Result<volumed_api::TagMatch, String> {
    volumed_api::TagMatch::parse_select(s)
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key: 32 random bytes kept in DATA_DIR/keys/NAME.key, or
    /// material an external KMS prints through --command
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// A shell command printing the material (64 hex digits) of the
        /// version in $VOLUMED_KEY_VERSION (key id in $VOLUMED_KEY_ID)
        #[arg(long, value_name = "COMMAND")]
        command: Option<String>,
    },
    /// List keys
    List,
    /// Show one key (by name, alias/NAME, id or ARN)
    Inspect { key: String },
    /// Add a version to a key and wrap every data key under it anew (no
    /// data is re-encrypted); new data gets a new data key
    Rotate { key: String },
    /// Stop every use of a key on this host: reads of data under it fail
    Disable { key: String },
    /// Allow a disabled key again
    Enable { key: String },
    /// Make a key the default for volumes that name none (no KEY: the
    /// managed aws-ebs key again)
    Default { key: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Register an image: a root snapshot and more devices
    Register {
        name: String,
        /// The root device and its snapshot: DEVICE=snap-ID[:SIZE_GIB[:DELETE_ON_TERMINATION[:TYPE[:IOPS]]]]
        #[arg(long, value_name = "DEVICE=SNAPSHOT", value_parser = parse_root)]
        root: Box<BlockDeviceMapping>,
        /// Another device (repeatable): DEVICE=ephemeralN, DEVICE=none, or
        /// DEVICE=[snap-ID]:[SIZE_GIB]:[DELETE_ON_TERMINATION]:[TYPE[:IOPS]]
        #[arg(short = 'b', long = "block-device-mapping", value_name = "DEVICE=SPEC", value_parser = parse_mapping)]
        mappings: Vec<BlockDeviceMapping>,
        #[arg(long, default_value = "")]
        description: String,
        /// i386, x86_64, arm64, x86_64_mac, arm64_mac [default: x86_64]
        #[arg(long = "arch")]
        architecture: Option<String>,
        /// A tag KEY=VALUE (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_label)]
        tags: Vec<(String, String)>,
    },
    /// List images
    List,
    /// Show one image and its block-device mapping
    Inspect { id: String },
    /// Deregister an image
    Deregister {
        id: String,
        /// Also delete its snapshots that no other image uses
        #[arg(long)]
        delete_snapshots: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Launch instances of an image: its volumes made and attached (exported)
    Run {
        image: String,
        /// Instance type, from the daemon's instance-type table [default: m1.small]
        #[arg(long = "type", value_name = "TYPE")]
        instance_type: Option<String>,
        /// Instances to launch, all or none
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Merged into the image's by device (repeatable): DEVICE=none,
        /// DEVICE=ephemeralN, DEVICE=[snap-ID]:[SIZE_GIB]:[DELETE_ON_TERMINATION]:[TYPE[:IOPS]]
        #[arg(short = 'b', long = "block-device-mapping", value_name = "DEVICE=SPEC", value_parser = parse_mapping)]
        mappings: Vec<BlockDeviceMapping>,
        /// A tag KEY=VALUE for the instance (repeatable)
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_label)]
        tags: Vec<(String, String)>,
    },
    /// List instances (terminated ones for an hour)
    List,
    /// Show one instance and its devices
    Inspect {
        id: String,
        /// Print qemu's -blockdev and -device options for every device
        #[arg(long, conflicts_with = "libvirt")]
        qemu: bool,
        /// Print a libvirt <disk> element for every device
        #[arg(long)]
        libvirt: bool,
    },
    /// Stop: instance-store volumes are discarded, EBS volumes stay
    Stop { id: String },
    /// Start a stopped instance: instance-store volumes come back empty
    Start { id: String },
    /// Reboot: nothing changes on any volume
    Reboot { id: String },
    /// Terminate: volumes detached, those with DeleteOnTermination deleted
    Terminate { id: String },
}

fn parse_mapping(s: &str) -> Result<BlockDeviceMapping, String> {
    BlockDeviceMapping::parse_legacy(s).map_err(|e| e.to_string())
}

fn parse_root(s: &str) -> Result<Box<BlockDeviceMapping>, String> {
    parse_mapping(s).map(Box::new)
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List jobs
    List,
    /// Show one job
    Inspect { id: String },
    /// Cancel a running job; an import's volumes are removed
    Cancel { id: String },
}

fn parse_sha256(s: &str) -> Result<String, String> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("invalid sha256 {s:?}: expected 64 hex digits"))
    }
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a volume at this instant; it uploads in the background
    Create {
        /// The volume; with --set, every volume of the set
        #[arg(required = true, num_args = 1..)]
        volumes: Vec<VolumeName>,
        /// Take one crash-consistent snapshot of every volume given, at one
        /// instant, as a set of this name
        #[arg(long, value_name = "NAME")]
        set: Option<String>,
        /// With --set: run PATH NBD-URI quiesce (and unquiesce) for each
        /// attached volume around the barrier, as rbd-nbd's hook
        #[arg(long, value_name = "PATH", requires = "set")]
        quiesce_hook: Option<PathBuf>,
        /// Go on when the quiesce hook fails
        #[arg(long, requires = "quiesce_hook")]
        ignore_quiesce_error: bool,
        /// A label KEY=VALUE (repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Wait until the snapshot (every snapshot of the set) is completed
        /// (or failed), showing progress
        #[arg(long)]
        wait: bool,
    },
    /// List snapshots
    List {
        /// Only this volume's snapshots
        #[arg(long)]
        volume: Option<VolumeName>,
    },
    /// Show one snapshot
    Inspect { id: String },
    /// Delete a snapshot (into the recycle bin if a rule keeps it); gc
    /// reclaims its chunks
    Delete { id: String },
    /// Never delete or prune this snapshot until unprotected
    Protect {
        #[arg(value_parser = parse_snapshot_id)]
        id: String,
    },
    /// Allow this snapshot to be deleted again
    Unprotect {
        #[arg(value_parser = parse_snapshot_id)]
        id: String,
    },
    /// Read every chunk of a snapshot and check it against its hash
    Verify { id: String },
    /// Copy a snapshot under a new id: sharing its chunks, or under --key
    /// another key, every chunk sealed anew (a full copy)
    Copy {
        #[arg(value_parser = parse_snapshot_id)]
        id: String,
        /// The key the copy is sealed under (a name, alias/NAME, id or ARN)
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
        /// A label KEY=VALUE added to the source's (repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Wait until the copy is completed (or failed), showing progress
        #[arg(long)]
        wait: bool,
    },
    /// Export a snapshot read-only over NBD on this host (any host's
    /// snapshot in the store), under its id, until detached; prints its URI
    Attach {
        #[arg(value_parser = parse_snapshot_id)]
        id: String,
    },
    /// End a snapshot's read-only export
    Detach {
        #[arg(value_parser = parse_snapshot_id)]
        id: String,
    },
    /// The byte ranges that differ between two snapshots (of any volumes,
    /// same chunk size), exact by content; without --from, the ranges of TO
    /// that hold data
    Diff {
        /// The older snapshot
        #[arg(long, value_parser = parse_snapshot_id)]
        from: Option<String>,
        /// The newer snapshot
        #[arg(value_parser = parse_snapshot_id)]
        to: String,
        /// Print JSON in this shape: ours (json), `rbd diff --format json`
        /// (rbd), or EBS ListChangedBlocks (ebs, 512 KiB chunks only)
        #[arg(long, value_enum)]
        format: Option<DiffFormat>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffFormat {
    Json,
    Rbd,
    Ebs,
}

/// `snap-` and 1 to 64 of `[0-9a-z]`, as the daemon's ids; checked here
/// so an id never carries anything else into a request path or query.
/// A snapshot id, or an image id (`ami-` and 8 or 17 lowercase hex digits).
fn parse_bin_id(s: &str) -> Result<String, String> {
    if let Some(hex) = s.strip_prefix("ami-") {
        let ok = (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        return if ok {
            Ok(s.to_owned())
        } else {
            Err(format!(
                "invalid image id {s:?}: expected ami- followed by 8 or 17 of [0-9a-f]"
            ))
        };
    }
    parse_snapshot_id(s)
}

fn parse_snapshot_id(s: &str) -> Result<String, String> {
    let ok = s.strip_prefix("snap-").is_some_and(|rest| {
        (1..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid snapshot id {s:?}: expected snap- followed by 1 to 64 of [0-9a-z]"
        ))
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

fn parse_filter(s: &str) -> Result<volumed_api::VolumeFilter, String> {
    volumed_api::VolumeFilter::parse(s).map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    volumed_api::parse_size(s).map_err(|e| e.to_string())
}
