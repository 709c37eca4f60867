//! Engine benchmarks that print medians, p99s and ratios (docs/BENCHMARKS.md has results):
//!
//! * `floor`   — 4 KiB random read/write and 1 MiB sequential through the engine vs
//!   pread/pwrite on a plain file in the same filesystem.
//! * `depth`   — 4 KiB random read/write at checkpoint-chain depth 0 and 100.
//! * `aftercp` — 4 KiB random writes right after a checkpoint vs steady state.
//! * `meta`    — checkpoint, fork and restore latency with SMALL and LARGE GiB mapped, and
//!   store open time, first open of the volume and heap per mapped GiB for each.
//! * `seq`     — 1 MiB sequential writes over the whole volume, to the last write and to the
//!   flush, vs a plain file doing the same with fsync.
//! * `age`     — 1 MiB sequential reads before and after random overwrites, and after the
//!   defragmenter has run.
//!
//! Usage: engine-bench [floor|seq|depth|aftercp|meta|age|all] [--dir DIR] [--small GIB] [--large GIB]
//!        [--ops N]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use strata_engine::{Store, StoreOptions, Volume, VolumeOptions};

/// Counts live heap bytes so memory per extent is measured, not estimated.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const GIB: u64 = 1 << 30;
const BS: usize = 4096;

