//! A Strata tree mount (`strata mount`) against native ext4 on a loop device and against two
//! FUSE filesystems over that ext4: fuse-overlayfs (lower and upper directories on the ext4,
//! as rootless containers run it) and bindfs (a plain passthrough), in one run, with the same
//! workloads: unpack a source tree (tar), a stat storm (`find -ls` twice), `rm -rf`, a real
//! `node_modules` install (`npm ci --offline` of bench/workload/npm from the cache
//! scripts/setup.sh primes), a `git clone --no-local` of a repository holding the source
//! tree, the latency of single create / stat / rename / unlink calls (p50 and p99), and fio
//! on one file (4 KiB random read and write at QD1, 1 MiB sequential read and write;
//! O_DIRECT; writes timed to the completion of an `fsync` of the file after the last
//! write). Each workload runs `--runs` times, rotating the order of the targets; medians and
//! the ratios of Strata to each peer (higher is better for Strata) are printed.
//!
//! The ext4 image and Strata's store sit on the same filesystem (`--dir`).
//!
//! Usage: tree-bench [--dir DIR] [--source DIR] [--runs N] [--secs S] [--size-mib N]
//! [--ops N] `--source` is the tree to unpack (default: the first crates of
//! ~/.cargo/registry/src, by name, up to about 10,000 files); `--ops` the files of the
//! latency phase (default 2000). Needs `strata` built next to this binary, root, mkfs.ext4,
//! fuse-overlayfs, bindfs, tar, find, git, npm (with the cache setup primes) and fio.

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
    ops: usize,
}

fn args() -> R<Args> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/strata-tree-bench"),
        source: None,
        runs: 3,
        secs: 5,
        size: 1 << 30,
        ops: 2000,
    };
    for (x, v) in strata_bench::flag_values()? {
        match x.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--source" => a.source = Some(PathBuf::from(v)),
            "--runs" => a.runs = v.parse()?,
            "--secs" => a.secs = v.parse()?,
            "--size-mib" => a.size = v.parse::<u64>()? << 20,
            "--ops" => a.ops = v.parse()?,
            _ => return Err(format!("unknown argument {x}").into()),
        }
    }
    if a.runs == 0 || a.secs == 0 || a.ops == 0 {
        return Err("--runs, --secs and --ops must be at least 1".into());
    }
    Ok(a)
}

fn run(cmd: &str, args: &[&str]) -> R<()> {
    run_in(None, cmd, args)
}

/// Runs a command (in directory `cwd` when given), failing with its stderr.
fn run_in(cwd: Option<&Path>, cmd: &str, args: &[&str]) -> R<()> {
    let mut c = Command::new(cmd);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c
        .args(args)
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
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
    timed_in(None, cmd, args)
}

