#![allow(clippy::unwrap_used)]
//! Per-volume IO limits (issue 16): token buckets in the engine that both frontends hold
//! requests to, set at create time or live, kept across restarts.
//!
//! Scenario: a vhost-user export driven by libblkio (no guest kernel between) at QD8: the
//! write IOPS and read bandwidth limits hold within 10%, a neighbour volume exported beside
//! it is not held back, lifting a limit live lets IO through at once, the time held back
//! shows in `volume info` and /metrics; a FUSE export is held to the same limits; limits
//! survive a restart and go with the volume; bad limits are refused with clear errors.

mod common;
use common::Daemon;
use serde_json::Value;
use std::time::{Duration, Instant};
use strata_bench::blk::Client;

fn info(d: &Daemon, vol: &str) -> Value {
    serde_json::from_str(&d.ok(&["--json", "volume", "info", vol])).unwrap()
}

fn export(d: &Daemon, dir: &std::path::Path, vol: &str) -> std::path::PathBuf {
    let sock = dir.join(format!("{vol}.sock"));
    d.export_vhost(vol, &sock);
    sock
}

#[test]
fn limits_hold_live_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut d = Daemon::start(&store);
    d.ok(&[
        "volume",
        "create",
        "slow",
        "--size",
        "256M",
        "--write-iops-limit",
        "200",
        "--read-bw-limit",
        "8M",
    ]);
    d.ok(&["volume", "create", "fast", "--size", "256M"]);
    let q = &info(&d, "slow")["qos"];
    assert_eq!(
        (q["write_iops"].as_u64(), q["read_bps"].as_u64()),
        (Some(200), Some(8 << 20)),
        "{q}"
    );
    let (slow_sock, fast_sock) = (
        export(&d, dir.path(), "slow"),
        export(&d, dir.path(), "fast"),
    );

    // The throttled volume and its unthrottled neighbour, driven at once.
    let fast = std::thread::spawn(move || {
        let mut c = Client::connect(&fast_sock).unwrap();
        c.run(true, true, 4096, 8, 4.0).unwrap().unflushed
    });
    let mut slow = Client::connect(&slow_sock).unwrap();
    let w = slow.run(true, true, 4096, 8, 4.0).unwrap().unflushed;
    let fast = fast.join().unwrap();
    println!("write IOPS: slow (limit 200) {w:.0}, fast (no limit) beside it {fast:.0}");
    assert!(
        (180.0..=220.0).contains(&w),
        "write IOPS {w:.0} against a limit of 200"
    );
    assert!(
        fast > 5.0 * 200.0,
        "the neighbour was held back: {fast:.0} IOPS"
    );

    // Reads are held by bytes: 64 KiB reads at 8 MiB/s.
    let r = slow.run(false, false, 64 << 10, 8, 3.0).unwrap().unflushed * 65536.0;
    println!(
        "read bandwidth: {:.2} MiB/s against a limit of 8 MiB/s",
        r / 1048576.0
    );
    assert!(
        (7.2 * 1048576.0..=8.8 * 1048576.0).contains(&r),
        "read {r:.0} B/s against 8 MiB/s"
    );
    let q = info(&d, "slow")["qos"].clone();
    assert!(q["throttled_write_secs"].as_f64().unwrap() > 1.0, "{q}");
    assert!(q["throttled_read_requests"].as_u64().unwrap() > 0, "{q}");
    let metrics = d.http("GET", "/metrics", "");
    assert!(
        metrics.lines().any(|l| l
            .strip_prefix("strata_volume_throttled_seconds_total{volume=\"slow\",dir=\"write\"} ")
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 1.0)),
        "no throttled time in /metrics"
    );

    // Lifted live: the export runs unthrottled at once.
    d.ok(&["volume", "set", "slow", "--write-iops-limit", "0"]);
    let w = slow.run(true, true, 4096, 8, 2.0).unwrap().unflushed;
    println!("write IOPS with the limit lifted: {w:.0}");
    assert!(w > 5.0 * 200.0, "{w:.0}");
    drop(slow);

    // The FUSE export is held to the same limits: 16 MiB read at 8 MiB/s.
    d.ok(&["unexport", "slow"]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    d.ok(&[
        "export",
        "fuse",
        "slow",
        "--mountpoint",
        mnt.to_str().unwrap(),
    ]);
    let t = Instant::now();
    let mut f = std::fs::File::open(mnt.join("slow.img")).unwrap();
    let mut buf = vec![0u8; 16 << 20];
    std::io::Read::read_exact(&mut f, &mut buf).unwrap();
    let took = t.elapsed();
    println!("FUSE: 16 MiB read in {took:?} at a limit of 8 MiB/s");
    assert!(took > Duration::from_millis(1800), "{took:?}");
    drop(f);
    d.ok(&["unexport", "slow"]);

    // A tree mount is held to its volume's limits too: 12 MiB written and fsynced at 4 MiB/s.
    d.ok(&["fs", "create", "t"]);
    d.ok(&["volume", "set", "t", "--write-bw-limit", "4M"]);
    let tmnt = dir.path().join("tree");
    std::fs::create_dir_all(&tmnt).unwrap();
    d.ok(&["mount", "t", tmnt.to_str().unwrap()]);
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(tmnt.join("big")).unwrap();
        std::io::Write::write_all(&mut f, &vec![7u8; 12 << 20]).unwrap();
        f.sync_all().unwrap();
    }
    let took = t.elapsed();
    println!("tree: 12 MiB written and fsynced in {took:?} at a limit of 4 MiB/s");
    assert!(took > Duration::from_millis(2700), "{took:?}");
    assert!(
        info(&d, "t")["qos"]["throttled_write_secs"]
            .as_f64()
            .unwrap()
            > 1.0
    );

    // A tree at its quota: ENOSPC, and removing files makes room again.
    d.ok(&[
        "volume",
        "set",
        "t",
        "--write-bw-limit",
        "0",
        "--quota",
        "16M",
    ]);
    let fill = |name: &str| -> std::io::Result<()> {
        let mut f = std::fs::File::create(tmnt.join(name))?;
        std::io::Write::write_all(&mut f, &strata_tests::block_content(9, 3, 1 << 20))?;
        f.sync_all()
    };
    let mut n = 0;
    let err = loop {
        match fill(&format!("f{n}")) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 64, "a tree with a 16 MiB quota took 64 MiB");
    };
    println!("tree: {n} files of 1 MiB fitted a 16 MiB quota beside the 12 MiB file, then: {err}");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    std::fs::remove_file(tmnt.join("big")).unwrap();
    for i in 0..n {
        std::fs::remove_file(tmnt.join(format!("f{i}"))).unwrap();
    }
    fill("again").unwrap();
    assert!(
        info(&d, "t")["qos"]["quota_refused_writes"]
            .as_u64()
            .unwrap()
            > 0
    );
    d.ok(&["unmount", tmnt.to_str().unwrap()]);

    // Bad limits are refused and change nothing.
    d.fails(
        &["volume", "set", "slow", "--write-iops-limit", "5"],
        "at least 10",
    );
    d.fails(
        &["volume", "set", "slow", "--bw-limit", "100K"],
        "at least 1M",
    );
    d.fails(&["volume", "set", "slow", "--burst", "2m"], "at most 60s");
    d.fails(&["volume", "set", "slow", "--quota", "64K"], "at least 1M");
    d.fails(&["volume", "set", "slow", "--quota", "lots"], "lots");
    d.fails(
        &["volume", "set", "nosuch", "--iops-limit", "100"],
        "nosuch",
    );
    d.fails(&["volume", "set", "slow"], "nothing to set");
    d.fails(
        &["volume", "create", "x", "--size", "1M", "--iops-limit", "3"],
        "at least 10",
    );
    assert!(!d.ok(&["volume", "list"]).contains("\"x\""));

    // Kept across a restart; gone with the volume.
    d.ok(&[
        "volume",
        "set",
        "slow",
        "--write-iops-limit",
        "300",
        "--burst",
        "250ms",
        "--quota",
        "100M",
    ]);
    d.terminate();
    let d = Daemon::start(&store);
    let q = info(&d, "slow")["qos"].clone();
    assert_eq!(
        (
            q["write_iops"].as_u64(),
            q["read_bps"].as_u64(),
            q["burst_ms"].as_u64(),
            q["quota_bytes"].as_u64()
        ),
        (Some(300), Some(8 << 20), Some(250), Some(100 << 20)),
        "{q}"
    );
    d.ok(&["volume", "delete", "slow"]);
    d.ok(&["volume", "create", "slow", "--size", "1M"]);
    assert!(info(&d, "slow")["qos"].is_null());
    let kept = std::fs::read_to_string(store.join("qos.json")).unwrap();
    assert!(!kept.contains("slow"), "{kept}");
}
