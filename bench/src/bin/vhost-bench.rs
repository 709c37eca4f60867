//! Strata's vhost-user-blk export against qemu-storage-daemon (raw and qcow2 on the same
//! filesystem, `cache.direct=off`: both sides use the host page cache), driven by the same
//! user-space virtio-blk driver (libblkio's `virtio-blk-vhost-user`) in one run, so no guest
//! kernel hides the backends' speed.
//!
//! Per target and round, on a fresh 1 GiB disk: a sequential fill with 1 MiB requests then
//! one FLUSH (timed to the flush's completion: what copying an image in costs), 1 MiB
//! sequential read QD8 of what the fill wrote, 4 KiB random
//! read QD32, 4 KiB random write QD32, 1 MiB sequential read QD8 (after the random writes),
//! 1 MiB sequential write QD8, a second 1 GiB sequential pass with a FLUSH, and 4 KiB random
//! write right after a checkpoint (a qcow2 internal snapshot for the peer). Every write shape
//! ends with one FLUSH inside its timing (a write-back cache answers unflushed writes from
//! memory); the unflushed figure is printed beside it. Rounds alternate the targets; medians
//! of the rounds and their ratios are printed. Results: docs/BENCHMARKS.md.
//!
//! Usage: vhost-bench [--dir DIR] [--size-mib N] [--secs S] [--rounds N]
//! Needs `strata` built next to this binary, qemu-storage-daemon and qemu-img.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use strata_bench::blk::{Client, Rate, SLOT};
use strata_bench::{strata_cli, strata_daemon, wait_for, Server, R};

struct Args {
    dir: PathBuf,
    size: u64,
    secs: f64,
    rounds: usize,
}

fn args() -> R<Args> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/strata-vhost-bench"),
        size: 1 << 30,
        secs: 4.0,
        rounds: 3,
    };
    for (x, v) in strata_bench::flag_values()? {
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--size-mib" => a.size = v.parse::<u64>()? << 20,
            "--secs" => a.secs = v.parse()?,
            "--rounds" => a.rounds = v.parse()?,
            _ => return Err(format!("unknown argument {x}").into()),
        }
    }
    Ok(a)
}

fn qsd(dir: &Path, image: &Path, format: &str, name: &str) -> R<Server> {
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={},cache.direct=off", image.display()))
        .arg("--blockdev")
        .arg(format!("driver={format},node-name=disk0,file=file0"))
        .arg("--export")
        .arg(format!("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=1", socket.display()))
        .stdout(Stdio::null())
        .spawn()?;
    let s = Server { child, socket };
    wait_for(&s.socket)?;
    Ok(s)
}

fn strata_server(dir: &Path, size: u64) -> R<(Server, PathBuf)> {
    let (mut srv, store) = strata_daemon(dir, size)?;
    let socket = dir.join("strata.vhost.sock");
    strata_cli(
        &store,
        &[
            "export",
            "vhost-user",
            "bench",
            "--socket",
            socket.to_str().ok_or("path")?,
        ],
    )?;
    srv.socket = socket;
    Ok((srv, store))
}

#[derive(Default, Clone, Copy)]
struct Row {
    fill: f64,
    sr0: f64,
    rr: f64,
    rw: Rate,
    sr: f64,
    sw: Rate,
    pass: f64,
    after: Rate,
}