struct Args {
    what: String,
    dir: PathBuf,
    small_gib: u64,
    large_gib: u64,
    ops: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        what: "all".into(),
        dir: PathBuf::from("/var/tmp/strata-bench"),
        small_gib: 1,
        large_gib: 16,
        ops: 50_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(val("--dir")?),
            "--small" => {
                a.small_gib = val("--small")?
                    .parse()
                    .map_err(|e| format!("--small: {e}"))?
            }
            "--large" => {
                a.large_gib = val("--large")?
                    .parse()
                    .map_err(|e| format!("--large: {e}"))?
            }
            "--ops" => a.ops = val("--ops")?.parse().map_err(|e| format!("--ops: {e}"))?,
            "floor" | "seq" | "depth" | "aftercp" | "meta" | "age" | "phases" | "all" => a.what = x,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn opts() -> StoreOptions {
    StoreOptions::default()
}

fn fresh(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    dir.to_path_buf()
}

fn fill(vol: &Volume, bytes: u64) {
    let mut chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for off in (0..bytes).step_by(1 << 20) {
        chunk[..8].copy_from_slice(&off.to_le_bytes());
        vol.write(off, &chunk).expect("fill");
    }
    let written = t.elapsed();
    vol.flush().expect("flush");
    eprintln!(
        "  (fill: {} MiB in {written:.2?}, then flush {:.2?})",
        bytes >> 20,
        t.elapsed() - written
    );
}

/// Ops per second of `n` calls of `f`.
fn rate(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Median of 5 alternating runs of `a` and `b`, so drift hits both alike.
fn paired(mut a: impl FnMut() -> f64, mut b: impl FnMut() -> f64) -> (f64, f64) {
    let (mut xa, mut xb) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        xa.push(a());
        xb.push(b());
    }
    (median(xa), median(xb))
}

fn floor(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::fs::FileExt;
    let dir = fresh(&a.dir.join("floor"));
    std::fs::create_dir_all(&dir)?;
    let size = a.small_gib * GIB;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("plain.img"))?;
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        file.write_all_at(&chunk, off)?;
    }
    file.sync_all()?;
    // Like the plain file, the engine leaves writeback to the kernel here: no periodic commit.
    let store = Store::open(dir.join("store"), opts())?;
    store.create_volume("v", size, VolumeOptions::default())?;
    let vol = store.open_volume("v")?;
    fill(&vol, size);
    let blocks = size / BS as u64;
    let n = a.ops;
    let mut buf = vec![0u8; BS];
    let data = vec![0xc3u8; BS];
    println!(
        "floor: {} GiB, {n} ops per run, QD1, one thread, io engine {}",
        a.small_gib,
        store.engine_name()
    );
    let mut r = Rng(7);
    let mut r2 = Rng(7);
    let mut pbuf = vec![0u8; BS];
    let (e, f) = paired(
        || {
            rate(n, |_| {
                vol.read(r.below(blocks) * BS as u64, &mut buf)
                    .expect("read")
            })
        },
        || {
            rate(n, |_| {
                file.read_exact_at(&mut pbuf, r2.below(blocks) * BS as u64)
                    .expect("pread")
            })
        },
    );
    println!(
        "  4K randread   engine {e:>9.0} IOPS   pread  {f:>9.0} IOPS   ratio {:.2}",
        e / f
    );
    let mut r = Rng(11);
    let mut r2 = Rng(11);
    let (e, f) = paired(
        || {
            rate(n, |_| {
                vol.write(r.below(blocks) * BS as u64, &data)
                    .expect("write")
            })
        },
        || {
            rate(n, |_| {
                file.write_all_at(&data, r2.below(blocks) * BS as u64)
                    .expect("pwrite")
            })
        },
    );
    println!(
        "  4K randwrite  engine {e:>9.0} IOPS   pwrite {f:>9.0} IOPS   ratio {:.2}",
        e / f
    );
    let mb = vec![0x77u8; 1 << 20];
    let mut rb = vec![0u8; 1 << 20];
    let mut rb2 = vec![0u8; 1 << 20];
    let n_mb = (size >> 20) as usize;
    let (e, f) = paired(
        || rate(n_mb, |i| vol.write((i as u64) << 20, &mb).expect("write")),
        || {
            rate(n_mb, |i| {
                file.write_all_at(&mb, (i as u64) << 20).expect("pwrite")
            })
        },
    );
    println!(
        "  1M seq write  engine {e:>9.0} MiB/s  pwrite {f:>9.0} MiB/s  ratio {:.2}",
        e / f
    );
    let (e, f) = paired(
        || rate(n_mb, |i| vol.read((i as u64) << 20, &mut rb).expect("read")),
        || {
            rate(n_mb, |i| {
                file.read_exact_at(&mut rb2, (i as u64) << 20)
                    .expect("pread")
            })
        },
    );
    println!(
        "  1M seq read   engine {e:>9.0} MiB/s  pread  {f:>9.0} MiB/s  ratio {:.2}",
        e / f
    );
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Sequential 1 MiB writes over the whole volume (a fill, then overwrites), each pass timed
/// to its last write and to the flush that follows, against a plain file doing the same and
/// ending with `fsync`: what a user sees when a copy or an image unpack finishes.
fn seq(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::fs::FileExt;
    let dir = fresh(&a.dir.join("seq"));
    std::fs::create_dir_all(&dir)?;
    let size = a.small_gib * GIB;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("plain.img"))?;
    let store = Store::open(dir.join("store"), opts())?;
    store.create_volume("v", size, VolumeOptions::default())?;
    let vol = store.open_volume("v")?;
    let mut chunk = vec![0x5au8; 1 << 20];
    println!(
        "seq: {} GiB of 1 MiB sequential writes per pass; a fill, then overwrites",
        a.small_gib
    );
    for pass in 0..4u64 {
        let t = Instant::now();
        for off in (0..size).step_by(1 << 20) {
            chunk[..8].copy_from_slice(&(off ^ pass).to_le_bytes());
            vol.write(off, &chunk)?;
        }
        let ew = t.elapsed();
        vol.flush()?;
        let ef = t.elapsed();
        let t = Instant::now();
        for off in (0..size).step_by(1 << 20) {
            chunk[..8].copy_from_slice(&(off ^ pass).to_le_bytes());
            file.write_all_at(&chunk, off)?;
        }
        let pw = t.elapsed();
        file.sync_all()?;
        let pf = t.elapsed();
        let mib = (size >> 20) as f64;
        println!(
            "  pass {pass}: engine {:>6.0} MiB/s to the last write, {:>6.0} MiB/s to the flush | file {:>6.0} / {:>6.0} MiB/s | ratio with flush {:.2}",
            mib / ew.as_secs_f64(),
            mib / ef.as_secs_f64(),
            mib / pw.as_secs_f64(),
            mib / pf.as_secs_f64(),
            pf.as_secs_f64() / ef.as_secs_f64()
        );
    }
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn rand_rw(vol: &Volume, blocks: u64, n: usize, seed: u64) -> (f64, f64) {
    let mut r = Rng(seed | 1);
    let mut buf = vec![0u8; BS];
    let data = vec![0x42u8; BS];
    let rd = rate(n, |_| {
        vol.read(r.below(blocks) * BS as u64, &mut buf)
            .expect("read")
    });
    let wr = rate(n, |_| {
        vol.write(r.below(blocks) * BS as u64, &data)
            .expect("write")
    });
    (rd, wr)
}

