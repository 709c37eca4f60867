#![allow(clippy::unwrap_used)]
//! Scenario: a volume and its checkpoints served as image files over FUSE by `strata serve`.
//! ext4 made on the image, loop-mounted, checked with `e2fsck -fn`; checkpoint files show the
//! old content while the live file changes; fio verifies random and sequential writes; a
//! punch-hole job returns space to the store; `qemu-img compare` matches an imported file;
//! restores and new checkpoints show up without remounting; bad input gets clear errors and
//! changes nothing; a daemon killed with SIGKILL leaves no mount that hangs, and the next
//! daemon mounts the recorded export again; after a clean shutdown it does too.
//!
//! Needs root, /dev/fuse, e2fsprogs, fio and qemu-img (scripts/setup.sh installs them); the
//! tests fail, loudly, without them.

mod common;
use common::Daemon;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed (scripts/setup.sh): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A store, a daemon, and `VOL` exported over FUSE at `DIR/mnt`.
struct Setup {
    // Dropped in order: the daemon (which unmounts what is left under the directory) first.
    d: Daemon,
    mnt: PathBuf,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(vol: &str, size: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start(&dir.path().join("store"));
        d.ok(&["volume", "create", vol, "--size", size]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        d.ok(&["export", "fuse", vol, "--mountpoint", p(&mnt)]);
        Setup { dir, d, mnt }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.d.ok(&a)).unwrap()
    }

    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Deterministic file content: `len` bytes seeded by `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    strata_tests::block_content(seed, 0, len)
}

fn errno(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn ext4_on_the_image_checkpoint_keeps_old_files_and_restore_shows_without_remount() {
    let s = Setup::new("vm", "256M");
    let img = s.file("vm.img");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_eq!(s.listing(), ["vm.img"]);

    sh("mkfs.ext4", &["-q", "-F", p(&img)]);
    let ext = s.path("ext");
    std::fs::create_dir(&ext).unwrap();
    sh("mount", &["-o", "loop", p(&img), p(&ext)]);
    for d in 0..4 {
        std::fs::create_dir(ext.join(format!("d{d}"))).unwrap();
        for f in 0..25u64 {
            let len = 1000 + (f as usize * 7919) % 300_000;
            std::fs::write(ext.join(format!("d{d}/f{f}")), content(d * 100 + f, len)).unwrap();
        }
    }
    sh("umount", &[p(&ext)]);
    sh("e2fsck", &["-fn", p(&img)]);

    // A checkpoint appears in the mount without remounting.
    s.d.ok(&["checkpoint", "create", "vm@c1"]);
    assert_eq!(s.listing(), ["vm.img", "vm@c1.img"]);
    let ck = s.file("vm@c1.img");
    let cmeta = std::fs::metadata(&ck).unwrap();
    assert_eq!(cmeta.len(), 256 << 20);
    assert_eq!(cmeta.permissions().mode() & 0o777, 0o444);

    // Change files in the live image.
    sh("mount", &["-o", "loop", p(&img), p(&ext)]);
    std::fs::write(ext.join("d0/f0"), b"changed").unwrap();
    std::fs::remove_file(ext.join("d1/f1")).unwrap();
    std::fs::write(ext.join("new"), b"new file").unwrap();
    sh("umount", &[p(&ext)]);
    sh("e2fsck", &["-fn", p(&img)]);

    // The checkpoint's image, loop-mounted read-only, has the old content.
    let old = s.path("old");
    std::fs::create_dir(&old).unwrap();
    sh("mount", &["-o", "loop,ro,noload", p(&ck), p(&old)]);
    assert_eq!(std::fs::read(old.join("d0/f0")).unwrap(), content(0, 1000));
    assert_eq!(
        std::fs::read(old.join("d1/f1")).unwrap(),
        content(101, 1000 + 7919)
    );
    assert!(!old.join("new").exists());
    sh("umount", &[p(&old)]);
    sh("e2fsck", &["-fn", p(&ck)]);

    // Writes to a checkpoint's file are refused; nothing changes.
    assert_eq!(
        errno(OpenOptions::new().write(true).open(&ck)),
        libc::EROFS,
        "opening a checkpoint for writing"
    );

    // Read the live image through the page cache, then restore under the mount: the kernel
    // drops its cached pages and the file reads as the checkpoint.
    let live_before = std::fs::read(&img).unwrap();
    let ck_bytes = std::fs::read(&ck).unwrap();
    assert_ne!(live_before, ck_bytes);
    s.d.ok(&["checkpoint", "restore", "vm@c1"]);
    assert!(
        std::fs::read(&img).unwrap() == ck_bytes,
        "restore is visible"
    );
    sh("mount", &["-o", "loop", p(&img), p(&ext)]);
    assert_eq!(std::fs::read(ext.join("d0/f0")).unwrap(), content(0, 1000));
    assert!(!ext.join("new").exists());
    sh("umount", &[p(&ext)]);

    // Deleting the checkpoint removes its file.
    s.d.ok(&["checkpoint", "delete", "vm@c1"]);
    assert_eq!(s.listing(), ["vm.img"]);

    s.d.ok(&["unexport", "vm"]);
    assert_eq!(std::fs::read_dir(&s.mnt).unwrap().count(), 0, "unmounted");
}

fn fio(args: &[&str]) -> String {
    // No verify state file: fio would leave it in the working directory (the source tree).
    let args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--verify_state_save=0"])
        .collect();
    let out = sh("fio", &args);
    assert!(!out.contains("verify: bad"), "fio verify failed: {out}");
    out
}

#[test]
fn fio_verifies_and_punch_hole_returns_space_to_the_store() {
    let s = Setup::new("vm", "512M");
    let img = s.file("vm.img");
    let f = format!("--filename={}", p(&img));
    for (rw, bs, direct) in [
        ("randwrite", "4k", "1"),
        ("write", "1M", "1"),
        ("randrw", "16k", "0"),
    ] {
        fio(&[
            "--name=verify",
            &f,
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--direct={direct}"),
            "--size=128M",
            "--ioengine=psync",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--fallocate=none",
            "--randrepeat=0",
        ]);
    }
    // Queue depth 16 through async direct IO, several requests in flight at once.
    fio(&[
        "--name=qd16",
        &f,
        "--rw=randwrite",
        "--bs=4k",
        "--direct=1",
        "--ioengine=libaio",
        "--iodepth=16",
        "--offset=128M",
        "--size=128M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--fallocate=none",
    ]);
    s.d.ok(&["checkpoint", "create", "vm@full"]);
    s.d.ok(&["checkpoint", "delete", "vm@full"]);

    // Fill 64 MiB past the fio area, then punch it: the store frees it.
    let data = content(7, 1 << 20);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    for i in 0..64u64 {
        file.write_all_at(&data, (256 << 20) + i * (1 << 20))
            .unwrap();
    }
    file.sync_all().unwrap();
    let before = s.json(&["volume", "info", "vm"])["mapped_bytes"]
        .as_u64()
        .unwrap();
    let blocks_before = std::fs::metadata(&img).unwrap().blocks();
    let live_before = s.json(&["stats"])["live_bytes"].as_u64().unwrap();
    fio(&[
        "--name=punch",
        &f,
        "--ioengine=falloc",
        "--rw=trim",
        "--bs=1M",
        "--offset=256M",
        "--size=64M",
    ]);
    file.sync_all().unwrap();
    let after = s.json(&["volume", "info", "vm"])["mapped_bytes"]
        .as_u64()
        .unwrap();
    let live_after = s.json(&["stats"])["live_bytes"].as_u64().unwrap();
    println!("punch-hole: mapped {before} -> {after} bytes, store live {live_before} -> {live_after} bytes");
    assert_eq!(
        before - after,
        64 << 20,
        "mapped bytes drop by the punched range"
    );
    assert_eq!(
        live_before - live_after,
        64 << 20,
        "the store no longer holds the punched blocks"
    );
    // st_blocks follows (the kernel may cache attributes for up to a second).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&img).unwrap().blocks() >= blocks_before {
        assert!(Instant::now() < deadline, "st_blocks did not drop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut buf = vec![1u8; 1 << 20];
    file.read_exact_at(&mut buf, 300 << 20).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "a punched range reads as zeros"
    );

    // SEEK_DATA / SEEK_HOLE follow the extent map.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: lseek on an open descriptor with plain integer arguments.
    let seek = |off: i64, whence: i32| unsafe { libc::lseek(fd, off, whence) };
    assert_eq!(
        seek(256 << 20, libc::SEEK_DATA),
        -1,
        "no data after 256 MiB"
    );
    assert_eq!(
        seek(0, libc::SEEK_HOLE),
        256 << 20,
        "fio wrote all of 0..256 MiB"
    );
    assert_eq!(seek(300 << 20, libc::SEEK_HOLE), 300 << 20);

    // Zero-range keeps the bytes around it.
    file.write_all_at(&data[..8192], 400 << 20).unwrap();
    sh(
        "fallocate",
        &[
            "--zero-range",
            "--offset",
            "419431424",
            "--length",
            "4096",
            p(&img),
        ],
    );
    let mut got = vec![0u8; 8192];
    file.read_exact_at(&mut got, 400 << 20).unwrap();
    assert_eq!(&got[..1024], &data[..1024]);
    assert!(got[1024..5120].iter().all(|&b| b == 0));
    assert_eq!(&got[5120..], &data[5120..8192]);
    drop(file);

    // The export's IO shows in the daemon's metrics.
    let metrics = s.d.http("GET", "/metrics", "");
    for op in ["read", "write", "flush", "discard", "write_zeroes"] {
        let key = format!("strata_io_ops_total{{volume=\"vm\",op=\"{op}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .unwrap_or_else(|| panic!("no {key} in metrics"))
            .trim()
            .parse()
            .unwrap();
        assert!(count > 0, "{op} not counted");
    }
    s.d.ok(&["unexport", "vm"]);
}

#[test]
fn qemu_img_compare_checkpoint_image_against_the_imported_file() {
    let s = Setup::new("vm", "64M");
    s.d.ok(&["unexport", "vm"]);
    let raw = s.path("in.raw");
    let mut bytes = content(3, 64 << 20);
    bytes[(16 << 20)..(24 << 20)].fill(0);
    std::fs::write(&raw, &bytes).unwrap();
    s.d.ok(&["import", "vm", p(&raw)]);
    s.d.ok(&["checkpoint", "create", "vm@imported"]);
    s.d.ok(&["export", "fuse", "vm", "--mountpoint", p(&s.mnt)]);
    // Overwrite part of the live image through the mount.
    let img = s.file("vm.img");
    let file = OpenOptions::new().write(true).open(&img).unwrap();
    file.write_all_at(&[0xab; 65536], 1 << 20).unwrap();
    drop(file);
    let ck = s.file("vm@imported.img");
    sh(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&raw), p(&ck)],
    );
    let differ = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", p(&raw), p(&img)])
        .status()
        .expect("qemu-img must be installed (scripts/setup.sh)");
    assert_eq!(differ.code(), Some(1), "the live image changed");
    s.d.ok(&["unexport", "vm"]);
}

#[test]
fn bad_input_gets_clear_errors_and_loses_nothing() {
    let s = Setup::new("vm", "64M");
    let img = s.file("vm.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let data = content(11, 1 << 20);
    file.write_all_at(&data, 0).unwrap();
    let list = s.json(&["export", "list"]);
    assert_eq!(list[0]["kind"], "fuse", "{list}");
    assert_eq!(list[0]["mountpoint"], p(&s.mnt), "{list}");

    // Mount points that cannot be used.
    s.d.ok(&["volume", "create", "other", "--size", "16M"]);
    s.d.fails(
        &[
            "export",
            "fuse",
            "other",
            "--mountpoint",
            p(&s.path("missing")),
        ],
        "does not exist",
    );
    let full = s.path("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    s.d.fails(
        &["export", "fuse", "other", "--mountpoint", p(&full)],
        "is not empty",
    );
    s.d.fails(
        &[
            "export",
            "fuse",
            "other",
            "--mountpoint",
            p(&full.join("x")),
        ],
        "not a directory",
    );
    s.d.fails(
        &["export", "fuse", "vm", "--mountpoint", p(&s.path("x"))],
        "already exported",
    );
    s.d.fails(
        &["export", "fuse", "nope", "--mountpoint", p(&full)],
        "no volume named",
    );

    // Offsets beyond the end: writes are refused (short at the edge), reads are short.
    let size = 64u64 << 20;
    assert_eq!(errno(file.write_at(b"abc", size)), libc::ENOSPC);
    assert_eq!(file.write_at(&[7u8; 8192], size - 4096).unwrap(), 4096);
    let mut buf = vec![0u8; 8192];
    assert_eq!(file.read_at(&mut buf, size - 4096).unwrap(), 4096);
    assert_eq!(file.read_at(&mut buf, size + 10).unwrap(), 0);
    // Unaligned IO is byte-exact.
    file.write_all_at(b"hello", 12345).unwrap();
    let mut five = [0u8; 5];
    file.read_exact_at(&mut five, 12345).unwrap();
    assert_eq!(&five, b"hello");
    file.write_all_at(&data[12345..12350], 12345).unwrap();

    // Truncate: never shrinks; grows in whole sectors.
    assert_eq!(errno(file.set_len(size / 2)), libc::EPERM);
    assert_eq!(errno(file.set_len(size + 100)), libc::EINVAL);
    file.set_len(size * 2).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size * 2);
    assert_eq!(
        s.json(&["volume", "info", "vm"])["size"].as_u64().unwrap(),
        size * 2
    );

    // The directory belongs to the store.
    assert_eq!(errno(std::fs::remove_file(&img)), libc::EPERM);
    assert_eq!(errno(std::fs::write(s.file("new.img"), b"x")), libc::EPERM);
    assert_eq!(errno(std::fs::rename(&img, s.file("x.img"))), libc::EPERM);

    // A checkpoint file: read-only, and not deleted from under an open reader.
    s.d.ok(&["checkpoint", "create", "vm@c"]);
    let ck = s.file("vm@c.img");
    assert_eq!(
        errno(OpenOptions::new().read(true).write(true).open(&ck)),
        libc::EROFS
    );
    let reader = std::fs::File::open(&ck).unwrap();
    s.d.fails(
        &["checkpoint", "delete", "vm@c"],
        "is open in the FUSE mount",
    );
    // Unexport is refused while a file is open: the mount keeps serving.
    s.d.fails(&["unexport", "vm"], "busy");
    let mut got = vec![0u8; 1 << 20];
    reader.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data, "checkpoint content");
    drop(reader);
    s.d.ok(&["checkpoint", "delete", "vm@c"]);
    assert_eq!(s.listing(), ["vm.img"]);

    // Nothing was lost along the way.
    file.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data, "live content after the bad input");
    file.sync_all().unwrap();
    drop(file);
    s.d.ok(&["unexport", "vm"]);
}

#[test]
fn a_killed_daemon_leaves_no_hanging_mount_and_flushed_data_survives() {
    let mut s = Setup::new("vm", "64M");
    let img = s.file("vm.img");
    let data = content(5, 4 << 20);
    let file = OpenOptions::new().write(true).open(&img).unwrap();
    file.write_all_at(&data, 0).unwrap();
    file.sync_all().unwrap();
    drop(file);
    s.d.kill();

    // The dead mount answers at once (ENOTCONN), it does not hang.
    let mnt = s.mnt.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(&mnt).map_err(|e| e.raw_os_error()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("stat of a dead mount must not hang");
    assert_eq!(r.err(), Some(Some(libc::ENOTCONN)));

    // A new daemon clears the dead mount and mounts the recorded export again by itself;
    // the data is there.
    let d = Daemon::start(&s.dir.path().join("store"));
    assert!(mounted(&s.mnt), "export restored");
    let list = d.ok(&["--json", "export", "list"]);
    assert!(list.contains(p(&s.mnt)), "{list}");
    let got = std::fs::read(&img).unwrap();
    assert!(got[..4 << 20] == data[..], "flushed data after the crash");
    d.ok(&["unexport", "vm"]);
    s.d = d;
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p(path)))
}

#[test]
fn shutdown_unmounts_every_export_even_a_busy_one() {
    let mut s = Setup::new("vm", "16M");
    s.d.ok(&["volume", "create", "busy", "--size", "16M"]);
    let busy_mnt = s.path("busy-mnt");
    std::fs::create_dir(&busy_mnt).unwrap();
    s.d.ok(&["export", "fuse", "busy", "--mountpoint", p(&busy_mnt)]);
    let open = std::fs::File::open(busy_mnt.join("busy.img")).unwrap();
    assert!(mounted(&s.mnt) && mounted(&busy_mnt));
    let st = s.d.terminate();
    assert!(st.success(), "clean exit: {st:?}");
    assert!(!mounted(&s.mnt), "idle export unmounted");
    assert!(!mounted(&busy_mnt), "busy export detached");
    drop(open);
    assert_eq!(std::fs::read_dir(&s.mnt).unwrap().count(), 0);

    // The next daemon serves both exports again; an unexported volume stays unexported.
    let d = Daemon::start(&s.dir.path().join("store"));
    assert!(mounted(&s.mnt) && mounted(&busy_mnt), "exports restored");
    d.ok(&["unexport", "busy"]);
    drop(d);
    let d = Daemon::start(&s.dir.path().join("store"));
    assert!(mounted(&s.mnt) && !mounted(&busy_mnt));
    d.ok(&["unexport", "vm"]);
}
