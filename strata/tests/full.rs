#![allow(clippy::unwrap_used)]
//! A full store filesystem (issue 16): the store lives on a small loop-mounted ext4; a
//! device (libblkio on a vhost-user export, no guest kernel between) writes past the space.
//! Writes then fail with a device IOERR (not a hang, not a crash), what was flushed before
//! reads back, a checkpoint taken before restores byte-identical, and once space is freed
//! (a volume deleted) writes succeed again without a restart; after a restart the store
//! scrubs clean and still holds everything flushed.
//!
//! Then the same with a QEMU guest running ext4 on the disk, once against a full store
//! filesystem and once against the volume's quota: the guest sees IO errors, and after space
//! is freed (and the daemon restarted) e2fsck finds what a power cut leaves, the files the
//! guest synced read back, and a checkpoint taken before restores byte-identical.

mod common;
use common::guest::{assert_ok, boot, guest_dir, info as guest_info};
use common::Daemon;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_bench::blk::Client;

const MIB: usize = 1 << 20;

/// An ext4 filesystem of `mib` MiB on a loop device, unmounted when dropped.
struct LoopFs {
    mnt: PathBuf,
}

impl LoopFs {
    fn new(dir: &Path, mib: u64) -> LoopFs {
        let img = dir.join("disk.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("running {cmd:?} (e2fsprogs, mount): {e}"));
            assert!(out.status.success(), "{cmd:?}: {out:?}");
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        LoopFs { mnt }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Already detached when the daemon's drop took the mounts beside its store with it.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The content of 1 MiB piece `i` of the filler volume.
fn piece(i: u64) -> Vec<u8> {
    (0..256u64)
        .flat_map(|b| strata_tests::block_content(i * 256 + b, 41, 4096))
        .collect()
}

/// Exports `filler` on `sock` and connects to it.
fn export_filler(d: &Daemon, sock: &Path) -> Client {
    d.export_vhost("filler", sock);
    Client::connect(sock).unwrap()
}

/// Reads each piece back through `c` and checks its content.
fn assert_pieces(c: &mut Client, pieces: impl Iterator<Item = u64>, when: &str) {
    for i in pieces {
        assert_eq!(c.io_at(false, i * MIB as u64, MIB).unwrap(), 0);
        assert!(c.buffer(MIB) == piece(i).as_slice(), "piece {i} {when}");
    }
}

fn info(d: &Daemon, vol: &str) -> Value {
    serde_json::from_str(&d.ok(&["--json", "volume", "info", vol])).unwrap()
}

#[test]
fn a_full_store_fails_writes_keeps_what_was_flushed_and_resumes_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(dir.path(), 160);
    let store = fs.mnt.join("store");
    let d = Daemon::start(&store);

    // A checkpoint taken before the store fills, and a volume to delete later for space.
    let img = dir.path().join("a.raw");
    let a: Vec<u8> = (0..16).flat_map(piece).map(|b| b ^ 0x5A).collect();
    std::fs::write(&img, &a).unwrap();
    d.ok(&["volume", "create", "a", "--size", "16M"]);
    d.ok(&["import", "a", img.to_str().unwrap()]);
    d.ok(&["checkpoint", "create", "a@c1"]);
    let spare_img = dir.path().join("spare.raw");
    std::fs::write(&spare_img, (100..140).flat_map(piece).collect::<Vec<u8>>()).unwrap();
    d.ok(&["volume", "create", "spare", "--size", "40M"]);
    d.ok(&["import", "spare", spare_img.to_str().unwrap()]);

    // The device writes 1 MiB pieces, flushing every 8, until the store is full.
    d.ok(&["volume", "create", "filler", "--size", "512M"]);
    let sock = dir.path().join("filler.sock");
    let mut c = export_filler(&d, &sock);
    let (mut flushed, mut failed_at) = (0u64, None);
    for i in 0..512u64 {
        let data = piece(i);
        c.buffer(MIB).copy_from_slice(&data);
        let t = Instant::now();
        let r = c.io_at(true, i * MIB as u64, MIB).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a write took {:?}",
            t.elapsed()
        );
        if r != 0 {
            assert_eq!(r, -libc::EIO, "a full store answers IOERR");
            failed_at = Some(i);
            break;
        }
        if i % 8 == 7 && c.try_flush().unwrap() == 0 {
            flushed = i + 1;
        }
    }
    let failed_at = failed_at.expect("160 MiB of store never filled with 512 MiB of writes");
    println!("full after {failed_at} MiB written, {flushed} MiB flushed");
    assert!(
        flushed >= 32,
        "only {flushed} MiB flushed before the store filled"
    );
    // Still full: further writes fail fast, reads of what was flushed are right, the daemon
    // answers its API.
    for i in [failed_at, failed_at + 1, 300] {
        c.buffer(MIB).copy_from_slice(&piece(i));
        let t = Instant::now();
        assert_ne!(c.io_at(true, i * MIB as u64, MIB).unwrap(), 0);
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    assert_pieces(&mut c, 0..flushed, "while full");
    let v = info(&d, "filler");
    assert!(
        v["mapped_bytes"].as_u64().unwrap() >= flushed * MIB as u64,
        "{v}"
    );
    // A metadata operation that needs space either works or says why.
    let (ok, out) = d.run(&["checkpoint", "create", "filler@full"]);
    println!("checkpoint while full: ok={ok} {out}");
    assert!(ok || out.contains("space"), "{out}");

    // Space freed: writes succeed again, without a restart.
    d.ok(&["volume", "delete", "spare"]);
    let t = Instant::now();
    let mut resumed = false;
    while t.elapsed() < Duration::from_secs(60) {
        c.buffer(MIB).copy_from_slice(&piece(failed_at));
        if c.io_at(true, failed_at * MIB as u64, MIB).unwrap() == 0 {
            resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("writes resumed {:?} after the delete", t.elapsed());
    assert!(
        resumed,
        "writes still fail a minute after 40 MiB were freed"
    );
    assert_eq!(c.try_flush().unwrap(), 0);
    drop(c);

    // The checkpoint taken before restores byte-identical.
    d.ok(&["volume", "create", "a2", "--from", "a@c1"]);
    let back = dir.path().join("a2.raw");
    d.ok(&["export-image", "a2", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == a, "a@c1 changed");
    std::fs::remove_file(&back).unwrap();

    // After a restart: everything flushed is there, and the store scrubs clean.
    let d = d.restart_scrubbed("filler");
    let mut c = export_filler(&d, &sock);
    assert_pieces(&mut c, (0..flushed).chain([failed_at]), "after the restart");
    drop(c);
    d.ok(&["unexport", "filler"]);
}

/// How the guest's disk runs out of space.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Limit {
    /// The store's own filesystem fills.
    FullStore,
    /// The volume's quota on allocated bytes.
    Quota,
}

/// The volume image of `vol` (or a checkpoint, through a fork of it) in `path`.
fn image_of(d: &Daemon, from: &str, path: &Path) {
    let fork = format!("img{}", path.file_stem().unwrap().to_str().unwrap());
    d.ok(&["volume", "create", &fork, "--from", from]);
    d.ok(&["export-image", &fork, path.to_str().unwrap()]);
    d.ok(&["volume", "delete", &fork]);
}

fn guest_fills_its_disk(limit: Limit) {
    let guest = guest_dir();
    let dir = tempfile::tempdir().unwrap();
    let fs = (limit == Limit::FullStore).then(|| LoopFs::new(dir.path(), 160));
    let store = match &fs {
        Some(fs) => fs.mnt.join("store"),
        None => dir.path().join("store"),
    };
    let d = Daemon::start(&store);
    if limit == Limit::FullStore {
        let spare = dir.path().join("spare.raw");
        std::fs::write(&spare, (100..140).flat_map(piece).collect::<Vec<u8>>()).unwrap();
        d.ok(&["volume", "create", "spare", "--size", "40M"]);
        d.ok(&["import", "spare", spare.to_str().unwrap()]);
    }
    d.ok(&["volume", "create", "vm", "--size", "256M"]);
    d.ok(&["volume", "create", "other", "--size", "16M"]);
    let sock = dir.path().join("vm.sock");
    d.export_vhost("vm", &sock);
    assert_ok(&boot(&guest, &sock, "fill-prep", 1), "fill-prep");
    d.ok(&["checkpoint", "create", "vm@prepped"]);
    let before = dir.path().join("before.raw");
    image_of(&d, "vm@prepped", &before);
    if limit == Limit::Quota {
        d.ok(&["volume", "set", "vm", "--quota", "48M"]);
    }

    let t = Instant::now();
    let out = boot(&guest, &sock, "fill", 1);
    println!("{limit:?}: guest filled its disk in {:?}", t.elapsed());
    assert_ok(&out, "fill");
    let filled: u32 = guest_info(&out, "filled").parse().unwrap();
    let ioerrors: u32 = guest_info(&out, "ioerrors").parse().unwrap();
    println!("{limit:?}: {filled} files of 4 MiB written before one failed; {ioerrors} I/O errors in the guest's log");
    assert!(filled < 200, "{limit:?}: the disk never filled:\n{out}");
    assert!(ioerrors > 0, "{limit:?}: the guest saw no IO error:\n{out}");
    let v = info(&d, "vm");
    match limit {
        Limit::Quota => {
            // The quota held, and only this volume was refused: another one writes on.
            let q = &v["qos"];
            assert_eq!(q["quota_bytes"], 48 << 20, "{v}");
            assert!(q["quota_refused_writes"].as_u64().unwrap() > 0, "{v}");
            assert!(v["mapped_bytes"].as_u64().unwrap() <= 48 << 20, "{v}");
            let metrics = d.http("GET", "/metrics", "");
            assert!(
                metrics.lines().any(|l| l
                    .starts_with("strata_volume_quota_refused_writes_total{volume=\"vm\"}")
                    && !l.ends_with(" 0")),
                "{metrics}"
            );
            let other = dir.path().join("other.raw");
            std::fs::write(&other, (0..16).flat_map(piece).collect::<Vec<u8>>()).unwrap();
            d.ok(&["import", "other", other.to_str().unwrap()]);
            d.ok(&["volume", "set", "vm", "--quota", "0"]);
        }
        Limit::FullStore => {
            d.ok(&["volume", "delete", "spare"]);
        }
    }

    // Restart the daemon (and the guest): scrub is clean, the guest's ext4 comes back.
    let d = d.restart_scrubbed("vm");
    d.export_vhost("vm", &sock);
    let out = boot(&guest, &sock, "fill-check", 1);
    let fsck_rc: u32 = guest_info(&out, "fsck_rc").parse().unwrap();
    let repairs: Vec<&str> = out.lines().filter(|l| l.starts_with("fsck: ")).collect();
    println!(
        "{limit:?}: e2fsck -fy exit {fsck_rc}:\n{}",
        repairs.join("\n")
    );
    assert_ok(&out, "fill-check");
    // 0: clean, 1: errors corrected; and every repair is one a power cut also needs: the
    // journal replayed, orphans cleared, summary counts corrected.
    assert!(fsck_rc <= 1, "{limit:?}: e2fsck left errors:\n{out}");
    let power_cut = [
        "e2fsck ",
        "/dev/vda: recovering journal",
        "Pass ",
        "Free blocks count wrong",
        "Free inodes count wrong",
        "Fix? yes",
        "Clearing orphaned inode",
        "/dev/vda: ***** FILE SYSTEM WAS MODIFIED *****",
        "/dev/vda: ",
    ];
    for l in &repairs {
        let l = l.trim_start_matches("fsck: ").trim();
        assert!(
            l.is_empty() || power_cut.iter().any(|p| l.starts_with(p)),
            "{limit:?}: e2fsck repaired more than a power cut leaves: {l:?}\n{out}"
        );
    }
    d.ok(&["unexport", "vm"]);

    // The checkpoint taken before the fill restores byte-identical.
    let after = dir.path().join("after.raw");
    image_of(&d, "vm@prepped", &after);
    let same = Command::new("cmp")
        .arg(&before)
        .arg(&after)
        .status()
        .unwrap();
    assert!(same.success(), "{limit:?}: vm@prepped changed");
}

#[test]
fn a_guest_filling_a_full_store_sees_io_errors_and_its_ext4_recovers() {
    guest_fills_its_disk(Limit::FullStore);
}

#[test]
fn a_guest_at_its_quota_sees_io_errors_and_its_ext4_recovers() {
    guest_fills_its_disk(Limit::Quota);
}
