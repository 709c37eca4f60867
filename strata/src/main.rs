//! `strata`: the daemon (`strata serve`) and the command-line client that talks to it over
//! the control API (HTTP/JSON on a unix socket, docs/API.md).

mod client;
mod jobs;
mod oci;
mod remote;
mod server;
mod state;
mod units;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Copy-on-write volumes with O(1) checkpoint, restore and fork"
)]
struct Cli {
    /// Store directory.
    #[arg(
        long,
        global = true,
        env = "STRATA_STORE",
        default_value = "./strata-data"
    )]
    store: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon that owns the store.
    Serve {
        /// Control socket (default: STORE/strata.sock).
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Limit the background copy-in of volumes restored from a remote to this many
        /// bytes per second per volume (K/M/G suffixes); unlimited by default.
        #[arg(long)]
        hydrate_rate: Option<String>,
        /// Limit each push (protection rounds included) to this many bytes per second
        /// (K/M/G suffixes); no ceiling by default. Below it, pushes back off while the
        /// guests' IO slows down (see --no-push-yield).
        #[arg(long)]
        push_rate: Option<String>,
        /// Push at --push-rate (or unpaced) even while the guests' IO slows down: by
        /// default a push halves its rate whenever the mean latency of a kind of guest request
        /// rises well above its usual level, or the host's CPUs are contended more than usual
        /// while guests send requests (/proc/pressure/cpu), and climbs back once it settles.
        #[arg(long)]
        no_push_yield: bool,
        /// Also serve containerd's snapshots API on this socket (a proxy snapshotter:
        /// docs/design/containerd.md).
        #[arg(long)]
        containerd_socket: Option<PathBuf>,
    },
    /// Create, list, inspect, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list, restore, delete and diff checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Export a volume to a hypervisor (vhost-user) or as image files (FUSE).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Stop exporting a volume.
    Unexport { volume: String },
    /// Sandbox root trees: directory trees with the same checkpoints as volumes.
    #[command(subcommand)]
    Fs(FsCmd),
    /// Mount a tree volume as a directory (FUSE, served by the daemon).
    Mount {
        name: String,
        /// An existing, empty directory.
        dir: PathBuf,
        #[arg(long)]
        read_only: bool,
        /// Let other users in (permissions still apply: default_permissions).
        #[arg(long)]
        allow_other: bool,
    },
    /// Unmount a tree mounted with `strata mount` (refused while a file in it is open).
    Unmount { dir: PathBuf },
    /// Copy an image file into a volume (raw; qcow2 and others through qemu-img).
    Import {
        volume: String,
        file: PathBuf,
        /// Image format; detected when omitted (qcow2 or raw).
        #[arg(long)]
        format: Option<String>,
    },
    /// Write a volume or checkpoint (VOL or VOL@CKPT) to an image file.
    ExportImage {
        source: String,
        file: PathBuf,
        /// raw (sparse), or any format qemu-img writes (qcow2, ...).
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// S3-compatible object stores that checkpoints are pushed to and restored from.
    #[command(subcommand)]
    Remote(RemoteCmd),
    /// Verify the checksum of every stored block.
    Scrub,
    /// Check the store's metadata: every loaded map against its committed records, every
    /// page's reference count against the records (holds writes off while it compares).
    Check,
    /// Store-wide figures.
    Stats,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a volume (thin: no space is used until written).
    Create {
        name: String,
        /// Size with an optional K/M/G/T suffix (binary). Defaults to the source's size with --from.
        #[arg(long)]
        size: Option<String>,
        /// Store blocks lz4-compressed.
        #[arg(long, value_parser = ["lz4"])]
        compress: Option<String>,
        /// Block size (4K to 1M; default 4K, 64K with lz4).
        #[arg(long)]
        block_size: Option<String>,
        /// Fork from a checkpoint, VOL@CKPT (O(1), shares every block), or restore one
        /// from a remote, REMOTE:VOL@CKPT.
        #[arg(long)]
        from: Option<String>,
        /// With REMOTE:VOL@CKPT: usable at once; blocks are fetched on first read and the
        /// rest copied in the background (see `volume info`).
        #[arg(long)]
        lazy: bool,
        /// Discard the volume when it is closed or the daemon restarts.
        #[arg(long)]
        ephemeral: bool,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Change a volume's IO limits, live (docs/design/qos.md); 0 removes a limit.
    Set {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    List,
    Info {
        name: String,
    },
    /// Grow a volume.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    Delete {
        name: String,
    },
    /// Checkpoint and push the volume (or tree) to a remote on a schedule, keeping the
    /// remote's protection checkpoints to a retention rule (docs/design/protection.md).
    Protect {
        name: String,
        /// Needed when more than one remote is configured.
        #[arg(long)]
        remote: Option<String>,
        /// Interval between protection points: 30s, 5m, 1h.
        #[arg(long)]
        every: String,
        /// Keep the N newest protection checkpoints in the remote.
        #[arg(long)]
        keep: Option<u32>,
        /// Keep protection checkpoints younger than this in the remote: 12h, 7d.
        #[arg(long)]
        keep_for: Option<String>,
    },
    /// Stop protecting a volume (what the remote holds stays).
    Unprotect {
        name: String,
    },
}

/// IO limits of a volume: token buckets, reads and writes separately.
#[derive(clap::Args, Debug, Default)]
struct LimitArgs {
    /// Read and write operations per second, each (sets both).
    #[arg(long)]
    iops_limit: Option<u64>,
    /// Read and write bytes per second, each (sets both): 100M, 1G.
    #[arg(long)]
    bw_limit: Option<String>,
    #[arg(long)]
    read_iops_limit: Option<u64>,
    #[arg(long)]
    write_iops_limit: Option<u64>,
    #[arg(long)]
    read_bw_limit: Option<String>,
    #[arg(long)]
    write_bw_limit: Option<String>,
    /// How much a volume idle for a while may do at once, as time at its limits (default
    /// 100ms): 1s lets one second's worth through unthrottled.
    #[arg(long)]
    burst: Option<String>,
    /// Most bytes the volume may have allocated (written and not discarded, shared or not):
    /// 20G. Writes past it fail as on a full disk; 0 removes it.
    #[arg(long)]
    quota: Option<String>,
}

impl LimitArgs {
    /// The request body, or `None` when no flag was given.
    fn body(&self) -> Result<Option<Value>> {
        let rate = |s: &Option<String>| s.as_deref().map(units::parse_size).transpose();
        let (bw, rbw, wbw) = (
            rate(&self.bw_limit)?,
            rate(&self.read_bw_limit)?,
            rate(&self.write_bw_limit)?,
        );
        let burst_ms = match self.burst.as_deref() {
            Some(b) => Some(parse_duration_ms(b)?),
            None => None,
        };
        let quota = rate(&self.quota)?;
        let v = json!({
            "read_iops": self.read_iops_limit.or(self.iops_limit),
            "write_iops": self.write_iops_limit.or(self.iops_limit),
            "read_bps": rbw.or(bw),
            "write_bps": wbw.or(bw),
            "burst_ms": burst_ms,
            "quota": quota,
        });
        let any = v
            .as_object()
            .is_some_and(|o| o.values().any(|x| !x.is_null()));
        Ok(any.then(|| {
            Value::Object(
                v.as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, x)| !x.is_null())
                    .map(|(k, x)| (k.clone(), x.clone()))
                    .collect(),
            )
        }))
    }
}

