//! A host's worth of sandboxes (issue 16): `--volumes` volumes forked from one golden, each
//! exported over vhost-user-blk and driven at once by libblkio (no guest kernel between),
//! against one volume alone.
//!
//! - randread and randwrite, 4 KiB, QD8 per volume: the aggregate IOPS of all volumes at once
//!   against one volume alone at QD32 (the deepest one client keeps; the total queue depth of
//!   many volumes is higher), the median and worst per-volume p99 latency, and the daemon's
//!   RSS and threads while serving them;
//! - limits: every volume but one held to `--limit` write IOPS (`volume set
//!   --write-iops-limit`), all driven at once: how close each limited volume stays to its
//!   limit (target ±10%) and what the unlimited one gets;
//! - restart: the daemon SIGKILLed with `--volumes` volumes of which 8 are exported; the time
//!   from starting it again until all 8 exports have completed a read.
//!
//! Writes are not flushed here (what is compared is the serving path under load, both sides
//! unflushed). Usage: host-bench [--dir DIR] [--volumes N] [--size-mib N] [--secs S]
//! [--limit IOPS]. Needs `strata` built next to this binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_bench::blk::Client;
use strata_bench::{strata_cli, strata_serve, wait_for, R};

struct Args {
    dir: PathBuf,
    volumes: usize,
    size_mib: u64,
    secs: f64,
    limit: u64,
}

fn args() -> R<Args> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/strata-host-bench"),
        volumes: 64,
        size_mib: 256,
        secs: 5.0,
        limit: 100,
    };
    for (x, v) in strata_bench::flag_values()? {
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--volumes" => a.volumes = v.parse()?,
            "--size-mib" => a.size_mib = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            "--limit" => a.limit = v.parse()?,
            _ => return Err(format!("unknown argument {x}").into()),
        }
    }
    if a.volumes < 9 || a.size_mib < 16 || a.limit < 10 {
        return Err("--volumes at least 9, --size-mib at least 16, --limit at least 10".into());
    }
    Ok(a)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// RSS (MiB) and threads of a process.
fn rss_threads(pid: u32) -> (f64, u64) {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        st.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:") as f64 / 1024.0, field("Threads:"))
}

fn socket(dir: &Path, vol: &str) -> PathBuf {
    dir.join(format!("{vol}.sock"))
}

fn export(store: &Path, dir: &Path, vol: &str) -> R<()> {
    strata_cli(
        store,
        &[
            "export",
            "vhost-user",
            vol,
            "--socket",
            socket(dir, vol).to_str().ok_or("path")?,
        ],
    )
}

/// Per socket (IOPS, p99 ms), and the daemon's (RSS MiB, threads).
type Driven = (Vec<(f64, f64)>, (f64, u64));

/// One client per socket, all driven at once: (IOPS, p99 latency in ms) per socket, and the
/// daemon's RSS and threads sampled mid-run.
fn drive(sockets: &[PathBuf], write: bool, depth: usize, secs: f64, daemon: u32) -> R<Driven> {
    let start = std::sync::Barrier::new(sockets.len() + 1);
    std::thread::scope(|s| {
        let hs: Vec<_> = sockets
            .iter()
            .map(|sock| {
                let start = &start;
                s.spawn(move || -> Result<(f64, f64), String> {
                    let c = Client::connect(sock).map_err(|e| e.to_string());
                    start.wait();
                    let mut c = c?;
                    let (rate, lat) = c
                        .run_timed(write, true, 4096, depth, secs)
                        .map_err(|e| e.to_string())?;
                    let ms: Vec<f64> = lat.iter().map(|d| d.as_secs_f64() * 1e3).collect();
                    Ok((rate.unflushed, percentile(ms, 0.99)))
                })
            })
            .collect();
        start.wait();
        std::thread::sleep(Duration::from_secs_f64(secs / 2.0));
        let usage = rss_threads(daemon);
        let mut out = Vec::new();
        for h in hs {
            out.push(h.join().map_err(|_| "client panicked")??);
        }
        Ok((out, usage))
    })
}

