//! Remotes (issue 6) against a plain S3 client, in one run, on one Garage 2.5.0 node on
//! loopback:
//!
//! - push of a fully written checkpoint (`strata checkpoint push`, wall clock of the CLI)
//!   against uploading the same raw image with the AWS CLI (`aws s3 cp`, multipart, 10
//!   concurrent requests), `--runs` times alternating, medians and their ratio;
//! - incremental pushes after changing 1% of the volume (4 KiB writes through the FUSE
//!   image), median, and the full/incremental ratio;
//! - lazy restore on a fresh store: `volume create --lazy` and the first 4 KiB read through
//!   a FUSE export (time to first IO), then the time until background hydration finishes;
//! - eager restore (`volume create --from`) against downloading the raw image with
//!   `aws s3 cp` to a file.
//!
//! - protection (issue 15): 4 KiB random writes with an fdatasync every 32 (a writer
//!   through the FUSE image export, standing in for a guest) without and with a 5 s
//!   protection policy, alternating, medians and their ratio; and the RPO a user would see
//!   (`rpo_secs` of `volume info` sampled at random instants): p50 and p99.
//!
//! - forks (issue 15): a golden of `--size-mib` pushed once; on a second store, a lazy
//!   restore of it, a checkpoint, and `--forks` O(1) forks of that checkpoint, each
//!   hydrating in the background: bytes fetched from the remote until every fork holds all
//!   its blocks locally (against the golden's size), the store's disk use, and the time.
//!
//! Usage: remote-bench [--dir DIR] [--size-mib N] [--runs N] [--secs N]
//!        [--only protection|forks] [--push-rate RATE (the protection daemon's, e.g. 20M)]
//!        [--forks N (default 100)] [--garage-dir DIR (Garage's data and metadata; default
//!        under --dir, on the store's disk; a tmpfs stands in for a remote on another host's
//!        disks)] [--garage-nice N (every Garage thread at nice N: a stand-in for a remote on
//!        another host's CPUs)] [--garage-idle on|off (every Garage thread at SCHED_IDLE: it
//!        runs only on CPUs nothing else wants, the closer stand-in; default off)]
//! Needs `strata` built next to this binary, garage (scripts/setup.sh) and the AWS CLI
//! (`pip install awscli`).

use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_bench::{strata_bin, wait_for, Server, R};
use strata_tests::garage::{self, Garage};

struct Args {
    dir: PathBuf,
    size_mib: usize,
    runs: usize,
    /// Seconds of each protection phase.
    secs: f64,
    /// Run only this section (`protection`).
    only: Option<String>,
    /// `strata serve --push-rate` for the protection section.
    push_rate: Option<String>,
    /// `--push-yield off`: `strata serve --no-push-yield` for the protection section.
    push_yield: bool,
    /// Forks of the golden in the forks section.
    forks: usize,
    /// Where Garage keeps its data and metadata (default: under `dir`, on the store's disk).
    garage_dir: Option<PathBuf>,
    /// Nice value for every Garage thread (a stand-in for a remote on another host's CPUs).
    garage_nice: Option<i32>,
    garage_idle: bool,
}

fn args() -> R<Args> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/strata-remote-bench"),
        size_mib: 2048,
        runs: 3,
        secs: 15.0,
        only: None,
        push_rate: None,
        push_yield: true,
        forks: 100,
        garage_dir: None,
        garage_nice: None,
        garage_idle: false,
    };
    for (x, v) in strata_bench::flag_values()? {
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--size-mib" => a.size_mib = v.parse()?,
            "--runs" => a.runs = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            "--push-rate" => a.push_rate = Some(v),
            "--push-yield" => {
                a.push_yield = match v.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("--push-yield is on or off, not {v:?}").into()),
                }
            }
            "--only" if v == "protection" || v == "forks" => a.only = Some(v),
            "--forks" => a.forks = v.parse()?,
            "--garage-dir" => a.garage_dir = Some(PathBuf::from(v)),
            "--garage-nice" => a.garage_nice = Some(v.parse()?),
            "--garage-idle" => {
                a.garage_idle = match v.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("--garage-idle is on or off, not {v:?}").into()),
                }
            }
            _ => return Err(format!("unknown argument {x}").into()),
        }
    }
    if a.runs == 0 || a.size_mib < 16 {
        return Err("--runs must be at least 1 and --size-mib at least 16".into());
    }
    Ok(a)
}

