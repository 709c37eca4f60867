//! Strata's vhost-user-blk export against qemu-storage-daemon (raw and qcow2 on the same
//! filesystem), driven by the same user-space virtio-blk driver (libblkio's
//! `virtio-blk-vhost-user`) in one run, so no guest kernel hides the backends' speed.
//!
//! Shapes: 4 KiB random read and write at QD32, 1 MiB sequential read and write at QD8, and
//! 4 KiB random write right after a checkpoint (a qcow2 internal snapshot for the peer).
//! Prints IOPS / MiB/s per target and the ratios. Results: docs/BENCHMARKS.md.
//!
//! Usage: vhost-bench [--dir DIR] [--size-mib N] [--secs S]
//! Needs `strata` built next to this binary, qemu-storage-daemon and qemu-img.

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use strata_bench::{strata_cli, strata_daemon, wait_for, Server, R};

struct Args {
    dir: PathBuf,
    size: u64,
    secs: f64,
}

fn args() -> R<Args> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/strata-vhost-bench"),
        size: 1 << 30,
        secs: 5.0,
    };
    for (x, v) in strata_bench::flag_values()? {
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--size-mib" => a.size = v.parse::<u64>()? << 20,
            "--secs" => a.secs = v.parse()?,
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

/// One libblkio connection with a shared-memory buffer area.
struct Client {
    _blkio: Blkio,
    q: Blkioq,
    base: *mut u8,
    capacity: u64,
}

const SLOT: usize = 1 << 20;
const SLOTS: usize = 32;

impl Client {
    fn connect(socket: &Path) -> R<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().ok_or("path")?)?;
        b.connect()?;
        b.set_i32("num-queues", 1)?;
        let mut started = b.start()?;
        let q = started.queues.pop().ok_or("no queue")?;
        let region = b.alloc_mem_region(SLOT * SLOTS)?;
        b.map_mem_region(&region)?;
        let capacity = b.get_u64("capacity")?;
        Ok(Client {
            base: region.addr as *mut u8,
            _blkio: b,
            q,
            capacity,
        })
    }

    /// Keeps `depth` requests of `bs` bytes in flight for `secs`; returns ops per second.
    fn run(&mut self, write: bool, random: bool, bs: usize, depth: usize, secs: f64) -> R<f64> {
        Ok(self.run_timed(write, random, bs, depth, secs)?.0)
    }

    /// Like `run`, also returning every request's latency.
    fn run_timed(
        &mut self,
        write: bool,
        random: bool,
        bs: usize,
        depth: usize,
        secs: f64,
    ) -> R<(f64, Vec<Duration>)> {
        let blocks = self.capacity / bs as u64;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut seq = 0u64;
        let mut next = |_: usize| {
            if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % blocks) * bs as u64
            } else {
                seq = (seq + 1) % blocks;
                seq * bs as u64
            }
        };
        let submit = |q: &mut Blkioq, slot: usize, off: u64, base: *mut u8| {
            // SAFETY: slot < SLOTS and bs <= SLOT, so the buffer lies inside the mapped region,
            // which lives as long as `self`; each slot has at most one request in flight.
            let buf = unsafe { base.add(slot * SLOT) };
            if write {
                q.write(off, buf, bs, slot, ReqFlags::empty());
            } else {
                q.read(off, buf, bs, slot, ReqFlags::empty());
            }
        };
        let mut issued_at = vec![Instant::now(); depth];
        let mut lat = Vec::new();
        for (slot, at) in issued_at.iter_mut().enumerate() {
            *at = Instant::now();
            submit(&mut self.q, slot, next(slot), self.base);
        }
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        let start = Instant::now();
        let mut done = 0u64;
        let mut inflight = depth;
        let mut stopping = false;
        while inflight > 0 {
            let n = self.q.do_io(&mut comps, 1, None, None)?;
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_read() };
                if c.ret != 0 {
                    return Err(format!("request failed: {}", c.ret).into());
                }
                done += 1;
                inflight -= 1;
                let slot = c.user_data;
                lat.push(issued_at[slot].elapsed());
                stopping |= start.elapsed().as_secs_f64() >= secs;
                if !stopping {
                    issued_at[slot] = Instant::now();
                    submit(&mut self.q, slot, next(slot), self.base);
                    inflight += 1;
                }
            }
        }
        Ok((done as f64 / start.elapsed().as_secs_f64(), lat))
    }

    fn fill(&mut self) -> R<()> {
        let blocks = self.capacity / SLOT as u64;
        for i in 0..SLOTS {
            // SAFETY: each slot is SLOT bytes inside the mapped region.
            unsafe { std::ptr::write_bytes(self.base.add(i * SLOT), 0x5a ^ i as u8, SLOT) };
        }
        let mut issued = 0u64;
        let mut inflight = 0usize;
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..8).map(|_| MaybeUninit::uninit()).collect();
        while issued < blocks || inflight > 0 {
            while issued < blocks && inflight < 8 {
                let slot = (issued % 8) as usize;
                // SAFETY: as in `run`.
                let buf = unsafe { self.base.add(slot * SLOT) };
                self.q
                    .write(issued * SLOT as u64, buf, SLOT, slot, ReqFlags::empty());
                issued += 1;
                inflight += 1;
            }
            let n = self.q.do_io(&mut comps, 1, None, None)?;
            inflight -= n;
        }
        Ok(())
    }
}

