//! A Strata tree mount (`strata mount`) against native ext4 on a loop device and against a
//! FUSE passthrough of that ext4 (bindfs), in one run, with the same workloads: unpack a
//! source tree (tar), a stat storm (`find -ls` twice), `rm -rf`, and fio on one file (4 KiB
//! random read and write at QD1, 1 MiB sequential read and write; O_DIRECT; writes timed to
//! the completion of an `fsync` of the file after the last write). Each workload
//! runs `--runs` times, rotating the order of the three targets; medians and the ratios
//! strata/bindfs and strata/native (higher is better for Strata) are printed.
//!
//! The ext4 image and Strata's store sit on the same filesystem (`--dir`).
//!
//! Usage: tree-bench [--dir DIR] [--source DIR] [--runs N] [--secs S] [--size-mib N]
//! `--source` is the tree to unpack (default: the first crates of ~/.cargo/registry/src,
//! by name, up to about 10,000 files). Needs `strata` built next to this binary, root,
//! mkfs.ext4, bindfs, tar, find and fio.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use strata_bench::{strata_cli, strata_serve, R};

struct Args {
    dir: PathBuf,
    source: Option<PathBuf>,
    runs: usize,
    secs: u32,
    size: u64,
}

fn args() -> R<Args> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/strata-tree-bench"),
        source: None,
        runs: 3,
        secs: 5,
        size: 1 << 30,
    };
    for (x, v) in strata_bench::flag_values()? {
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--source" => a.source = Some(PathBuf::from(v)),
            "--runs" => a.runs = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            "--size-mib" => a.size = v.parse::<u64>()? << 20,
            _ => return Err(format!("unknown argument {x}").into()),
        }
    }
    if a.runs == 0 || a.secs == 0 {
        return Err("--runs and --secs must be at least 1".into());
    }
    Ok(a)
}

fn run(cmd: &str, args: &[&str]) -> R<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// Seconds one shell command takes.
fn timed(cmd: &str, args: &[&str]) -> R<f64> {
    let t = Instant::now();
    run(cmd, args)?;
    Ok(t.elapsed().as_secs_f64())
}

/// The default source tree: whole crates from the cargo registry, by name, until about
/// 10,000 files. Returns the directory and the crate names.
fn default_source() -> R<(PathBuf, Vec<String>)> {
    let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
    let reg = Path::new(&home).join(".cargo/registry/src");
    let index = std::fs::read_dir(&reg)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .ok_or("no cargo registry sources; pass --source DIR")?;
    let mut crates: Vec<String> = std::fs::read_dir(&index)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    crates.sort();
    let mut picked = Vec::new();
    let mut files = 0usize;
    for c in crates {
        if files >= 10_000 {
            break;
        }
        files += walk_count(&index.join(&c));
        picked.push(c);
    }
    Ok((index, picked))
}

fn walk_count(d: &Path) -> usize {
    std::fs::read_dir(d)
        .map(|it| {
            it.filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk_count(&e.path()),
                    _ => 1,
                })
                .sum()
        })
        .unwrap_or(0)
}

struct Shape {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "fio 4K randread QD1 (IOPS)",
        rw: "randread",
        bs: "4k",
    },
    Shape {
        name: "fio 4K randwrite QD1 (IOPS)",
        rw: "randwrite",
        bs: "4k",
    },
    Shape {
        name: "fio 1M seqread (MiB/s)",
        rw: "read",
        bs: "1M",
    },
    Shape {
        name: "fio 1M seqwrite (MiB/s)",
        rw: "write",
        bs: "1M",
    },
];

