//! A private containerd (Debian's 1.6, with runc) for the tests and benches: its own root,
//! state, socket and ctr namespace, with Strata as proxy snapshotter `strata`. Missing
//! binaries fail the caller loudly (`scripts/setup.sh` installs them).

#![allow(clippy::unwrap_used)] // Test scaffolding: a failure is a failed test.

use crate::image::p;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// (success, stdout+stderr) of a finished command.
pub fn outcome(out: &std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A private containerd with Strata as proxy snapshotter `strata`.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    pub sock: PathBuf,
    pub root: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path, snapshotter: &Path) -> Containerd {
        for t in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
            assert!(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("command -v {t}"))
                    .status()
                    .unwrap()
                    .success(),
                "{t} is missing: scripts/setup.sh installs containerd and runc"
            );
        }
        let sock = dir.join("ctd.sock");
        let root = dir.join("ctd-root");
        let config = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{}\"\n\
             [proxy_plugins]\n  [proxy_plugins.strata]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            p(&root),
            p(&dir.join("ctd-state")),
            p(&sock),
            p(snapshotter)
        );
        fs::write(dir.join("config.toml"), config).unwrap();
        let log = fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd { child, sock, root };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.run(&["version"]).0 {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// `ctr` against this containerd: (success, stdout+stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("timeout")
            .arg("120")
            .arg("ctr")
            .arg("--address")
            .arg(&self.sock)
            // runc's state (/run/containerd/runc/NAMESPACE) is shared by every containerd
            // on the host: a namespace of our own keeps container names apart.
            .arg("--namespace")
            .arg(format!("strata-test-{}", std::process::id()))
            .args(args)
            .output()
            .unwrap();
        outcome(&out)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.run(args);
        assert!(ok, "ctr {args:?}: {out}");
        out
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args([
                "-f",
                &format!("containerd-shim-runc-v2 .*{}", p(&self.sock)),
            ])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir(format!(
            "/run/containerd/runc/strata-test-{}",
            std::process::id()
        ));
        let _ = Command::new("umount")
            .args(["-R", "-l", p(&self.root)])
            .stderr(Stdio::null())
            .status();
    }
}
