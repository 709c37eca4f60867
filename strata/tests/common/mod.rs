#![allow(dead_code, clippy::unwrap_used)]
//! A `strata serve` process for the integration tests, driven through the real CLI.

pub mod guest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

use strata_tests::containerd::outcome;

pub struct Daemon {
    child: Child,
    pub store: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `store` (its log goes next to it) and waits for its API socket.
    pub fn start(store: &Path) -> Daemon {
        Daemon::start_with(store, &[])
    }

    /// [`Daemon::start`] with extra `strata serve` arguments.
    pub fn start_with(store: &Path, serve_args: &[&str]) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.with_extension("log"))
            .unwrap();
        let child = Command::new(STRATA)
            .args(["--store", store.to_str().unwrap(), "serve"])
            .args(serve_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            store: store.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(store.join("strata.sock")).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Runs a CLI command against this daemon; returns (success, stdout+stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(STRATA)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .output()
            .unwrap();
        outcome(&out)
    }

    /// Runs a command that must succeed; returns its output.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "strata {args:?}: {text}");
        text
    }

    /// Exports `vol` over vhost-user on `sock`.
    pub fn export_vhost(&self, vol: &str, sock: &Path) {
        self.ok(&[
            "export",
            "vhost-user",
            vol,
            "--socket",
            sock.to_str().unwrap(),
        ]);
    }

    /// Stops the daemon (after unexporting `vol`), starts it again on the same store, and
    /// checks that the store scrubs clean.
    pub fn restart_scrubbed(mut self, vol: &str) -> Daemon {
        self.ok(&["unexport", vol]);
        self.terminate();
        let store = self.store.clone();
        // The process has exited; dropping `self` would also detach every mount beside the
        // store (a loop-mounted filesystem holding it among them).
        std::mem::forget(self);
        let d = Daemon::start(&store);
        let scrub: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "scrub"])).unwrap();
        assert!(
            scrub["problems"].as_array().is_none_or(|p| p.is_empty()),
            "{scrub}"
        );
        d
    }

    /// Runs a command that must fail with one clear line containing `needle`.
    pub fn fails(&self, args: &[&str], needle: &str) {
        let (ok, text) = self.run(args);
        assert!(!ok, "strata {args:?} should fail");
        assert!(
            text.starts_with("strata: ") || text.starts_with("error:"),
            "one clear line expected: {text}"
        );
        assert!(
            text.contains(needle),
            "strata {args:?}: expected {needle:?} in {text:?}"
        );
    }

    /// A raw HTTP request to the control API; returns the whole response.
    pub fn http(&self, method: &str, path: &str, body: &str) -> String {
        use std::io::{Read, Write};
        let mut s =
            std::os::unix::net::UnixStream::connect(self.store.join("strata.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Daemon {
    /// SIGTERMs the daemon (a clean shutdown) and waits up to 30 s for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "daemon did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the daemon (a crash) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // FUSE exports a killed daemon left, loop mounts a failed test left: detached, so the
        // test's temporary directory can be removed.
        if let Some(parent) = self.store.parent() {
            strata_fuse::detach_mounts_under(parent);
        }
    }
}

/// The entries of a list file (a known-failures list): one per line, `#` comments and blank
/// lines skipped.
#[allow(dead_code)] // not every test binary that includes this module reads lists
pub fn list_file(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}