fn fio(file: &Path, s: &Shape, size: u64, secs: u32) -> R<f64> {
    strata_bench::fio_rate(file, s.rw, s.bs, "psync", 1, size, secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Unmounts everything it mounted when dropped.
struct Mounts(Vec<PathBuf>);
impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn main() -> R<()> {
    let a = args()?;
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let mut mounts = Mounts(Vec::new());

    // Native ext4 on a loop device, and bindfs over a directory of it.
    let img = a.dir.join("ext4.img");
    std::fs::File::create(&img)?.set_len(16 << 30)?;
    run("mkfs.ext4", &["-q", "-F", p(&img)])?;
    let ext4 = a.dir.join("ext4");
    std::fs::create_dir(&ext4)?;
    run("mount", &["-o", "loop", p(&img), p(&ext4)])?;
    mounts.0.push(ext4.clone());
    let native = ext4.join("native");
    let bindsrc = ext4.join("bindsrc");
    std::fs::create_dir(&native)?;
    std::fs::create_dir(&bindsrc)?;
    let bind = a.dir.join("bindfs");
    std::fs::create_dir(&bind)?;
    run("bindfs", &[p(&bindsrc), p(&bind)])?;
    mounts.0.push(bind.clone());

    // Strata: a tree mounted from a store next to the ext4 image.
    let (daemon, store) = strata_serve(&a.dir)?;
    let strata = a.dir.join("strata");
    std::fs::create_dir(&strata)?;
    strata_cli(&store, &["fs", "create", "bench"])?;
    strata_cli(&store, &["mount", "bench", p(&strata)])?;
    mounts.0.push(strata.clone());

    // The source tree, as an uncompressed tarball (so tar's work is the filesystem's).
    let tarball = a.dir.join("src.tar");
    let what = match &a.source {
        Some(s) => {
            let parent = s.parent().ok_or("--source has no parent")?;
            let name = s
                .file_name()
                .ok_or("--source has no name")?
                .to_string_lossy();
            run("tar", &["cf", p(&tarball), "-C", p(parent), &name])?;
            s.display().to_string()
        }
        None => {
            let (index, crates) = default_source()?;
            let mut args = vec!["cf", p(&tarball), "-C", p(&index)];
            args.extend(crates.iter().map(String::as_str));
            run("tar", &args)?;
            format!("{} crates from {}", crates.len(), index.display())
        }
    };
    let files = Command::new("tar").arg("tf").arg(&tarball).output()?.stdout;
    let entries = files.iter().filter(|&&b| b == b'\n').count();
    let tar_bytes = std::fs::metadata(&tarball)?.len();
    println!(
        "source: {what}: {entries} entries, {:.1} MiB; {} runs, fio {} s per shape on a {} MiB file",
        tar_bytes as f64 / f64::from(1 << 20),
        a.runs,
        a.secs,
        a.size >> 20
    );

    let targets = [
        ("strata", strata.clone()),
        ("bindfs", bind.clone()),
        ("native", native.clone()),
    ];
    // Rows: unpack, stat storm, rm -rf (seconds), then the fio shapes.
    let rows = 3 + SHAPES.len();
    let mut results = vec![vec![Vec::new(); targets.len()]; rows];
    for (t, (_, root)) in targets.iter().enumerate() {
        // The fio file, written in full once.
        let f = root.join("fio.dat");
        run(
            "fio",
            &[
                "--name=fill",
                &format!("--filename={}", p(&f)),
                &format!("--size={}", a.size),
                "--rw=write",
                "--bs=1M",
                "--direct=1",
                "--fallocate=none",
            ],
        )?;
        let _ = t;
    }
    for r in 0..a.runs {
        for k in 0..targets.len() {
            let t = (k + r) % targets.len();
            let root = &targets[t].1;
            let dst = root.join(format!("run{r}"));
            std::fs::create_dir(&dst)?;
            results[0][t].push(timed("tar", &["xf", p(&tarball), "-C", p(&dst)])?);
            let t0 = Instant::now();
            for _ in 0..2 {
                run("sh", &["-c", &format!("find {} -ls > /dev/null", p(&dst))])?;
            }
            results[1][t].push(t0.elapsed().as_secs_f64());
            results[2][t].push(timed("rm", &["-rf", p(&dst)])?);
        }
        for (i, s) in SHAPES.iter().enumerate() {
            for k in 0..targets.len() {
                let t = (k + r) % targets.len();
                let f = targets[t].1.join("fio.dat");
                results[3 + i][t].push(fio(&f, s, a.size, a.secs)?);
            }
        }
    }

    let names = ["unpack (s)", "stat storm: find -ls x2 (s)", "rm -rf (s)"];
    println!(
        "\n{:34} {:>10} {:>10} {:>10}  {:>14} {:>14}",
        "workload (median)", "strata", "bindfs", "native", "strata/bindfs", "strata/native"
    );
    for (row, res) in results.iter_mut().enumerate() {
        let m: Vec<f64> = res.iter_mut().map(|v| median(v)).collect();
        let (name, higher_better) = if row < 3 {
            (names[row], false)
        } else {
            (SHAPES[row - 3].name, true)
        };
        // Ratios are "how many times better Strata is": time ratios are inverted.
        let ratio = |peer: f64| {
            if higher_better {
                m[0] / peer
            } else {
                peer / m[0]
            }
        };
        println!(
            "{:34} {:>10.2} {:>10.2} {:>10.2}  {:>13.2}x {:>13.2}x",
            name,
            m[0],
            m[1],
            m[2],
            ratio(m[1]),
            ratio(m[2])
        );
        let all: Vec<String> = res
            .iter()
            .map(|v| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        println!(
            "{:34} runs: strata {} | bindfs {} | native {}",
            "", all[0], all[1], all[2]
        );
    }
    drop(mounts);
    drop(daemon);
    Ok(())
}