/// Every shape but the after-snapshot one, on one connection.
fn measure(socket: &Path, secs: f64) -> R<Row> {
    let mut c = Client::connect(socket)?;
    let fill = c.pass(0x5a)?;
    Ok(Row {
        fill,
        sr0: c.run(false, false, SLOT, 8, secs)?.unflushed,
        rr: c.run(false, true, 4096, 32, secs)?.unflushed,
        rw: c.run(true, true, 4096, 32, secs)?,
        sr: c.run(false, false, SLOT, 8, secs)?.unflushed,
        sw: c.run(true, false, SLOT, 8, secs)?,
        pass: c.pass(0xa5)?,
        after: Rate::default(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn create_images(dir: &Path, size: u64) -> R<(PathBuf, PathBuf)> {
    let raw = dir.join("disk.raw");
    let qcow = dir.join("disk.qcow2");
    for (img, fmt) in [(&raw, "raw"), (&qcow, "qcow2")] {
        let _ = std::fs::remove_file(img);
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(img)
            .arg(size.to_string())
            .status()?;
        if !st.success() {
            return Err("qemu-img create failed".into());
        }
    }
    Ok((raw, qcow))
}

/// One round: each target on a fresh disk, the after-checkpoint shape last.
fn round(a: &Args, stall: &mut Option<String>) -> R<[Row; 3]> {
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let (raw, qcow) = create_images(&a.dir, a.size)?;
    let (srv, store) = strata_server(&a.dir, a.size)?;
    let mut strata = measure(&srv.socket, a.secs)?;
    strata_cli(&store, &["checkpoint", "create", "bench@c1"])?;
    strata.after = Client::connect(&srv.socket)?.run(true, true, 4096, 32, a.secs)?;
    if stall.is_none() {
        *stall = Some(checkpoint_stall(&srv.socket, &store, a.secs)?);
    }
    drop(srv);

    let srv = qsd(&a.dir, &raw, "raw", "qsd-raw")?;
    let qraw = measure(&srv.socket, a.secs)?;
    drop(srv);

    let srv = qsd(&a.dir, &qcow, "qcow2", "qsd-qcow2")?;
    let mut qq = measure(&srv.socket, a.secs)?;
    drop(srv);
    let st = Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&qcow)
        .status()?;
    if !st.success() {
        return Err("qemu-img snapshot failed".into());
    }
    let srv = qsd(&a.dir, &qcow, "qcow2", "qsd-qcow2-snap")?;
    qq.after = Client::connect(&srv.socket)?.run(true, true, 4096, 32, a.secs)?;
    drop(srv);
    Ok([strata, qraw, qq])
}

fn main() -> R<()> {
    let a = args()?;
    println!(
        "vhost-bench: {} MiB disks in {}, {} s per shape, one queue, {} rounds (medians)",
        a.size >> 20,
        a.dir.display(),
        a.secs,
        a.rounds
    );
    let mut rounds: Vec<[Row; 3]> = Vec::new();
    let mut stall = None;
    for _ in 0..a.rounds {
        rounds.push(round(&a, &mut stall)?);
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    let med = |t: usize, f: fn(&Row) -> f64| median(rounds.iter().map(|r| f(&r[t])).collect());
    println!(
        "{:<40} {:>14} {:>14} {:>14} {:>9} {:>9}",
        "shape", "strata", "qsd raw", "qsd qcow2", "vs raw", "vs qcow2"
    );
    let line = |name: &str, f: fn(&Row) -> f64, unit: &str| {
        let (s, r, q) = (med(0, f), med(1, f), med(2, f));
        println!(
            "{name:<40} {s:>10.0} {unit:<3} {r:>10.0} {unit:<3} {q:>10.0} {unit:<3} {:>9.2} {:>9.2}",
            s / r,
            s / q
        );
    };
    line("1 GiB fill 1M QD8 + FLUSH", |r| r.fill, "MiB");
    line("1M seqread QD8 (after the fill)", |r| r.sr0, "MiB");
    line("4K randread QD32", |r| r.rr, "iops");
    line("4K randwrite QD32 + FLUSH", |r| r.rw.flushed, "iops");
    line("  (unflushed)", |r| r.rw.unflushed, "iops");
    line("1M seqread QD8 (after randwrite)", |r| r.sr, "MiB");
    line("1M seqwrite QD8 + FLUSH", |r| r.sw.flushed, "MiB");
    line("  (unflushed)", |r| r.sw.unflushed, "MiB");
    line("1 GiB overwrite 1M QD8 + FLUSH", |r| r.pass, "MiB");
    let (sa, qa) = (med(0, |r| r.after.flushed), med(2, |r| r.after.flushed));
    let steady = med(0, |r| r.rw.flushed);
    println!(
        "{:<40} {sa:>10.0} iops {:>14} {qa:>10.0} iops {:>9} {:>9.2}",
        "4K randwrite after ckpt/snap + FLUSH",
        "-",
        "-",
        sa / qa
    );
    println!(
        "{:<40} {:>10.0} iops {:>14} {:>10.0} iops",
        "  (unflushed)",
        med(0, |r| r.after.unflushed),
        "-",
        med(2, |r| r.after.unflushed)
    );
    println!(
        "strata after a checkpoint vs steady state (flushed): {:.2}",
        sa / steady
    );
    if let Some(s) = stall {
        println!("{s}");
    }
    Ok(())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len().max(1) - 1) as f64 * p) as usize)
        .copied()
        .unwrap_or_default()
}

/// Guest-visible stall from checkpoints: 4 KiB random writes at QD32 with and without a
/// checkpoint every 250 ms; request latency p99.9 and max for each.
fn checkpoint_stall(socket: &Path, store: &Path, secs: f64) -> R<String> {
    let mut c = Client::connect(socket)?;
    let (_, mut quiet) = c.run_timed(true, true, 4096, 32, secs)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, store2) = (stop.clone(), store.to_path_buf());
    let taker = std::thread::spawn(move || -> Result<u32, String> {
        let mut n = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(250));
            strata_cli(
                &store2,
                &["checkpoint", "create", &format!("bench@stall{n}")],
            )
            .map_err(|e| e.to_string())?;
            n += 1;
        }
        Ok(n)
    });
    let (_, mut busy) = c.run_timed(true, true, 4096, 32, secs)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let taken = taker.join().map_err(|_| "checkpoint thread panicked")??;
    Ok(format!(
        "checkpoint stall, 4K randwrite QD32: without checkpoints p99.9 {:.2?} max {:.2?}; with {taken} checkpoints (every 250 ms) p99.9 {:.2?} max {:.2?}",
        pct(&mut quiet, 0.999),
        pct(&mut quiet, 1.0),
        pct(&mut busy, 0.999),
        pct(&mut busy, 1.0)
    ))
}
