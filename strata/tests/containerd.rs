#![allow(clippy::unwrap_used)]
//! The containerd snapshotter against a real containerd (Debian's 1.6) and runc, both
//! started by the test with their own root, state and sockets: an image built here is
//! imported and run on Strata trees, a running container's root is checkpointed, damaged
//! and restored, diffed and pushed to a remote (Garage), `ctr snapshots` agrees with
//! `strata`, and committed snapshots survive a
//! SIGKILL of the daemon.

mod common;

use common::Daemon;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_tests::containerd::Containerd;
use strata_tests::garage::Garage;
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
    // What changed in the running root since the checkpoint, as paths.
    let diff = d.ok(&["checkpoint", "diff", &format!("{vol}@before"), &vol]);
    assert!(diff.contains("/bin/busybox"), "{diff}");
    assert!(!diff.contains("/etc/added"), "{diff}");
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
    // ... and ships like any tree: pushed to an S3 remote (Garage), it comes back as a
    // tree in a new volume with the container's files.
    let garage = Garage::single(&w.join("garage"));
    let creds = w.join("s3.creds");
    Garage::credentials_file(&creds);
    let args = garage.remote_add_args("g", &creds);
    d.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    d.ok(&["checkpoint", "push", &format!("{vol}@before")]);
    d.ok(&[
        "volume",
        "create",
        "pulled",
        "--from",
        &format!("g:{vol}@before"),
    ]);
    let mnt = w.join("pulled");
    fs::create_dir_all(&mnt).unwrap();
    d.ok(&["mount", "pulled", p(&mnt)]);
    assert_eq!(
        fs::read_to_string(mnt.join("etc/added")).unwrap(),
        "added-by-layer-2"
    );
    assert!(mnt.join("bin/busybox").is_file());
    d.ok(&["unmount", p(&mnt)]);
    d.ok(&["volume", "delete", "pulled"]);
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

    // A snapshot made and removed with ctr alone: its volume comes and goes.
    let has_volume = |d: &Daemon, v: &str| {
        d.ok(&["volume", "list"])
            .lines()
            .any(|l| l.split_whitespace().any(|f| f == format!("name={v}")))
    };
    c.ok(&["snapshots", "--snapshotter", "strata", "prepare", "extra"]);
    let extra = volume_of(&store, "/extra");
    assert!(has_volume(&d, &extra), "{extra}");
    let ls = c.ok(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(ls.contains("extra"), "{ls}");
    c.ok(&["snapshots", "--snapshotter", "strata", "rm", "extra"]);
    // The backend's Remove comes from containerd's garbage collection, soon after.
    let deadline = Instant::now() + Duration::from_secs(30);
    while has_volume(&d, &extra) {
        assert!(Instant::now() < deadline, "ctr snapshots rm left {extra}");
        std::thread::sleep(Duration::from_millis(200));
    }

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

/// Outcome of one `go test -v` run: subtest name (without the parent test) per result.
#[derive(Default, Debug)]
struct GoOutcome {
    passed: Vec<String>,
    failed: Vec<String>,
    skipped: Vec<String>,
}

fn go_outcome(out: &str, test: &str) -> GoOutcome {
    let mut o = GoOutcome::default();
    let prefix = format!("{test}/");
    for line in out.lines() {
        let Some((result, rest)) = line.trim().split_once(": ") else {
            continue;
        };
        let Some(name) = rest.split(' ').next().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        match result {
            "--- PASS" => o.passed.push(name.to_string()),
            "--- FAIL" => o.failed.push(name.to_string()),
            "--- SKIP" => o.skipped.push(name.to_string()),
            _ => {}
        }
    }
    o
}

/// containerd's own snapshotter conformance suite (`snapshots/testsuite` of containerd 1.6,
/// from Debian's golang-github-containerd-containerd-dev, built offline in GOPATH mode from
/// the Go source packages scripts/setup.sh unpacks) against Strata, one daemon per subtest,
/// over the snapshots gRPC API; containerd's native snapshotter runs the same suite through
/// the same proxy client as the harness's own check. Failures may only be those in
/// tests/containerd-suite/known-failures.txt.
#[test]
fn containerds_snapshotter_conformance_suite() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let gopath = std::env::var_os("STRATA_GOPATH").map_or_else(
        || PathBuf::from("/var/tmp/strata-tools/gopath/usr/share/gocode"),
        PathBuf::from,
    );
    assert!(
        gopath
            .join("src/github.com/containerd/containerd/snapshots/testsuite")
            .is_dir(),
        "containerd's snapshots/testsuite is not under {} (STRATA_GOPATH): run scripts/setup.sh",
        gopath.display()
    );
    let cache = std::env::var_os("GOCACHE").map_or_else(
        || PathBuf::from("/var/tmp/strata-tools/gocache"),
        PathBuf::from,
    );
    let started = Instant::now();
    let out = Command::new("go")
        .args(["test", "-v", "-count=1", "-timeout", "600s"])
        .args(["-run", "^(TestStrata|TestNativeBaseline)$", "."])
        .current_dir(repo.join("tests/containerd-suite"))
        .env("GO111MODULE", "off")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GOPATH", &gopath)
        .env("GOCACHE", &cache)
        .env("STRATA_BIN", common::STRATA)
        .output()
        .expect("running go (golang-go; scripts/setup.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let strata = go_outcome(&text, "TestStrata");
    let native = go_outcome(&text, "TestNativeBaseline");
    println!(
        "containerd snapshotter suite ({:.1} s): strata {} passed, {} failed, {} skipped; \
         native (harness check) {} passed, {} failed, {} skipped",
        started.elapsed().as_secs_f64(),
        strata.passed.len(),
        strata.failed.len(),
        strata.skipped.len(),
        native.passed.len(),
        native.failed.len(),
        native.skipped.len()
    );
    println!(
        "strata: failed {:?}, skipped {:?}",
        strata.failed, strata.skipped
    );
    // The harness itself: the suite ran, and containerd's own snapshotter passes it.
    assert!(
        native.passed.len() >= 15 && native.failed.is_empty(),
        "the suite did not run cleanly against containerd's native snapshotter: {native:?}\n{text}"
    );
    let total = |o: &GoOutcome| o.passed.len() + o.failed.len() + o.skipped.len();
    assert_eq!(
        total(&strata),
        total(&native),
        "not every subtest ran against Strata: {strata:?}\n{text}"
    );
    let known = common::list_file(&repo.join("tests/containerd-suite/known-failures.txt"));
    let unexpected: Vec<&String> = strata
        .failed
        .iter()
        .filter(|f| !known.contains(f))
        .collect();
    assert!(
        unexpected.is_empty(),
        "suite subtests failing against Strata that are not known failures: {unexpected:?}\n{text}"
    );
    let fixed: Vec<&String> = known
        .iter()
        .filter(|k| !strata.failed.contains(k))
        .collect();
    assert!(
        fixed.is_empty(),
        "known failures that pass now (remove them from the list): {fixed:?}"
    );
    // Skipped only where the suite skips for every snapshotter.
    assert_eq!(strata.skipped, native.skipped, "{text}");
    assert!(out.status.success() || !strata.failed.is_empty(), "{text}");
}