fn timed_in(cwd: Option<&Path>, cmd: &str, args: &[&str]) -> R<f64> {
    let t = Instant::now();
    run_in(cwd, cmd, args)?;
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

/// Where scripts/setup.sh primes npm's cache with the packages of bench/workload/npm.
const NPM_CACHE: &str = "/var/tmp/strata-tools/npm-cache";
const NPM_PACKAGE: &str = include_str!("../../workload/npm/package.json");
const NPM_LOCK: &str = include_str!("../../workload/npm/package-lock.json");

/// Installs bench/workload/npm's `node_modules` into `dir` from the primed cache, without
/// the network; returns seconds.
fn npm_ci(dir: &Path) -> R<f64> {
    std::fs::create_dir(dir)?;
    std::fs::write(dir.join("package.json"), NPM_PACKAGE)?;
    std::fs::write(dir.join("package-lock.json"), NPM_LOCK)?;
    timed_in(
        Some(dir),
        "npm",
        &[
            "ci",
            "--offline",
            "--cache",
            NPM_CACHE,
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--omit-lockfile-registry-resolved=false",
        ],
    )
}

/// Latency samples (µs) of single metadata calls in `dir`, `n` files: create (open with
/// O_CREAT and close), stat, rename, unlink.
fn op_latency(dir: &Path, n: usize, out: &mut [Vec<f64>; 4]) -> R<()> {
    std::fs::create_dir(dir)?;
    let name = |p: &str, i: usize| dir.join(format!("{p}{i:06}"));
    let us = |t: Instant| t.elapsed().as_secs_f64() * 1e6;
    for i in 0..n {
        let t = Instant::now();
        drop(std::fs::File::create(name("f", i))?);
        out[0].push(us(t));
    }
    for i in 0..n {
        let t = Instant::now();
        std::fs::metadata(name("f", i))?;
        out[1].push(us(t));
    }
    for i in 0..n {
        let t = Instant::now();
        std::fs::rename(name("f", i), name("g", i))?;
        out[2].push(us(t));
    }
    for i in 0..n {
        let t = Instant::now();
        std::fs::remove_file(name("g", i))?;
        out[3].push(us(t));
    }
    std::fs::remove_dir(dir)?;
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> R<()> {
    let a = args()?;
    if !Path::new(NPM_CACHE).is_dir() {
        return Err(format!("{NPM_CACHE} is missing: run scripts/setup.sh to prime it").into());
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir)?;
    let mut mounts = Mounts(Vec::new());

    // Native ext4 on a loop device; fuse-overlayfs and bindfs over directories of it.
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
    let (lower, upper, work) = (
        ext4.join("ovl-lower"),
        ext4.join("ovl-upper"),
        ext4.join("ovl-work"),
    );
    for d in [&lower, &upper, &work] {
        std::fs::create_dir(d)?;
    }
    let overlay = a.dir.join("overlay");
    std::fs::create_dir(&overlay)?;
    run(
        "fuse-overlayfs",
        &[
            "-o",
            &format!(
                "lowerdir={},upperdir={},workdir={}",
                p(&lower),
                p(&upper),
                p(&work)
            ),
            p(&overlay),
        ],
    )?;
    mounts.0.push(overlay.clone());

    // Strata: a tree mounted from a store next to the ext4 image.
    let (daemon, store) = strata_serve(&a.dir)?;
    let strata = a.dir.join("strata");
    std::fs::create_dir(&strata)?;
    strata_cli(&store, &["fs", "create", "bench"])?;
    strata_cli(&store, &["mount", "bench", p(&strata)])?;
    mounts.0.push(strata.clone());

    // The source tree, as an uncompressed tarball (so tar's work is the filesystem's), and a
    // git repository holding it (outside every target) for the clone phase.
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
    let repo = a.dir.join("repo");
    std::fs::create_dir(&repo)?;
    run("tar", &["xf", p(&tarball), "-C", p(&repo)])?;
    let git = |args: &[&str]| -> R<()> {
        let mut all = vec![
            "-C",
            p(&repo),
            "-c",
            "user.name=bench",
            "-c",
            "user.email=b@b",
        ];
        all.extend_from_slice(args);
        run("git", &all)
    };
    git(&["init", "-q"])?;
    git(&["add", "-A", "-f"])?;
    git(&["commit", "-q", "-m", "source"])?;
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
        ("fuse-overlayfs", overlay.clone()),
        ("bindfs", bind.clone()),
        ("native", native.clone()),
    ];
    let nt = targets.len();
    // Rows of seconds (lower is better), then the fio shapes (higher is better).
    let names = [
        "unpack (s)",
        "stat storm: find -ls x2 (s)",
        "rm -rf (s)",
        "npm ci --offline (s)",
        "git clone --no-local (s)",
    ];
    let rows = names.len() + SHAPES.len();
    let mut results = vec![vec![Vec::new(); nt]; rows];
    let mut lat: Vec<[Vec<f64>; 4]> = (0..nt).map(|_| Default::default()).collect();
    for (_, root) in &targets {
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
    }
    for r in 0..a.runs {
        for k in 0..nt {
            let t = (k + r) % nt;
            let root = &targets[t].1;
            let dst = root.join(format!("run{r}"));
            std::fs::create_dir(&dst)?;
            // Every target starts with nothing dirty: what the previous one left to write
            // back (the loop image's writeback after a native unpack) would otherwise run
            // during the next one's phases, which in this rotation is Strata's in runs 1
            // and 2 only.
            run("sync", &[])?;
            results[0][t].push(timed("tar", &["xf", p(&tarball), "-C", p(&dst)])?);
            let t0 = Instant::now();
            for _ in 0..2 {
                run("sh", &["-c", &format!("find {} -ls > /dev/null", p(&dst))])?;
            }
            results[1][t].push(t0.elapsed().as_secs_f64());
            results[2][t].push(timed("rm", &["-rf", p(&dst)])?);
            let npm = root.join(format!("npm{r}"));
            results[3][t].push(npm_ci(&npm)?);
            run("rm", &["-rf", p(&npm)])?;
            let clone = root.join(format!("clone{r}"));
            results[4][t].push(timed(
                "git",
                &["clone", "-q", "--no-local", p(&repo), p(&clone)],
            )?);
            run("rm", &["-rf", p(&clone)])?;
            op_latency(&root.join(format!("ops{r}")), a.ops, &mut lat[t])?;
        }
        for (i, s) in SHAPES.iter().enumerate() {
            for k in 0..nt {
                let t = (k + r) % nt;
                let f = targets[t].1.join("fio.dat");
                run("sync", &[])?;
                results[names.len() + i][t].push(fio(&f, s, a.size, a.secs)?);
            }
        }
    }

    let head: String = targets.iter().map(|(n, _)| format!(" {n:>14}")).collect();
    let vs: String = targets[1..]
        .iter()
        .map(|(n, _)| format!(" {:>16}", format!("vs {n}")))
        .collect();
    println!("\n{:34}{head} {vs}", "workload (median)");
    for (row, res) in results.iter_mut().enumerate() {
        let m: Vec<f64> = res.iter_mut().map(|v| median(v)).collect();
        let (name, higher_better) = if row < names.len() {
            (names[row], false)
        } else {
            (SHAPES[row - names.len()].name, true)
        };
        // Ratios are "how many times better Strata is": time ratios are inverted.
        let ratio = |peer: f64| {
            if higher_better {
                m[0] / peer
            } else {
                peer / m[0]
            }
        };
        let cells: String = m.iter().map(|x| format!(" {x:>14.2}")).collect();
        let ratios: String = m[1..]
            .iter()
            .map(|&x| format!(" {:>15.2}x", ratio(x)))
            .collect();
        println!("{name:34}{cells} {ratios}");
        let all: Vec<String> = res
            .iter()
            .zip(&targets)
            .map(|(v, (n, _))| {
                let runs: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
                format!("{n} {}", runs.join("/"))
            })
            .collect();
        println!("{:34} runs: {}", "", all.join(" | "));
    }
    println!(
        "\nsingle calls, {} files x {} runs, latency in µs (p50 / p99):",
        a.ops, a.runs
    );
    println!("{:10}{head}", "call");
    for (o, op) in ["create", "stat", "rename", "unlink"].iter().enumerate() {
        let cells: String = lat
            .iter_mut()
            .map(|l| {
                let v = &mut l[o];
                format!(
                    " {:>14}",
                    format!("{:.0} / {:.0}", percentile(v, 0.5), percentile(v, 0.99))
                )
            })
            .collect();
        println!("{op:10}{cells}");
    }
    drop(mounts);
    drop(daemon);
    Ok(())
}