fn cli(store: &Path, args: &[&str]) -> R<Value> {
    let out = Command::new(strata_bin()?)
        .arg("--store")
        .arg(store)
        .arg("--json")
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!("strata {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A fully written image of `mib` MiB (no holes, not compressible).
fn write_image(raw: &Path, mib: usize) -> R<()> {
    let f = std::fs::File::create(raw)?;
    let mut buf = Vec::with_capacity(1 << 20);
    for chunk in 0..mib as u64 {
        buf.clear();
        for b in 0..256 {
            buf.extend_from_slice(&strata_tests::block_content(chunk * 256 + b, 77, 4096));
        }
        f.write_all_at(&buf, chunk << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The body of `GET path` on the daemon's API socket (no process started, unlike [`cli`]:
/// cheap enough to sample beside a measured writer).
fn api_get(store: &Path, path: &str) -> R<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(store.join("strata.sock"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map_or(out.clone(), |(_, b)| b.to_string()))
}

/// One series of the daemon's /metrics (0 when absent).
fn metric(store: &Path, series: &str) -> R<f64> {
    Ok(metric_opt(store, series)?.unwrap_or(0.0))
}

/// One series of the daemon's /metrics, if present.
fn metric_opt(store: &Path, series: &str) -> R<Option<f64>> {
    Ok(api_get(store, "/metrics")?.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    }))
}

/// Bytes the files under `dir` occupy on disk.
fn disk_bytes(dir: &Path) -> R<u64> {
    let out = Command::new("du").arg("-sB1").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().ok_or("du")?.parse()?)
}

fn daemon(dir: &Path, name: &str) -> R<(Server, PathBuf)> {
    daemon_with(dir, name, &[])
}

fn daemon_with(dir: &Path, name: &str, serve_args: &[&str]) -> R<(Server, PathBuf)> {
    let store = dir.join(name);
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(strata_bin()?)
        .arg("--store")
        .arg(&store)
        .arg("serve")
        .args(serve_args)
        .env("AWS_ACCESS_KEY_ID", garage::KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", garage::SECRET)
        .stderr(log)
        .spawn()?;
    let srv = Server {
        child,
        socket: store.join("strata.sock"),
    };
    wait_for(&srv.socket)?;
    Ok((srv, store))
}

fn add_remote(store: &Path, name: &str, endpoint: &str) -> R<()> {
    cli(
        store,
        &[
            "remote",
            "add",
            name,
            "--endpoint",
            endpoint,
            "--bucket",
            garage::BUCKET,
            "--region",
            garage::REGION,
            "--prefix",
            name,
        ],
    )?;
    Ok(())
}

fn aws(endpoint: &str, args: &[&str]) -> R<Duration> {
    let t = Instant::now();
    let out = Command::new("aws")
        .args(["--endpoint-url", endpoint])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", garage::KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", garage::SECRET)
        .env("AWS_DEFAULT_REGION", garage::REGION)
        .output()
        .map_err(|e| format!("running aws (pip install awscli): {e}"))?;
    if !out.status.success() {
        return Err(format!("aws {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(t.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed<T>(f: impl FnOnce() -> R<T>) -> R<(T, f64)> {
    let t = Instant::now();
    let r = f()?;
    Ok((r, t.elapsed().as_secs_f64()))
}

fn fuse_mount(store: &Path, vol: &str, mnt: &Path) -> R<()> {
    std::fs::create_dir_all(mnt)?;
    cli(
        store,
        &[
            "export",
            "fuse",
            vol,
            "--mountpoint",
            mnt.to_str().ok_or("path")?,
        ],
    )?;
    Ok(())
}

fn main() -> R<()> {
    let a = args()?;
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let gdir = a.garage_dir.clone().unwrap_or_else(|| a.dir.join("garage"));
    let _ = std::fs::remove_dir_all(&gdir);
    let garage = Garage::single(&gdir);
    println!("# garage keeps its data in {}", gdir.display());
    // Garage's priority, for the stand-ins of a remote on other CPUs.
    let pid = garage.nodes[0].pid().ok_or("garage is not running")?;
    let quiet = |c: &mut Command, what: &str| -> R<()> {
        match c.stdout(std::process::Stdio::null()).status()?.success() {
            true => Ok(()),
            false => Err(format!("{what} of garage failed").into()),
        }
    };
    if let Some(n) = a.garage_nice {
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))?
            .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .collect();
        quiet(
            Command::new("renice")
                .args(["-n", &n.to_string(), "-p"])
                .args(&tids),
            "renice",
        )?;
        println!("# garage runs at nice {n} ({} threads)", tids.len());
    }
    if a.garage_idle {
        // Threads Garage starts later inherit the policy.
        quiet(
            Command::new("chrt").args(["--all-tasks", "--idle", "--pid", "0", &pid.to_string()]),
            "chrt --idle",
        )?;
        println!("# garage runs at SCHED_IDLE");
    }
    let ep = garage.endpoint();
    match a.only.as_deref() {
        Some("protection") => return protection(&a, &ep),
        Some("forks") => return forks(&a, &ep),
        _ => {}
    }
    let size = a.size_mib << 20;
    let bytes = size as f64;
    let mib = |b: f64| b / (1 << 20) as f64;

    // A fully written image (no holes, not compressible): what both sides upload.
    let raw = a.dir.join("image.raw");
    write_image(&raw, a.size_mib)?;
    let (_a, sa) = daemon(&a.dir, "store-a")?;
    cli(
        &sa,
        &[
            "volume",
            "create",
            "vm",
            "--size",
            &format!("{}M", a.size_mib),
        ],
    )?;
    cli(&sa, &["import", "vm", raw.to_str().ok_or("path")?])?;
    cli(&sa, &["checkpoint", "create", "vm@c0"])?;

    println!(
        "# remote-bench: {} MiB, {} runs, garage {ep}",
        a.size_mib, a.runs
    );
    // Garage's first large upload pays for setting up its data files: a warm-up upload
    // (not timed) so that neither side pays it.
    aws(
        &ep,
        &[
            "s3",
            "cp",
            "--quiet",
            raw.to_str().ok_or("path")?,
            &format!("s3://{}/warmup.img", garage::BUCKET),
        ],
    )?;
    let (mut push, mut peer) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        let r = format!("r{run}");
        add_remote(&sa, &r, &ep)?;
        // Both sides start with the image's pages written back and cached.
        Command::new("sync").status()?;
        let (v, t) = timed(|| cli(&sa, &["checkpoint", "push", "vm@c0", "--remote", &r]))?;
        println!(
            "run {run}: strata push {:.2} s ({:.0} MiB/s, {} MiB uploaded, in-daemon {:.2} s)",
            t,
            mib(bytes) / t,
            v["uploaded_bytes"].as_u64().unwrap_or(0) >> 20,
            v["seconds"].as_f64().unwrap_or(0.0)
        );
        push.push(t);
        let key = format!("s3://{}/raw/{run}.img", garage::BUCKET);
        Command::new("sync").status()?;
        let t = aws(
            &ep,
            &["s3", "cp", "--quiet", raw.to_str().ok_or("path")?, &key],
        )?
        .as_secs_f64();
        println!(
            "run {run}: aws s3 cp   {:.2} s ({:.0} MiB/s)",
            t,
            mib(bytes) / t
        );
        peer.push(t);
    }
    let (mp, mq) = (median(push.clone()), median(peer.clone()));
    println!(
        "full push: strata {:.2} s ({:.0} MiB/s), aws s3 cp {:.2} s ({:.0} MiB/s), throughput ratio {:.2}",
        mp,
        mib(bytes) / mp,
        mq,
        mib(bytes) / mq,
        mq / mp
    );

    // Incremental: 1% of the blocks rewritten through the FUSE image, then pushed to r0.
    let mnt = a.dir.join("mnt-a");
    let blocks = (size / 4096) as u64;
    let mut incr = Vec::new();
    let mut x = 0x9E37_79B9u64;
    for run in 0..a.runs {
        fuse_mount(&sa, "vm", &mnt)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("vm.img"))?;
        for _ in 0..blocks / 100 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x % blocks;
            f.write_all_at(
                &strata_tests::block_content(b, 1000 + run as u64, 4096),
                b * 4096,
            )?;
        }
        f.sync_all()?;
        drop(f);
        cli(&sa, &["unexport", "vm"])?;
        let ck = format!("vm@c{}", run + 1);
        cli(&sa, &["checkpoint", "create", &ck])?;
        let (v, t) = timed(|| cli(&sa, &["checkpoint", "push", &ck, "--remote", "r0"]))?;
        println!(
            "run {run}: incremental push {:.3} s, {} KiB uploaded ({:.2}% of the volume), base {}, phases (ms) {}, manifest {} KiB",
            t,
            v["uploaded_bytes"].as_u64().unwrap_or(0) >> 10,
            v["uploaded_bytes"].as_f64().unwrap_or(0.0) * 100.0 / bytes,
            v["base"],
            v["phases_ms"],
            v["manifest_bytes"].as_u64().unwrap_or(0) >> 10
        );
        incr.push(t);
    }
    let mi = median(incr);
    println!(
        "incremental push (1%): {:.3} s; full push / incremental = {:.1}x",
        mi,
        mp / mi
    );

    // Restores on a fresh store.
    let (_b, sb) = daemon(&a.dir, "store-b")?;
    add_remote(&sb, "r0", &ep)?;
    let (mut ttfio, mut hyd, mut eager, mut down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.runs {
        let vol = format!("lazy{run}");
        let t0 = Instant::now();
        cli(
            &sb,
            &["volume", "create", &vol, "--from", "r0:vm@c0", "--lazy"],
        )?;
        let create = t0.elapsed().as_secs_f64();
        let m = a.dir.join(format!("mnt-{vol}"));
        let (_, export) = timed(|| fuse_mount(&sb, &vol, &m))?;
        let f = std::fs::File::open(m.join(format!("{vol}.img")))?;
        let mut buf = vec![0u8; 4096];
        let off = (blocks / 3 + run as u64 * 7919) % blocks * 4096;
        let (_, first) = timed(|| Ok(f.read_exact_at(&mut buf, off)?))?;
        let expect = strata_tests::block_content(off / 4096, 77, 4096);
        if buf != expect {
            return Err(format!("lazy read at {off} returned wrong data").into());
        }
        drop(f);
        println!(
            "run {run}: lazy create {:.3} s, export {:.3} s, first 4 KiB read {:.1} ms: time to first IO {:.3} s",
            create,
            export,
            first * 1000.0,
            create + first
        );
        ttfio.push(create + first);
        loop {
            let v = cli(&sb, &["volume", "info", &vol])?;
            if v["remote_bytes"] == 0 && v["hydration"].is_null() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let h = t0.elapsed().as_secs_f64();
        println!(
            "run {run}: background hydration done {:.2} s after create ({:.0} MiB/s)",
            h,
            mib(bytes) / h
        );
        hyd.push(h);
        cli(&sb, &["unexport", &vol])?;
        cli(&sb, &["volume", "delete", &vol])?;

        let ev = format!("eager{run}");
        let (_, t) = timed(|| cli(&sb, &["volume", "create", &ev, "--from", "r0:vm@c0"]))?;
        println!(
            "run {run}: eager restore {:.2} s ({:.0} MiB/s)",
            t,
            mib(bytes) / t
        );
        eager.push(t);
        cli(&sb, &["volume", "delete", &ev])?;
        let out = a.dir.join("download.raw");
        let key = format!("s3://{}/raw/0.img", garage::BUCKET);
        let t = aws(
            &ep,
            &["s3", "cp", "--quiet", &key, out.to_str().ok_or("path")?],
        )?
        .as_secs_f64();
        std::fs::remove_file(&out)?;
        println!(
            "run {run}: aws s3 cp download {:.2} s ({:.0} MiB/s)",
            t,
            mib(bytes) / t
        );
        down.push(t);
    }
    let (mt, mh, me, md) = (median(ttfio), median(hyd), median(eager), median(down));
    println!(
        "lazy restore: time to first IO {:.3} s (target < 1 s); hydration {:.2} s ({:.0} MiB/s)",
        mt,
        mh,
        mib(bytes) / mh
    );
    println!(
        "eager restore: {:.2} s ({:.0} MiB/s); aws s3 cp download {:.2} s ({:.0} MiB/s); ratio {:.2}",
        me,
        mib(bytes) / me,
        md,
        mib(bytes) / md,
        md / me
    );
    protection(&a, &ep)
}

/// 4 KiB random writes to `img` (of `blocks` blocks) for `secs`, an fdatasync after every
/// 32; returns writes per second, flushes included.
fn randwrite(img: &Path, blocks: u64, secs: f64, seed: u64) -> R<f64> {
    let f = std::fs::OpenOptions::new().write(true).open(img)?;
    let mut buf = vec![0u8; 4096];
    let mut x = seed | 1;
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[..8].copy_from_slice(&n.to_le_bytes());
            buf[8..16].copy_from_slice(&x.to_le_bytes());
            f.write_all_at(&buf, (x % blocks) * 4096)?;
            n += 1;
        }
        f.sync_data()?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The protection section: IOPS without and with a 5 s policy, and the RPO observed.
fn protection(a: &Args, ep: &str) -> R<()> {
    let mut rate: Vec<&str> = match &a.push_rate {
        Some(r) => vec!["--push-rate", r],
        None => vec![],
    };
    if !a.push_yield {
        rate.push("--no-push-yield");
    }
    let (_d, st) = daemon_with(&a.dir, "store-p", &rate)?;
    add_remote(&st, "g", ep)?;
    cli(
        &st,
        &[
            "volume",
            "create",
            "pv",
            "--size",
            &format!("{}M", a.size_mib),
        ],
    )?;
    let mnt = a.dir.join("mnt-p");
    fuse_mount(&st, "pv", &mnt)?;
    let img = mnt.join("pv.img");
    let blocks = (a.size_mib as u64) << 8;
    // Fully written first, so that both phases overwrite mapped blocks.
    randwrite(&img, blocks, 3.0, 99)?;
    // A policy set with no writer running, and its first round (everything not yet in the
    // remote) waited for: the protected phases then measure a protected volume's steady
    // state (rounds carrying what the writer changes while protected), not the catch-up
    // upload of what the plain phase before changed.
    // Polls `volume info` until `done` holds for its protection object (10 minutes at most).
    let wait_round = |done: &dyn Fn(&Value) -> bool| -> R<f64> {
        let t = Instant::now();
        while !done(&cli(&st, &["volume", "info", "pv"])?["protection"]) {
            if t.elapsed() > Duration::from_secs(600) {
                return Err("a protection round did not finish in 10 minutes".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let protect_settled = || -> R<f64> {
        let t = Instant::now();
        cli(&st, &["volume", "protect", "pv", "--every", "5s"])?;
        wait_round(&|p| p["pushes"].as_u64().unwrap_or(0) > 0)?;
        Ok(t.elapsed().as_secs_f64())
    };
    // After a protected phase: the round still running (if one is) ends before the policy
    // goes, so that it does not run into the next plain phase.
    let unprotect_settled = || -> R<()> {
        wait_round(&|p| p["running"] != Value::Bool(true))?;
        cli(&st, &["volume", "unprotect", "pv"])?;
        Ok(())
    };
    let first = protect_settled()?;
    unprotect_settled()?;
    println!("# first round (the whole volume, no writer): {first:.1} s");
    println!(
        "# protection: {} MiB volume, 4 KiB random writes + fdatasync every 32 through the FUSE \
         image export (page cache on), {} s phases, policy --every 5s, {} runs, push rate \
         ceiling {}, pushes yield to the guest: {}",
        a.size_mib,
        a.secs,
        a.runs,
        a.push_rate.as_deref().unwrap_or("none"),
        if a.push_yield { "on" } else { "off" }
    );
    let (mut plain, mut protected, mut rpo) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.runs {
        let base = randwrite(&img, blocks, a.secs, 2 * run as u64 + 1)?;
        let catch_up = protect_settled()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (st, stop) = (st.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ run as u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    std::thread::sleep(Duration::from_millis(100 + x % 300));
                    // From /metrics, not `volume info`: the latter also diffs the live map
                    // against the protected checkpoint (`bytes_behind`), work that polling
                    // it four times a second would add to the phase it measures.
                    let series = "strata_protect_rpo_seconds{volume=\"pv\"}";
                    if let Ok(Some(r)) = metric_opt(&st, series) {
                        out.push(r);
                    }
                }
                out
            })
        };
        let with = randwrite(&img, blocks, a.secs, 2 * run as u64 + 2)?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rpo.extend(sampler.join().map_err(|_| "sampler panicked")?);
        let p = cli(&st, &["volume", "info", "pv"])?["protection"].clone();
        unprotect_settled()?;
        println!(
            "run {run}: no policy {base:.0} IOPS, 5 s policy {with:.0} IOPS ({:.2}x); rounds {} \
             (the first, {catch_up:.1} s, before the writer), failures {}, last round {:.2} s",
            with / base,
            p["pushes"],
            p["failures"],
            p["last_round_secs"].as_f64().unwrap_or(0.0)
        );
        plain.push(base);
        protected.push(with);
    }
    let (mb, mp) = (median(plain), median(protected));
    println!(
        "protection: medians {mb:.0} IOPS without a policy, {mp:.0} with a 5 s policy: ratio {:.2}",
        mp / mb
    );
    if rpo.is_empty() {
        return Err("no RPO samples (no round finished)".into());
    }
    println!(
        "protection: RPO at {} random instants: p50 {:.2} s, p99 {:.2} s",
        rpo.len(),
        percentile(rpo.clone(), 0.5),
        percentile(rpo, 0.99)
    );
    cli(&st, &["unexport", "pv"])?;
    Ok(())
}

fn forks(a: &Args, ep: &str) -> R<()> {
    let raw = a.dir.join("golden.raw");
    write_image(&raw, a.size_mib)?;
    let (_a, sa) = daemon(&a.dir, "store-a")?;
    add_remote(&sa, "g", ep)?;
    let size = format!("{}M", a.size_mib);
    cli(&sa, &["volume", "create", "golden", "--size", &size])?;
    cli(&sa, &["import", "golden", raw.to_str().ok_or("path")?])?;
    cli(&sa, &["checkpoint", "create", "golden@v1"])?;
    let pushed = cli(&sa, &["checkpoint", "push", "golden@v1", "--remote", "g"])?;
    let golden = pushed["uploaded_bytes"].as_u64().ok_or("uploaded_bytes")?;
    drop(_a);
    let (_b, sb) = daemon(&a.dir, "store-b")?;
    add_remote(&sb, "g", ep)?;
    let disk0 = disk_bytes(&sb)?;
    println!(
        "# forks: golden {} MiB ({} MiB pushed), {} lazy forks on a fresh store",
        a.size_mib,
        golden >> 20,
        a.forks
    );
    let t0 = Instant::now();
    cli(
        &sb,
        &[
            "volume",
            "create",
            "golden",
            "--from",
            "g:golden@v1",
            "--lazy",
        ],
    )?;
    cli(&sb, &["checkpoint", "create", "golden@base"])?;
    let names: Vec<String> = (0..a.forks).map(|i| format!("sb{i}")).collect();
    for n in &names {
        cli(&sb, &["volume", "create", n, "--from", "golden@base"])?;
    }
    let created = t0.elapsed().as_secs_f64();
    println!(
        "forks: lazy restore + checkpoint + {} forks in {:.2} s",
        a.forks, created
    );
    let mut left: Vec<String> = names.clone();
    left.push("golden".into());
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !left.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("{} volumes still hydrating after an hour", left.len()).into());
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut still = Vec::new();
        for n in left {
            let v = cli(&sb, &["volume", "info", &n])?;
            if let Some(e) = v["hydration"]["last_error"].as_str() {
                return Err(format!("{n}: hydration failed: {e}").into());
            }
            if v["remote_bytes"] != 0 || !v["hydration"].is_null() {
                still.push(n);
            }
        }
        left = still;
    }
    let all = t0.elapsed().as_secs_f64();
    let fetched = metric(&sb, "strata_remote_fetched_bytes_total{remote=\"g\"}")?;
    let shared = metric(&sb, "strata_remote_shared_bytes_total")?;
    let disk = disk_bytes(&sb)?.saturating_sub(disk0);
    let g = golden as f64;
    println!(
        "forks: every fork hydrated {all:.1} s after the restore began; fetched {:.0} MiB \
         from the remote = {:.2}x the golden (without sharing: {}x); {:.0} MiB installed from \
         shared copies; store grew by {:.0} MiB = {:.2}x the golden",
        fetched / (1 << 20) as f64,
        fetched / g,
        a.forks + 1,
        shared / (1 << 20) as f64,
        disk as f64 / (1 << 20) as f64,
        disk as f64 / g
    );
    // Every fork reads the golden's bytes (a sample of blocks per fork).
    let mnt = a.dir.join("mnt-f");
    let img_file = std::fs::File::open(&raw)?;
    let blocks = (a.size_mib as u64) << 8;
    for (i, n) in names.iter().enumerate().step_by((a.forks / 10).max(1)) {
        fuse_mount(&sb, n, &mnt)?;
        let f = std::fs::File::open(mnt.join(format!("{n}.img")))?;
        let (mut want, mut got) = (vec![0u8; 4096], vec![0u8; 4096]);
        for k in 0..64u64 {
            let b = (k * 7919 + i as u64 * 104_729) % blocks;
            img_file.read_exact_at(&mut want, b * 4096)?;
            f.read_exact_at(&mut got, b * 4096)?;
            if want != got {
                return Err(format!("{n}: block {b} differs from the golden").into());
            }
        }
        drop(f);
        cli(&sb, &["unexport", n])?;
    }
    println!("forks: sampled blocks of every tenth fork read back the golden's bytes");
    Ok(())
}