fn depth(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // Two volumes with the same history of writes; only one takes a checkpoint after every
    // 100 of them. Measuring them alternately isolates the cost of chain depth from data
    // layout and background work.
    let dir = fresh(&a.dir.join("depth"));
    let store = Store::open(&dir, opts())?;
    let size = a.small_gib * GIB;
    let blocks = size / BS as u64;
    let mut vols = Vec::new();
    for name in ["flat", "deep"] {
        store.create_volume(name, size, VolumeOptions::default())?;
        let vol = store.open_volume(name)?;
        fill(&vol, size);
        let mut r = Rng(99);
        for c in 0..100 {
            for _ in 0..100 {
                vol.write(r.below(blocks) * BS as u64, &[c as u8; BS])?;
            }
            if name == "deep" {
                store.checkpoint(name, &format!("c{c}"))?;
            }
        }
        vols.push(vol);
    }
    store.flush()?;
    std::thread::sleep(Duration::from_secs(2));
    let (mut d0, mut d100) = (Vec::new(), Vec::new());
    for i in 0..5 {
        d0.push(rand_rw(&vols[0], blocks, a.ops, i + 1));
        d100.push(rand_rw(&vols[1], blocks, a.ops, i + 1));
    }
    let med = |v: &[(f64, f64)], w: usize| {
        median(v.iter().map(|x| if w == 0 { x.0 } else { x.1 }).collect())
    };
    println!("depth: two {} GiB volumes, same writes, one with a 100-checkpoint chain; {} ops per run, median of 5", a.small_gib, a.ops);
    println!(
        "  4K randread   depth0 {:>9.0} IOPS  depth100 {:>9.0} IOPS  ratio {:.2}",
        med(&d0, 0),
        med(&d100, 0),
        med(&d100, 0) / med(&d0, 0)
    );
    println!(
        "  4K randwrite  depth0 {:>9.0} IOPS  depth100 {:>9.0} IOPS  ratio {:.2}",
        med(&d0, 1),
        med(&d100, 1),
        med(&d100, 1) / med(&d0, 1)
    );
    drop(vols);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn aftercp(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir = fresh(&a.dir.join("aftercp"));
    let store = Store::open(&dir, opts())?;
    let size = a.small_gib * GIB;
    let blocks = size / BS as u64;
    store.create_volume("v", size, VolumeOptions::default())?;
    let vol = store.open_volume("v")?;
    fill(&vol, size);
    let data = vec![0x11u8; BS];
    let n = a.ops / 5;
    let mut r = Rng(5);
    let mut run = || {
        rate(n, |_| {
            vol.write(r.below(blocks) * BS as u64, &data)
                .expect("write")
        })
    };
    let mut after = Vec::new();
    let mut steady = Vec::new();
    for round in 0..5 {
        steady.push(run());
        store.checkpoint("v", &format!("r{round}"))?;
        after.push(run());
    }
    let (s, af) = (median(steady), median(after));
    println!(
        "aftercp: {} GiB volume, {n} random 4K writes per run, median of 5",
        a.small_gib
    );
    println!(
        "  steady {s:>9.0} IOPS   right after a checkpoint {af:>9.0} IOPS   ratio {:.2}",
        af / s
    );
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct MetaResult {
    gib: u64,
    ck: Vec<Duration>,
    fork: Vec<Duration>,
    restore: Vec<Duration>,
    open: Duration,
    first_open: Duration,
    count: Duration,
    extents: usize,
    heap_open: usize,
    heap_loaded: usize,
}

fn meta_one(a: &Args, gib: u64) -> Result<MetaResult, Box<dyn std::error::Error>> {
    let dir = fresh(&a.dir.join(format!("meta-{gib}")));
    let size = gib * GIB;
    let blocks = size / BS as u64;
    {
        let store = Store::open(&dir, opts())?;
        store.create_volume("v", size, VolumeOptions::default())?;
        let vol = store.open_volume("v")?;
        fill(&vol, size);
    }
    // Open time and heap: measured on a fresh open of the filled store; the volume's map is
    // loaded when it is first opened, and the store counts what its maps reference in the
    // background.
    let before = LIVE.load(Ordering::Relaxed);
    let t = Instant::now();
    let store = Store::open(&dir, opts())?;
    let open = t.elapsed();
    let heap_open = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let t = Instant::now();
    store.wait_space_counted();
    let count = t.elapsed();
    let t = Instant::now();
    let vol = store.open_volume("v")?;
    let first_open = t.elapsed();
    let heap_loaded = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let extents = vol.extent_count();
    let mut r = Rng(3);
    let (mut ck, mut fork, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..200 {
        for _ in 0..16 {
            vol.write(r.below(blocks) * BS as u64, &[i as u8; BS])?;
        }
        let name = format!("c{i}");
        let t = Instant::now();
        store.checkpoint("v", &name)?;
        ck.push(t.elapsed());
        let t = Instant::now();
        store.fork("v", &name, "f", false)?;
        fork.push(t.elapsed());
        store.delete_volume("f")?;
        for _ in 0..16 {
            vol.write(r.below(blocks) * BS as u64, &[i as u8; BS])?;
        }
        let t = Instant::now();
        store.restore("v", &name)?;
        restore.push(t.elapsed());
    }
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(MetaResult {
        gib,
        ck,
        fork,
        restore,
        open,
        first_open,
        count,
        extents,
        heap_open,
        heap_loaded,
    })
}

fn meta(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let small = meta_one(a, a.small_gib)?;
    let large = meta_one(a, a.large_gib)?;
    println!(
        "meta: 200 iterations each; 16 random 4K writes before each checkpoint and each restore"
    );
    for m in [&small, &large] {
        println!(
            "  {:>3} GiB mapped: checkpoint p50 {:>8.3?} p99 {:>8.3?} | fork p50 {:>8.3?} p99 {:>8.3?} | restore p50 {:>8.3?} p99 {:>8.3?}",
            m.gib,
            pct(m.ck.clone(), 0.5), pct(m.ck.clone(), 0.99),
            pct(m.fork.clone(), 0.5), pct(m.fork.clone(), 0.99),
            pct(m.restore.clone(), 0.5), pct(m.restore.clone(), 0.99),
        );
        println!(
            "      Store::open {:>8.3?} (heap {} B) | first open of the volume {:>8.3?} | references counted in {:>8.3?} | {} extents, heap {:.0} B per mapped GiB ({:.1} B per extent)",
            m.open,
            m.heap_open,
            m.first_open,
            m.count,
            m.extents,
            m.heap_loaded as f64 / m.gib as f64,
            m.heap_loaded as f64 / m.extents.max(1) as f64,
        );
    }
    let ratio = |f: fn(&MetaResult) -> &Vec<Duration>| {
        pct(f(&large).clone(), 0.99).as_secs_f64() / pct(f(&small).clone(), 0.99).as_secs_f64()
    };
    println!(
        "  large/small p99 ratio: checkpoint {:.2}, fork {:.2}, restore {:.2}",
        ratio(|m| &m.ck),
        ratio(|m| &m.fork),
        ratio(|m| &m.restore)
    );
    Ok(())
}

/// vhost-bench's sequence in one process, one phase after the other, each timed (writes to
/// the flush that ends them): where a frontend's figure comes from.
fn phases(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir = fresh(&a.dir.join("phases"));
    let size = a.small_gib * GIB;
    let blocks = size / BS as u64;
    let store = Store::open(&dir, opts())?;
    store.create_volume("v", size, VolumeOptions::default())?;
    let vol = store.open_volume("v")?;
    let secs = Duration::from_secs(4);
    let mb = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for off in (0..size).step_by(1 << 20) {
        vol.write(off, &mb)?;
    }
    vol.flush()?;
    println!(
        "phases: fill + flush {:>8.0} MiB/s",
        (size >> 20) as f64 / t.elapsed().as_secs_f64()
    );
    let mut r = Rng(9);
    let data = vec![0x11u8; BS];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < secs {
        vol.write(r.below(blocks) * BS as u64, &data)?;
        n += 1;
    }
    vol.flush()?;
    println!(
        "  randwrite + flush {:>8.0} IOPS",
        n as f64 / t.elapsed().as_secs_f64()
    );
    let mut buf = vec![0u8; 1 << 20];
    for phase in ["seqread", "seqread again"] {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < secs {
            vol.read((n % (size >> 20)) << 20, &mut buf)?;
            n += 1;
        }
        println!(
            "  {phase:<16} {:>8.0} MiB/s (defrag so far {:?})",
            n as f64 / t.elapsed().as_secs_f64(),
            store.defrag_stats()
        );
    }
    for phase in ["seqwrite + flush", "again"] {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < secs {
            vol.write((n % (size >> 20)) << 20, &mb)?;
            n += 1;
        }
        let w = t.elapsed();
        vol.flush()?;
        let st = store.stats();
        println!("  {phase:<16} {:>8.0} MiB/s ({:.0} to the last write) reused {} MiB appended {} MiB held dead {} MiB", n as f64 / t.elapsed().as_secs_f64(), n as f64 / w.as_secs_f64(), st.reused_bytes >> 20, st.appended_bytes >> 20, st.dead_bytes >> 20);
    }
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// MiB/s of reading the whole volume with 1 MiB reads; median of `runs` passes.
fn seqread(vol: &Volume, size: u64, runs: usize) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    median(
        (0..runs)
            .map(|_| {
                rate((size >> 20) as usize, |i| {
                    vol.read((i as u64) << 20, &mut buf).expect("read")
                })
            })
            .collect(),
    )
}

/// Ages a sequentially written volume with random 4 KiB overwrites (a checkpoint after each
/// round) and reports 1 MiB sequential reads before, after aging, and after the background
/// defragmenter has run (it rewrites ranges that reads find fragmented).
fn age(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir = fresh(&a.dir.join("age"));
    let size = a.small_gib * GIB;
    let blocks = size / BS as u64;
    let store = Store::open(&dir, opts())?;
    store.create_volume("v", size, VolumeOptions::default())?;
    let vol = store.open_volume("v")?;
    fill(&vol, size);
    let before = seqread(&vol, size, 3);
    let before_extents = vol.extent_count();
    // Aging, with the defragmenter paused so it cannot tidy up behind the measurement.
    store.set_defrag_rate(0);
    let mut r = Rng(17);
    let rounds = 5;
    let per_round = (blocks / 10) as usize;
    let data = vec![0x33u8; BS];
    for round in 0..rounds {
        for _ in 0..per_round {
            vol.write(r.below(blocks) * BS as u64, &data)?;
        }
        store.checkpoint("v", &format!("age{round}"))?;
    }
    let aged = seqread(&vol, size, 3);
    let aged_extents = vol.extent_count();
    // The defragmenter: reads queue the fragmented ranges they meet; passes until a pass
    // finds nothing left to rewrite.
    store.set_defrag_rate(512 << 20);
    let t = Instant::now();
    let mut passes = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let done = store.defrag_stats().ranges;
        for i in 0..(size >> 20) {
            vol.read(i << 20, &mut buf)?;
        }
        store.wait_defrag_idle(Duration::from_secs(60));
        passes += 1;
        if store.defrag_stats().ranges == done || passes == 20 {
            break;
        }
    }
    let took = t.elapsed();
    let stats = store.defrag_stats();
    let after = seqread(&vol, size, 3);
    println!(
        "age: {} GiB filled with 1 MiB writes, then {rounds} rounds of {per_round} random 4K overwrites, a checkpoint after each; 1 MiB seqread, median of 3",
        a.small_gib
    );
    println!("  before aging      {before:>7.0} MiB/s  ({before_extents} extents)");
    println!(
        "  after aging       {aged:>7.0} MiB/s  ({aged_extents} extents)   ratio {:.2}",
        aged / before
    );
    println!(
        "  after defragment  {after:>7.0} MiB/s  ({} extents)   ratio {:.2}   ({} ranges, {} MiB rewritten in {passes} read passes, {took:.1?})",
        vol.extent_count(),
        after / before,
        stats.ranges,
        stats.bytes >> 20
    );
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("engine-bench: {e}");
            std::process::exit(2);
        }
    };
    let run = |name: &str, f: fn(&Args) -> Result<(), Box<dyn std::error::Error>>| {
        if a.what == name || a.what == "all" {
            if let Err(e) = f(&a) {
                eprintln!("engine-bench {name}: {e}");
                std::process::exit(1);
            }
        }
    };
    run("floor", floor);
    run("seq", seq);
    run("depth", depth);
    run("aftercp", aftercp);
    run("meta", meta);
    run("age", age);
    run("phases", phases);
}
