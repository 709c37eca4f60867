//! Shared helpers for the benchmark binaries: the `strata` daemon and peer processes.

pub mod blk;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub type R<T> = Result<T, Box<dyn std::error::Error>>;

/// A server process (Strata's daemon or a peer), killed when dropped.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    /// The socket (or mount point) it serves.
    pub socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a unix socket at `path` accepts connections.
pub fn wait_for(path: &Path) -> R<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The `strata` binary built next to the running benchmark.
pub fn strata_bin() -> R<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .ok_or("no exe dir")?
        .join("strata");
    if !p.exists() {
        return Err(format!(
            "{} not found: build it with cargo build --release -p strata",
            p.display()
        )
        .into());
    }
    Ok(p)
}

/// Runs a `strata` CLI command against the daemon of `store`.
pub fn strata_cli(store: &Path, args: &[&str]) -> R<()> {
    let out = Command::new(strata_bin()?)
        .arg("--store")
        .arg(store)
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!("strata {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// Starts `strata serve` on `DIR/strata-store`. Returns the daemon (its `socket` is the API
/// socket) and the store path. The daemon's log is `DIR/strata-daemon.log`.
pub fn strata_serve(dir: &Path) -> R<(Server, PathBuf)> {
    strata_serve_with(dir, &[])
}

/// [`strata_serve`] with extra `strata serve` arguments.
pub fn strata_serve_with(dir: &Path, extra: &[&str]) -> R<(Server, PathBuf)> {
    let store = dir.join("strata-store");
    let log = std::fs::File::create(dir.join("strata-daemon.log"))?;
    let child = Command::new(strata_bin()?)
        .arg("--store")
        .arg(&store)
        .arg("serve")
        .args(extra)
        .stderr(log)
        .spawn()?;
    let api = store.join("strata.sock");
    let srv = Server { child, socket: api };
    wait_for(&srv.socket)?;
    Ok((srv, store))
}

/// [`strata_serve`] with a volume `bench` of `size` bytes.
pub fn strata_daemon(dir: &Path, size: u64) -> R<(Server, PathBuf)> {
    let (srv, store) = strata_serve(dir)?;
    strata_cli(
        &store,
        &["volume", "create", "bench", "--size", &size.to_string()],
    )?;
    Ok((srv, store))
}

/// One time-based fio job with O_DIRECT on `file` (`size` bytes): IOPS, or MiB/s for 1 MiB
/// blocks. A write job is timed to the completion of an `fsync` of the file issued right
/// after fio's last write (O_DIRECT only bypasses the page cache of the file fio opens, not
/// the server's own cache: without the fsync both sides would be measured into memory).
pub fn fio_rate(
    file: &Path,
    rw: &str,
    bs: &str,
    engine: &str,
    depth: u32,
    size: u64,
    secs: u32,
) -> R<f64> {
    let out = Command::new("fio")
        .arg("--name=bench")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={secs}"))
        .args([
            "--time_based",
            "--direct=1",
            "--fallocate=none",
            "--randrepeat=0",
            "--norandommap",
            "--output-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("fio {rw} {bs} on {} failed", file.display()).into());
    }
    let write = !rw.contains("read");
    let fsync_secs = if write {
        let t = std::time::Instant::now();
        std::fs::OpenOptions::new()
            .write(true)
            .open(file)?
            .sync_all()?;
        t.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let job = &v["jobs"][0][if write { "write" } else { "read" }];
    let runtime = job["runtime"].as_f64().ok_or("fio: no runtime")? / 1000.0;
    if runtime <= 0.0 {
        return Err("fio: zero runtime".into());
    }
    let secs = runtime + fsync_secs;
    Ok(if bs.eq_ignore_ascii_case("1M") {
        job["io_bytes"].as_f64().ok_or("fio: no io_bytes")? / f64::from(1 << 20) / secs
    } else {
        job["total_ios"].as_f64().ok_or("fio: no total_ios")? / secs
    })
}

/// The command line as `--flag value` pairs (every flag of the bench binaries takes a value).
pub fn flag_values() -> R<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let v = it.next().ok_or(format!("{x} needs a value"))?;
        out.push((x, v));
    }
    Ok(out)
}