fn main() -> R<()> {
    let a = args()?;
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let (mut srv, store) = strata_serve(&a.dir)?;
    let size = format!("{}M", a.size_mib);
    strata_cli(&store, &["volume", "create", "golden", "--size", &size])?;
    export(&store, &a.dir, "golden")?;
    Client::connect(&socket(&a.dir, "golden"))?.pass(7)?;
    strata_cli(&store, &["unexport", "golden"])?;
    strata_cli(&store, &["checkpoint", "create", "golden@v1"])?;
    let names: Vec<String> = (0..a.volumes).map(|i| format!("sb{i}")).collect();
    for n in &names {
        strata_cli(&store, &["volume", "create", n, "--from", "golden@v1"])?;
        export(&store, &a.dir, n)?;
    }
    let sockets: Vec<PathBuf> = names.iter().map(|n| socket(&a.dir, n)).collect();
    let pid = srv.child.id();
    println!(
        "# host-bench: {} volumes of {} MiB forked from one golden, vhost-user, libblkio 4 KiB \
         random, {} s per phase, unflushed",
        a.volumes, a.size_mib, a.secs
    );
    let (idle_rss, idle_threads) = rss_threads(pid);
    println!(
        "daemon with {} exports, idle: RSS {idle_rss:.0} MiB, {idle_threads} threads",
        a.volumes
    );
    for write in [false, true] {
        let shape = if write { "randwrite" } else { "randread" };
        let (one, _) = drive(&sockets[..1], write, 32, a.secs, pid)?;
        let (all, (rss, threads)) = drive(&sockets, write, 8, a.secs, pid)?;
        let total: f64 = all.iter().map(|r| r.0).sum();
        let p99s: Vec<f64> = all.iter().map(|r| r.1).collect();
        println!(
            "{shape}: 1 volume QD32 {:.0} IOPS (p99 {:.2} ms); {} volumes QD8 each {total:.0} IOPS \
             aggregate = {:.2}x; per-volume IOPS min {:.0} median {:.0}; per-volume p99 median \
             {:.2} ms, worst {:.2} ms; daemon RSS {rss:.0} MiB, {threads} threads",
            one[0].0,
            one[0].1,
            a.volumes,
            total / one[0].0,
            percentile(all.iter().map(|r| r.0).collect(), 0.0),
            percentile(all.iter().map(|r| r.0).collect(), 0.5),
            percentile(p99s.clone(), 0.5),
            percentile(p99s, 1.0),
        );
    }

    // Limits: all but the first held to `limit` write IOPS.
    let limit = a.limit.to_string();
    for n in &names[1..] {
        strata_cli(&store, &["volume", "set", n, "--write-iops-limit", &limit])?;
    }
    let (all, _) = drive(&sockets, true, 8, a.secs, pid)?;
    let limited: Vec<f64> = all[1..].iter().map(|r| r.0 / a.limit as f64).collect();
    let within = limited.iter().filter(|r| (0.9..=1.1).contains(*r)).count();
    println!(
        "limits: {} volumes at --write-iops-limit {}: IOPS / limit min {:.3} median {:.3} max \
         {:.3}, {within} of {} within ±10%; the unlimited volume beside them {:.0} IOPS",
        limited.len(),
        a.limit,
        percentile(limited.clone(), 0.0),
        percentile(limited.clone(), 0.5),
        percentile(limited.clone(), 1.0),
        limited.len(),
        all[0].0
    );
    for n in &names[1..] {
        strata_cli(&store, &["volume", "set", n, "--write-iops-limit", "0"])?;
    }

    // Restart with 8 of the volumes exported.
    for n in &names[8..] {
        strata_cli(&store, &["unexport", n])?;
    }
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let _ = srv.child.wait();
    let t = Instant::now();
    let (srv2, _) = strata_serve(&a.dir)?;
    let up = t.elapsed();
    std::thread::scope(|s| -> R<()> {
        let hs: Vec<_> = sockets[..8]
            .iter()
            .map(|sock| {
                s.spawn(move || -> Result<(), String> {
                    wait_for(sock).map_err(|e| e.to_string())?;
                    let mut c = Client::connect(sock).map_err(|e| e.to_string())?;
                    c.run(false, true, 4096, 1, 0.0)
                        .map_err(|e| e.to_string())?;
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().map_err(|_| "client panicked")??;
        }
        Ok(())
    })?;
    println!(
        "restart: SIGKILLed with {} volumes, 8 exported: API up {:.3} s, all 8 exports served a \
         read {:.3} s after the start",
        a.volumes,
        up.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    drop(srv2);
    Ok(())
}
