//! Strata's FUSE export (`strata export fuse`) against qemu-storage-daemon's FUSE export of a
//! raw file on the same filesystem, in one run, with the same fio jobs: 4 KiB random read and
//! write at QD1 (psync) and QD16 (libaio), 1 MiB sequential read and write at QD1, all with
//! O_DIRECT so the page cache of the FUSE file does not answer for either side; write shapes
//! are timed to the completion of an `fsync` of the file after the last write (both servers
//! cache writes: qsd with `cache.direct=off`, Strata in its segment files). Each shape
//! runs `--runs` times, alternating the two servers; the medians and their ratio are printed.
//!
//! Usage: fuse-bench [--dir DIR] [--size-mib N] [--secs S] [--runs N]
//! Needs `strata` built next to this binary, qemu-storage-daemon and fio.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use strata_bench::{strata_cli, strata_daemon, Server, R};

struct Args {
    dir: PathBuf,
    size: u64,
    secs: u32,
    runs: usize,
}

fn args() -> R<Args> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/strata-fuse-bench"),
        size: 1 << 30,
        secs: 5,
        runs: 3,
    };
    for (x, v) in strata_bench::flag_values()? {
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--size-mib" => a.size = v.parse::<u64>()? << 20,
            "--secs" => a.secs = v.parse()?,
            "--runs" => a.runs = v.parse()?,
            _ => return Err(format!("unknown argument {x}").into()),
        }
    }
    if a.runs == 0 || a.secs == 0 {
        return Err("--runs and --secs must be at least 1".into());
    }
    Ok(a)
}

struct Shape {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    engine: &'static str,
    depth: u32,
}

const SHAPES: [Shape; 6] = [
    Shape {
        name: "4K randread QD1",
        rw: "randread",
        bs: "4k",
        engine: "psync",
        depth: 1,
    },
    Shape {
        name: "4K randwrite QD1",
        rw: "randwrite",
        bs: "4k",
        engine: "psync",
        depth: 1,
    },
    Shape {
        name: "4K randread QD16",
        rw: "randread",
        bs: "4k",
        engine: "libaio",
        depth: 16,
    },
    Shape {
        name: "4K randwrite QD16",
        rw: "randwrite",
        bs: "4k",
        engine: "libaio",
        depth: 16,
    },
    Shape {
        name: "1M seqread QD1",
        rw: "read",
        bs: "1M",
        engine: "psync",
        depth: 1,
    },
    Shape {
        name: "1M seqwrite QD1",
        rw: "write",
        bs: "1M",
        engine: "psync",
        depth: 1,
    },
];

/// Runs one fio job on `file`; returns IOPS (4K shapes) or MiB/s (1M shapes).
fn fio(file: &Path, s: &Shape, size: u64, secs: u32) -> R<f64> {
    strata_bench::fio_rate(file, s.rw, s.bs, s.engine, s.depth, size, secs)
}

/// Fills the whole file with 1 MiB sequential writes so reads hit stored data.
fn fill(file: &Path, size: u64) -> R<()> {
    let st = Command::new("fio")
        .arg("--name=fill")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .args(["--rw=write", "--bs=1M", "--direct=1", "--fallocate=none"])
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        return Err(format!("filling {} failed", file.display()).into());
    }
    Ok(())
}

fn dev_of(p: &Path) -> R<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.dev())
}

/// qemu-storage-daemon exporting `raw` over FUSE on the file `mountpoint`.
fn qsd_fuse(raw: &Path, mountpoint: &Path) -> R<Server> {
    std::fs::File::create(mountpoint)?;
    let parent_dev = dev_of(mountpoint.parent().ok_or("mount point has no parent")?)?;
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off",
            raw.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=fuse,id=exp0,node-name=file0,mountpoint={},writable=on",
            mountpoint.display()
        ))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(mountpoint.with_extension("log"))?)
        .spawn()?;
    let s = Server {
        child,
        socket: mountpoint.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while dev_of(mountpoint)? == parent_dev {
        if Instant::now() > deadline {
            return Err("qemu-storage-daemon's FUSE export never appeared".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(s)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> R<()> {
    let a = args()?;
    strata_fuse::detach_mounts_under(&a.dir);
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    println!(
        "fuse-bench: {} MiB files in {}, {} s per shape, {} runs (medians), O_DIRECT",
        a.size >> 20,
        a.dir.display(),
        a.secs,
        a.runs
    );

    let (daemon, store) = strata_daemon(&a.dir, a.size)?;
    let mnt = a.dir.join("mnt");
    std::fs::create_dir(&mnt)?;
    strata_cli(
        &store,
        &[
            "export",
            "fuse",
            "bench",
            "--mountpoint",
            mnt.to_str().ok_or("path")?,
        ],
    )?;
    let strata_file = mnt.join("bench.img");

    let raw = a.dir.join("peer.raw");
    std::fs::File::create(&raw)?.set_len(a.size)?;
    let peer = qsd_fuse(&raw, &a.dir.join("peer.img"))?;
    let peer_file = peer.socket.clone();

    fill(&strata_file, a.size)?;
    fill(&peer_file, a.size)?;

    let mut results: Vec<(Vec<f64>, Vec<f64>)> = SHAPES.iter().map(|_| (vec![], vec![])).collect();
    for run in 0..a.runs {
        for (s, r) in SHAPES.iter().zip(results.iter_mut()) {
            // Alternate which server goes first, so drift favours neither.
            let order = if run % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for strata in order {
                let f = if strata { &strata_file } else { &peer_file };
                let v = fio(f, s, a.size, a.secs)?;
                if strata {
                    r.0.push(v);
                } else {
                    r.1.push(v);
                }
            }
        }
    }
    drop(peer);
    strata_cli(&store, &["unexport", "bench"])?;
    drop(daemon);

    println!(
        "{:<20} {:>16} {:>16} {:>8}   per-run ratios",
        "shape", "strata", "qsd fuse raw", "ratio"
    );
    for (s, (st, qs)) in SHAPES.iter().zip(results.iter_mut()) {
        let runs: Vec<String> = st
            .iter()
            .zip(qs.iter())
            .map(|(x, y)| format!("{:.2}", x / y))
            .collect();
        let unit = if s.bs == "1M" { "MiB/s" } else { "IOPS" };
        let (m1, m2) = (median(st), median(qs));
        println!(
            "{:<20} {:>10.0} {unit:<5} {:>10.0} {unit:<5} {:>8.2}   {}",
            s.name,
            m1,
            m2,
            m1 / m2,
            runs.join(" ")
        );
    }
    // The killed peer leaves its FUSE mount dead.
    strata_fuse::detach_mounts_under(&a.dir);
    let _ = std::fs::remove_dir_all(&a.dir);
    Ok(())
}
