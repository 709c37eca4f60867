//! Shared helpers for the benchmark binaries: the `strata` daemon and peer processes.

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

/// Starts `strata serve` on `DIR/strata-store` with a volume `bench` of `size` bytes.
/// Returns the daemon (its `socket` is the API socket) and the store path. The daemon's log
/// is `DIR/strata-daemon.log`.
pub fn strata_daemon(dir: &Path, size: u64) -> R<(Server, PathBuf)> {
    let store = dir.join("strata-store");
    let log = std::fs::File::create(dir.join("strata-daemon.log"))?;
    let child = Command::new(strata_bin()?)
        .arg("--store")
        .arg(&store)
        .arg("serve")
        .stderr(log)
        .spawn()?;
    let api = store.join("strata.sock");
    let srv = Server { child, socket: api };
    wait_for(&srv.socket)?;
    strata_cli(
        &store,
        &["volume", "create", "bench", "--size", &size.to_string()],
    )?;
    Ok((srv, store))
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