#[derive(Default, Clone, Copy)]
struct Row {
    rr: f64,
    rw: f64,
    sr: f64,
    sw: f64,
    after: f64,
}

fn measure(socket: &Path, secs: f64) -> R<Row> {
    let mut c = Client::connect(socket)?;
    c.fill()?;
    Ok(Row {
        rr: c.run(false, true, 4096, 32, secs)?,
        rw: c.run(true, true, 4096, 32, secs)?,
        sr: c.run(false, false, SLOT, 8, secs)?,
        sw: c.run(true, false, SLOT, 8, secs)?,
        after: 0.0,
    })
}

fn main() -> R<()> {
    let a = args()?;
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let size = a.size.to_string();
    let raw = a.dir.join("disk.raw");
    let qcow = a.dir.join("disk.qcow2");
    for (img, fmt) in [(&raw, "raw"), (&qcow, "qcow2")] {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(img)
            .arg(&size)
            .status()?;
        if !st.success() {
            return Err("qemu-img create failed".into());
        }
    }
    println!(
        "vhost-bench: {} MiB disks in {}, {} s per shape, one queue",
        a.size >> 20,
        a.dir.display(),
        a.secs
    );

    let (srv, store) = strata_server(&a.dir, a.size)?;
    let mut strata = measure(&srv.socket, a.secs)?;
    strata_cli(&store, &["checkpoint", "create", "bench@c1"])?;
    strata.after = Client::connect(&srv.socket)?.run(true, true, 4096, 32, a.secs)?;
    let stall = checkpoint_stall(&srv.socket, &store, a.secs)?;
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

    let mib = |ops: f64| ops; // 1 MiB requests: ops/s == MiB/s
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>9} {:>9}",
        "shape", "strata", "qsd raw", "qsd qcow2", "vs raw", "vs qcow2"
    );
    let line = |name: &str, s: f64, r: f64, q: f64, unit: &str| {
        println!("{name:<28} {s:>10.0} {unit:<3} {r:>10.0} {unit:<3} {q:>10.0} {unit:<3} {:>9.2} {:>9.2}", s / r, s / q);
    };
    line("4K randread QD32", strata.rr, qraw.rr, qq.rr, "iops");
    line("4K randwrite QD32", strata.rw, qraw.rw, qq.rw, "iops");
    line(
        "1M seqread QD8",
        mib(strata.sr),
        mib(qraw.sr),
        mib(qq.sr),
        "MiB",
    );
    line(
        "1M seqwrite QD8",
        mib(strata.sw),
        mib(qraw.sw),
        mib(qq.sw),
        "MiB",
    );
    println!(
        "{:<28} {:>10.0} iops {:>14} {:>10.0} iops {:>9} {:>9.2}",
        "4K randwrite after ckpt/snap",
        strata.after,
        "-",
        qq.after,
        "-",
        strata.after / qq.after
    );
    println!("{stall}");
    let _ = std::fs::remove_dir_all(&a.dir);
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
