#![allow(clippy::unwrap_used)]
//! The containerd snapshotter against a real containerd (Debian's 1.6) and runc, both
//! started by the test with their own root, state and sockets: an image built here is
//! imported and run on Strata trees, a running container's root is checkpointed, damaged
//! and restored, `ctr snapshots` agrees with `strata`, and committed snapshots survive a
//! SIGKILL of the daemon.

mod common;

use common::Daemon;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_tests::containerd::Containerd;
use strata_tests::image::{image, layer, p, sh};

const IMAGE: &str = "docker.io/strata/busybox:test";

/// The Strata volume behind a containerd snapshot key, from the snapshotter's record.
fn volume_of(store: &Path, key_part: &str) -> String {
    let rec: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("containerd/snapshots.json")).unwrap())
            .unwrap();
    rec["snapshots"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.ends_with(key_part))
        .map(|(_, v)| v["volume"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no snapshot {key_part} in {rec}"))
}

fn busybox_image(w: &Path) -> PathBuf {
    let base = w.join("s-base");
    fs::create_dir_all(base.join("bin")).unwrap();
    fs::create_dir_all(base.join("etc")).unwrap();
    let busybox = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v busybox"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!busybox.trim().is_empty(), "busybox-static is missing");
    fs::copy(busybox.trim(), base.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", base.join("bin/sh")).unwrap();
    fs::write(base.join("etc/removed"), "old").unwrap();
    let upper = w.join("s-upper");
    fs::create_dir_all(upper.join("etc")).unwrap();
    fs::write(upper.join("etc/added"), "added-by-layer-2").unwrap();
    fs::write(upper.join("etc/.wh.removed"), "").unwrap();
    let l1 = layer(w, &base, "base", "gzip");
    let l2 = layer(w, &upper, "upper", "gzip");
    let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
    let layout = w.join("layout");
    image(&layout, &[(l1.0, l1.1, gz), (l2.0, l2.1, gz)], IMAGE);
    let tar = w.join("image.tar");
    sh(&format!("tar -C {} -cf {} .", p(&layout), p(&tar)));
    tar
}

#[test]
fn containerd_runs_containers_on_strata_trees() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let tar = busybox_image(w);
    let store = w.join("store");
    let snap_sock = w.join("snap.sock");
    let mut d = Daemon::start_with(&store, &["--containerd-socket", p(&snap_sock)]);
    let c = Containerd::start(w, &snap_sock);

    c.ok(&["images", "import", "--snapshotter", "strata", p(&tar)]);
    let out = c.ok(&[
        "run",
        "--snapshotter",
        "strata",
        "--rm",
        IMAGE,
        "c1",
        "/bin/busybox",
        "sh",
        "-c",
        "cat /etc/added; echo; ls /etc",
    ]);
    assert!(out.contains("added-by-layer-2"), "{out}");
    assert!(
        !out.contains("removed"),
        "the whited-out file is visible: {out}"
    );

    // ctr and strata agree: two committed layers, each a tree volume of Strata holding its
    // commit checkpoint. (The finished container's snapshot leaves the backend at
    // containerd's next GC, so only committed snapshots are compared.)
    let ls = c.ok(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(ls.matches("Committed").count(), 2, "{ls}");
    let vols = d.ok(&["volume", "list"]);
    let committed = vols
        .lines()
        .filter(|l| l.contains("name=ctrd-") && l.contains("checkpoints=1"))
        .count();
    assert_eq!(committed, 2, "{vols}");
    // Usage: what each layer adds (the base layer holds busybox, over a MiB).
    let usage = c.ok(&["snapshots", "--snapshotter", "strata", "usage"]);
    assert_eq!(usage.lines().count(), 3, "{usage}");
    assert!(usage.contains("MiB"), "{usage}");

    // A running container's root is an ordinary tree: checkpoint, damage, restore.
    c.ok(&[
        "run",
        "-d",
        "--snapshotter",
        "strata",
        IMAGE,
        "c2",
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let vol = volume_of(&store, "/c2");
    d.ok(&["checkpoint", "create", &format!("{vol}@before")]);
    c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "c2",
        "/bin/busybox",
        "rm",
        "-rf",
        "/bin",
    ]);
    let (ok, _) = c.run(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "c2",
        "/bin/busybox",
        "true",
    ]);
    assert!(!ok, "/bin is gone: exec must fail");
    d.ok(&["checkpoint", "restore", &format!("{vol}@before")]);
    let out = c.ok(&[
        "task",
        "exec",
        "--exec-id",
        "e3",
        "c2",
        "/bin/busybox",
        "cat",
        "/etc/added",
    ]);
    assert!(out.contains("added-by-layer-2"), "{out}");
    c.ok(&["task", "kill", "-s", "KILL", "c2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.run(&["task", "rm", "c2"]).0 {
        assert!(Instant::now() < deadline, "the task did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ok(&["containers", "rm", "c2"]);

    // A SIGKILL of the daemon keeps every committed snapshot usable.
    d.kill();
    drop(d);
    let d = Daemon::start_with(&store, &["--containerd-socket", p(&snap_sock)]);
    // containerd reconnects to the snapshotter's socket with a back-off (up to 3 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let (ok, out) = c.run(&[
            "run",
            "--snapshotter",
            "strata",
            "--rm",
            IMAGE,
            "c3",
            "/bin/busybox",
            "cat",
            "/etc/added",
        ]);
        if ok || !out.contains("unavailable") || Instant::now() > deadline {
            assert!(ok, "{out}");
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(out.contains("added-by-layer-2"), "{out}");

    // Removing the image (waiting for containerd's GC) removes the layers: the volumes go too.
    c.ok(&["images", "rm", "--sync", IMAGE]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vols = d.ok(&["volume", "list"]);
        if !vols.contains("name=ctrd-") {
            break;
        }
        assert!(Instant::now() < deadline, "layers not removed: {vols}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