#[derive(Subcommand, Debug)]
enum FsCmd {
    /// Create a tree volume: empty, or forked from a tree's checkpoint in O(1).
    Create {
        name: String,
        /// TREE@CKPT to fork from.
        #[arg(long)]
        from: Option<String>,
        /// Discard the tree when it is unmounted or the daemon restarts.
        #[arg(long)]
        ephemeral: bool,
    },
    /// Copy a directory tree into a tree (mounted or not), with a progress bar: types,
    /// modes, owners, times, xattrs, hard links and holes are kept; nothing is overwritten.
    Import { name: String, dir: PathBuf },
    /// Import a container image (an OCI image layout directory or tar, or a `docker save`
    /// archive) into a new tree: one checkpoint per layer, layers another image already
    /// brought reused in O(1). The tree is named by --tag, else by the image's reference.
    ImportOci {
        source: PathBuf,
        #[arg(long)]
        tag: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CheckpointCmd {
    /// Take a checkpoint: VOL@NAME.
    Create { target: String },
    /// List a volume's checkpoints as a tree, or with --remote the checkpoints a remote
    /// holds.
    List {
        volume: Option<String>,
        #[arg(long)]
        remote: Option<String>,
    },
    /// Upload a checkpoint, VOL@CKPT, to a remote (incremental against what it holds).
    Push {
        target: String,
        /// Needed when more than one remote is configured.
        #[arg(long)]
        remote: Option<String>,
    },
    /// Make the live volume equal to a checkpoint again; newer checkpoints stay.
    Restore {
        target: String,
        /// Disconnect an exported volume's hypervisor instead of refusing.
        #[arg(long)]
        force: bool,
    },
    Delete {
        target: String,
        /// Delete it from this remote instead of the local store.
        #[arg(long)]
        remote: Option<String>,
    },
    /// What differs between VOL@A and VOL@B (VOL alone means the live volume): byte ranges
    /// for block volumes; for trees, paths added (A), removed (D), modified (M), with only
    /// metadata changed (m), or renamed (R old -> new).
    Diff { a: String, b: String },
}

#[derive(Subcommand, Debug)]
enum ExportCmd {
    /// Serve a volume as a vhost-user-blk device on a unix socket.
    VhostUser {
        volume: String,
        #[arg(long)]
        socket: PathBuf,
        /// Queues offered (one per guest vCPU, at most 16).
        #[arg(long, default_value_t = 1)]
        queues: u16,
        #[arg(long)]
        read_only: bool,
    },
    /// List the exports the daemon serves.
    List,
    /// Mount a volume and its checkpoints as image files: DIR/VOL.img (read-write) and
    /// DIR/VOL@CKPT.img (read-only), served by the daemon over FUSE.
    Fuse {
        volume: String,
        /// An existing, empty directory.
        #[arg(long)]
        mountpoint: PathBuf,
        /// VOL.img refuses writes too.
        #[arg(long)]
        read_only: bool,
        /// Let other users in (permissions still apply).
        #[arg(long)]
        allow_other: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RemoteCmd {
    /// Add a remote; the daemon checks that the bucket answers. Credentials come from the
    /// daemon's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or --credentials-file.
    Add {
        name: String,
        /// http(s)://host:port of the S3 API.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        bucket: String,
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// Key prefix inside the bucket.
        #[arg(long, default_value = "strata")]
        prefix: String,
        /// A file readable only by its owner with access_key_id = ... and
        /// secret_access_key = ... lines.
        #[arg(long)]
        credentials_file: Option<PathBuf>,
    },
    List,
    /// Forget a remote (nothing in the bucket is deleted).
    Remove {
        name: String,
    },
    /// Delete packs no remote checkpoint references.
    Gc {
        name: String,
        /// Keep unreferenced packs younger than this (a push may be writing them): 30s, 10m, 1h.
        #[arg(long, default_value = "1h")]
        grace: String,
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_duration(s: &str) -> Result<u64> {
    let (n, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = n
        .parse()
        .with_context(|| format!("invalid duration {s:?} (use 30s, 10m, 1h, 7d)"))?;
    n.checked_mul(mult).context("duration too large")
}

/// A duration in milliseconds: 250ms, 2s (a bare number is seconds).
fn parse_duration_ms(s: &str) -> Result<u64> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse()
            .with_context(|| format!("invalid duration {s:?} (use 250ms, 2s)"));
    }
    parse_duration(s)?
        .checked_mul(1000)
        .context("duration too large")
}

fn split_ref(s: &str) -> Result<(&str, &str)> {
    match s.split_once('@') {
        Some((v, c)) if !v.is_empty() && !c.is_empty() => Ok((v, c)),
        _ => bail!("expected VOLUME@CHECKPOINT, got {s:?}"),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("strata: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Cmd::Serve {
        api_socket,
        hydrate_rate,
        push_rate,
        no_push_yield,
        containerd_socket,
    } = &cli.cmd
    {
        let socket = api_socket
            .clone()
            .unwrap_or_else(|| cli.store.join("strata.sock"));
        let rate = hydrate_rate.as_deref().map(units::parse_size).transpose()?;
        let push = push_rate.as_deref().map(units::parse_size).transpose()?;
        return server::serve(
            &cli.store,
            &socket,
            remote::Rates {
                hydrate: rate,
                push,
                push_yield: !no_push_yield,
            },
            containerd_socket.as_deref(),
        );
    }
    let c = client::Client::new(cli.store.join("strata.sock"));
    let tree = matches!(
        cli.cmd,
        Cmd::Checkpoint(CheckpointCmd::List { remote: None, .. })
    );
    // `strata check` exits non-zero when it finds the metadata inconsistent.
    let mut inconsistent = false;
    let out: Value = match cli.cmd {
        Cmd::Serve { .. } => unreachable!("handled above"),
        Cmd::Volume(v) => volume(&c, v)?,
        Cmd::Checkpoint(k) => checkpoint(&c, k)?,
        Cmd::Export(ExportCmd::VhostUser {
            volume,
            socket,
            queues,
            read_only,
        }) => {
            let socket = std::path::absolute(&socket).context("socket path")?;
            c.call("POST", "/v1/exports", Some(json!({"volume": volume, "kind": "vhost-user", "socket": socket, "queues": queues, "read_only": read_only})))?
        }
        Cmd::Export(ExportCmd::Fuse {
            volume,
            mountpoint,
            read_only,
            allow_other,
        }) => {
            let mountpoint = std::path::absolute(&mountpoint).context("mount point path")?;
            c.call("POST", "/v1/exports", Some(json!({"volume": volume, "kind": "fuse", "mountpoint": mountpoint, "read_only": read_only, "allow_other": allow_other})))?
        }
        Cmd::Export(ExportCmd::List) => c.call("GET", "/v1/exports", None)?,
        Cmd::Unexport { volume } => c.call("DELETE", &format!("/v1/exports/{volume}"), None)?,
        Cmd::Fs(FsCmd::Create {
            name,
            from,
            ephemeral,
        }) => {
            if let Some(f) = &from {
                split_ref(f)?;
            }
            c.call(
                "POST",
                "/v1/volumes",
                Some(json!({"name": name, "tree": true, "from": from, "ephemeral": ephemeral})),
            )?
        }
        Cmd::Fs(FsCmd::Import { name, dir }) => {
            let dir = std::path::absolute(&dir).context("directory path")?;
            let job = c.call(
                "POST",
                &format!("/v1/volumes/{name}/fs-import"),
                Some(json!({"path": dir})),
            )?;
            wait_job(&c, &job, "importing")?
        }
        Cmd::Fs(FsCmd::ImportOci { source, tag }) => {
            let source = std::path::absolute(&source).context("image path")?;
            let job = c.call(
                "POST",
                "/v1/oci-import",
                Some(json!({"source": source, "tag": tag})),
            )?;
            wait_job(&c, &job, "importing")?
        }
        Cmd::Mount {
            name,
            dir,
            read_only,
            allow_other,
        } => {
            let dir = std::path::absolute(&dir).context("mount point path")?;
            c.call("POST", "/v1/exports", Some(json!({"volume": name, "kind": "tree", "mountpoint": dir, "read_only": read_only, "allow_other": allow_other})))?
        }
        Cmd::Unmount { dir } => {
            let dir = std::path::absolute(&dir).context("mount point path")?;
            let dir = dir.canonicalize().unwrap_or(dir);
            let all = c.call("GET", "/v1/exports", None)?;
            let vol = all
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["kind"] == "tree" && e["mountpoint"].as_str() == dir.to_str())
                .and_then(|e| e["volume"].as_str().map(str::to_string));
            match vol {
                Some(v) => c.call("DELETE", &format!("/v1/exports/{v}"), None)?,
                None => bail!("no tree is mounted at {}", dir.display()),
            }
        }
        Cmd::Import {
            volume,
            file,
            format,
        } => {
            let file = std::path::absolute(&file).context("image path")?;
            let job = c.call(
                "POST",
                &format!("/v1/volumes/{volume}/import"),
                Some(json!({"path": file, "format": format})),
            )?;
            wait_job(&c, &job, "importing")?
        }
        Cmd::ExportImage {
            source,
            file,
            format,
        } => {
            let file = std::path::absolute(&file).context("image path")?;
            let job = c.call(
                "POST",
                "/v1/export-image",
                Some(json!({"source": source, "path": file, "format": format})),
            )?;
            wait_job(&c, &job, "exporting")?
        }
        Cmd::Remote(r) => remote(&c, r)?,
        Cmd::Scrub => c.call("POST", "/v1/scrub", None)?,
        Cmd::Check => {
            let v = c.call("POST", "/v1/check", None)?;
            inconsistent = v["clean"] != Value::Bool(true);
            v
        }
        Cmd::Stats => c.call("GET", "/v1/stats", None)?,
    };
    let paths = out
        .as_array()
        .and_then(|a| a.first())
        .is_some_and(|x| x.get("path").is_some() && x.get("change").is_some());
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if paths {
        units::print_path_changes(&out);
    } else if tree {
        units::print_checkpoint_tree(&out);
    } else {
        units::print_human(&out);
    }
    if inconsistent {
        bail!("the store's metadata is inconsistent (listed above): a bug; please report it");
    }
    Ok(())
}

/// Polls a daemon job until it ends, drawing a progress bar when stderr is a terminal.
fn wait_job(c: &client::Client, started: &Value, verb: &str) -> Result<Value> {
    use std::io::{IsTerminal, Write};
    let id = started["job"]
        .as_u64()
        .context("daemon did not return a job id")?;
    let tty = std::io::stderr().is_terminal();
    // Short jobs answer within milliseconds: poll fast first, then back off.
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        let v = c.call("GET", &format!("/v1/jobs/{id}"), None)?;
        let (done, total) = (
            v["done_bytes"].as_u64().unwrap_or(0),
            v["total_bytes"].as_u64().unwrap_or(0),
        );
        if tty && total > 0 {
            let pct = done * 100 / total;
            let bar = "#".repeat((pct / 4) as usize) + &".".repeat(25 - (pct / 4) as usize);
            eprint!(
                "\r{verb} [{bar}] {pct:>3}% {} / {}",
                units::human_bytes(done),
                units::human_bytes(total)
            );
            let _ = std::io::stderr().flush();
        }
        match v["state"].as_str() {
            Some("running") => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(25));
            }
            Some("done") => {
                if tty {
                    eprintln!();
                }
                return Ok(v["result"].clone());
            }
            _ => {
                if tty {
                    eprintln!();
                }
                bail!("{}", v["error"].as_str().unwrap_or("job failed"));
            }
        }
    }
}

fn volume(c: &client::Client, v: VolumeCmd) -> Result<Value> {
    match v {
        VolumeCmd::Create {
            name,
            size,
            compress,
            block_size,
            from,
            ephemeral,
            lazy,
            limits,
        } => {
            let qos = limits.body()?;
            if let Some(src) = from.as_deref().filter(|f| f.contains(':')) {
                if remote::pull::parse_source(src).is_none() {
                    bail!("expected REMOTE:VOL@CKPT, got {src:?}");
                }
                let r = c.call(
                    "POST",
                    "/v1/volumes",
                    Some(json!({"name": name, "from": src, "lazy": lazy, "qos": qos})),
                )?;
                return if lazy {
                    Ok(r)
                } else {
                    wait_job(c, &r, "restoring")
                };
            }
            if lazy {
                bail!("--lazy needs --from REMOTE:VOL@CKPT");
            }
            let size = size.as_deref().map(units::parse_size).transpose()?;
            let block_size = block_size.as_deref().map(units::parse_size).transpose()?;
            if from.is_none() && size.is_none() {
                bail!("--size is required (or --from VOL@CKPT)");
            }
            if let Some(f) = &from {
                split_ref(f)?;
            }
            c.call("POST", "/v1/volumes", Some(json!({"name": name, "size": size, "compress": compress, "block_size": block_size, "from": from, "ephemeral": ephemeral, "qos": qos})))
        }
        VolumeCmd::Set { name, limits } => {
            let Some(body) = limits.body()? else {
                bail!("nothing to set: give --iops-limit, --bw-limit, --read-iops-limit, --write-iops-limit, --read-bw-limit, --write-bw-limit, --burst or --quota");
            };
            c.call("PUT", &format!("/v1/volumes/{name}/qos"), Some(body))
        }
        VolumeCmd::List => c.call("GET", "/v1/volumes", None),
        VolumeCmd::Info { name } => c.call("GET", &format!("/v1/volumes/{name}"), None),
        VolumeCmd::Resize { name, size } => {
            let size = units::parse_size(&size)?;
            c.call(
                "POST",
                &format!("/v1/volumes/{name}/resize"),
                Some(json!({"size": size})),
            )
        }
        VolumeCmd::Delete { name } => c.call("DELETE", &format!("/v1/volumes/{name}"), None),
        VolumeCmd::Protect {
            name,
            remote,
            every,
            keep,
            keep_for,
        } => {
            let every_secs = parse_duration(&every)?;
            let keep_for_secs = keep_for.as_deref().map(parse_duration).transpose()?;
            c.call(
                "PUT",
                &format!("/v1/volumes/{name}/protection"),
                Some(
                    json!({"remote": remote, "every_secs": every_secs, "keep": keep,
                            "keep_for_secs": keep_for_secs}),
                ),
            )
        }
        VolumeCmd::Unprotect { name } => {
            c.call("DELETE", &format!("/v1/volumes/{name}/protection"), None)
        }
    }
}

fn checkpoint(c: &client::Client, k: CheckpointCmd) -> Result<Value> {
    match k {
        CheckpointCmd::Create { target } => {
            let (v, n) = split_ref(&target)?;
            c.call(
                "POST",
                &format!("/v1/volumes/{v}/checkpoints"),
                Some(json!({"name": n})),
            )
        }
        CheckpointCmd::List {
            volume,
            remote: Some(r),
        } => {
            let all = c.call("GET", &format!("/v1/remotes/{r}/checkpoints"), None)?;
            Ok(match volume {
                None => all,
                Some(v) => Value::Array(
                    all.as_array()
                        .into_iter()
                        .flatten()
                        .filter(|x| x["volume"] == v.as_str())
                        .cloned()
                        .collect(),
                ),
            })
        }
        CheckpointCmd::List {
            volume: Some(volume),
            remote: None,
        } => c.call("GET", &format!("/v1/volumes/{volume}/checkpoints"), None),
        CheckpointCmd::List { .. } => bail!("name a volume, or pass --remote REMOTE"),
        CheckpointCmd::Push { target, remote } => {
            let (v, n) = split_ref(&target)?;
            let job = c.call(
                "POST",
                &format!("/v1/volumes/{v}/checkpoints/{n}/push"),
                Some(json!({"remote": remote})),
            )?;
            wait_job(c, &job, "pushing")
        }
        CheckpointCmd::Restore { target, force } => {
            let (v, n) = split_ref(&target)?;
            c.call(
                "POST",
                &format!("/v1/volumes/{v}/checkpoints/{n}/restore"),
                Some(json!({"force": force})),
            )
        }
        CheckpointCmd::Delete { target, remote } => {
            let (v, n) = split_ref(&target)?;
            match remote {
                Some(r) => c.call(
                    "DELETE",
                    &format!("/v1/remotes/{r}/checkpoints/{v}/{n}"),
                    None,
                ),
                None => c.call("DELETE", &format!("/v1/volumes/{v}/checkpoints/{n}"), None),
            }
        }
        CheckpointCmd::Diff { a, b } => c.call("POST", "/v1/diff", Some(json!({"a": a, "b": b}))),
    }
}

fn remote(c: &client::Client, r: RemoteCmd) -> Result<Value> {
    match r {
        RemoteCmd::Add {
            name,
            endpoint,
            bucket,
            region,
            prefix,
            credentials_file,
        } => {
            let credentials_file = credentials_file
                .map(|f| std::path::absolute(&f).context("credentials file path"))
                .transpose()?;
            c.call(
                "POST",
                "/v1/remotes",
                Some(
                    json!({"name": name, "endpoint": endpoint, "bucket": bucket, "region": region,
                            "prefix": prefix, "credentials_file": credentials_file}),
                ),
            )
        }
        RemoteCmd::List => c.call("GET", "/v1/remotes", None),
        RemoteCmd::Remove { name } => c.call("DELETE", &format!("/v1/remotes/{name}"), None),
        RemoteCmd::Gc {
            name,
            grace,
            dry_run,
        } => {
            let grace = parse_duration(&grace)?;
            c.call(
                "POST",
                &format!("/v1/remotes/{name}/gc"),
                Some(json!({"grace_secs": grace, "dry_run": dry_run})),
            )
        }
    }
}
