#![allow(clippy::unwrap_used)]
//! Scenario: a sandbox tree mounted straight from the library (no daemon): POSIX operations
//! through the kernel (files, directories, symlinks, hard links, device nodes, FIFOs, xattrs,
//! rename over targets, unlink while open, sparse files, fallocate, SEEK_DATA), large
//! directories, checkpoint and restore while mounted (the kernel sees the restored tree),
//! a fork mounted next to its source, and a remount that finds everything again.
//!
//! Needs root and /dev/fuse; fails loudly without them.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_engine::{MapRef, Store, StoreOptions, VolumeOptions, TREE_VOLUME_SIZE};
use strata_fuse::tree::TreeMount;
use strata_fuse::FuseOptions;

struct Env {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    /// Serve mounts over FUSE's io_uring queues (else /dev/fuse).
    uring: bool,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open(
                dir.path().join("store"),
                StoreOptions {
                    create: true,
                    ..StoreOptions::default()
                },
            )
            .unwrap(),
        );
        Env {
            dir,
            store,
            uring: true,
        }
    }

    fn create(&self, name: &str) {
        self.store
            .create_volume(
                name,
                TREE_VOLUME_SIZE,
                VolumeOptions {
                    tree: true,
                    ..VolumeOptions::default()
                },
            )
            .unwrap();
    }

    fn mount(&self, name: &str) -> (TreeMount, PathBuf) {
        let mnt = self.dir.path().join(format!("mnt-{name}"));
        let _ = fs::create_dir(&mnt);
        let v = self.store.open_volume(name).unwrap();
        let opts = FuseOptions {
            uring: self.uring,
            ..FuseOptions::default()
        };
        let m = TreeMount::start(v, &self.dir.path().join("store"), &mnt, &opts).unwrap();
        // This kernel has FUSE over io_uring (6.14+): a mount that asks for it and does
        // not get it is a failure, not a silent fallback.
        let want = if self.uring {
            assert!(
                Path::new("/sys/module/fuse/parameters/enable_uring").exists(),
                "the kernel has no FUSE over io_uring (needs Linux 6.14+)"
            );
            "io_uring"
        } else {
            "/dev/fuse"
        };
        assert_eq!(m.transport(), want);
        (m, mnt)
    }
}

fn xattr_set(p: &Path, name: &str, v: &[u8]) -> i32 {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer for the call.
    unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) }
}

fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings and buffer for the call.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn posix_basics_checkpoint_restore_fork_remount() {
    posix_basics(true);
}

/// The same over /dev/fuse, the transport of kernels without FUSE over io_uring.
#[test]
fn posix_basics_over_dev_fuse() {
    posix_basics(false);
}

fn posix_basics(uring: bool) {
    let mut env = Env::new();
    env.uring = uring;
    env.create("box");
    let (mut m, mnt) = env.mount("box");
    let root = fs::metadata(&mnt).unwrap();
    assert!(root.is_dir());
    assert_eq!(root.mode() & 0o7777, 0o755);

    // Files: write, read back, append, overwrite in the middle.
    fs::create_dir_all(mnt.join("src/sub")).unwrap();
    fs::write(mnt.join("src/a.txt"), b"hello world").unwrap();
    assert_eq!(fs::read(mnt.join("src/a.txt")).unwrap(), b"hello world");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("src/a.txt"))
        .unwrap();
    f.write_all(b"!!").unwrap();
    drop(f);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("src/a.txt"))
        .unwrap();
    f.write_at(b"W", 6).unwrap();
    drop(f);
    assert_eq!(fs::read(mnt.join("src/a.txt")).unwrap(), b"hello World!!");

    // A large file across many blocks, read back at odd offsets.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    fs::write(mnt.join("big.bin"), &big).unwrap();
    let mut f = fs::File::open(mnt.join("big.bin")).unwrap();
    f.seek(SeekFrom::Start(123_457)).unwrap();
    let mut part = vec![0u8; 70_001];
    f.read_exact(&mut part).unwrap();
    assert_eq!(part, &big[123_457..123_457 + 70_001]);
    drop(f);

    // Sparse: a hole in the middle reads as zeros; SEEK_DATA skips it.
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(mnt.join("sparse"))
        .unwrap();
    f.write_at(b"start", 0).unwrap();
    f.write_at(b"end", 10 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), (10 << 20) + 3);
    let mut mid = vec![1u8; 4096];
    f.read_at(&mut mid, 5 << 20).unwrap();
    assert!(mid.iter().all(|&b| b == 0));
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd.
    let d = unsafe { libc::lseek(f.as_raw_fd(), 8192, libc::SEEK_DATA) };
    assert_eq!(d, 10 << 20, "SEEK_DATA skips the hole");
    // Punch the start away.
    // SAFETY: valid fd.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    assert_eq!(r, 0);
    let mut s = [1u8; 5];
    f.read_at(&mut s, 0).unwrap();
    assert_eq!(s, [0u8; 5]);
    drop(f);

    // Symlinks, hard links, FIFOs, device nodes.
    std::os::unix::fs::symlink("src/a.txt", mnt.join("link")).unwrap();
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("src/a.txt")
    );
    assert_eq!(fs::read(mnt.join("link")).unwrap(), b"hello World!!");
    fs::hard_link(mnt.join("src/a.txt"), mnt.join("src/sub/hard")).unwrap();
    assert_eq!(fs::metadata(mnt.join("src/a.txt")).unwrap().nlink(), 2);
    let c = CString::new(mnt.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let c = CString::new(mnt.join("null").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, 0);
    let md = fs::metadata(mnt.join("null")).unwrap();
    assert_eq!(md.rdev(), libc::makedev(1, 3));
    fs::write(mnt.join("null"), b"into the void").unwrap();

    // Permissions and ownership.
    fs::set_permissions(mnt.join("src/a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(mnt.join("src/a.txt"), Some(1000), Some(1000)).unwrap();
    let md = fs::metadata(mnt.join("src/a.txt")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o640, 1000, 1000)
    );

    // Extended attributes, security.* included.
    assert_eq!(xattr_set(&mnt.join("src/a.txt"), "user.k", b"v1"), 0);
    assert_eq!(
        xattr_set(&mnt.join("src/a.txt"), "security.selinux", b"ctx"),
        0
    );
    assert_eq!(xattr_get(&mnt.join("src/a.txt"), "user.k").unwrap(), b"v1");
    assert_eq!(
        xattr_get(&mnt.join("src/a.txt"), "security.selinux").unwrap(),
        b"ctx"
    );
    assert!(xattr_get(&mnt.join("src/a.txt"), "user.none").is_none());

    // Rename over an existing file is atomic and replaces it.
    fs::write(mnt.join("x"), b"x").unwrap();
    fs::write(mnt.join("y"), b"y").unwrap();
    fs::rename(mnt.join("x"), mnt.join("y")).unwrap();
    assert!(!mnt.join("x").exists());
    assert_eq!(fs::read(mnt.join("y")).unwrap(), b"x");
    // A directory across parents.
    fs::create_dir(mnt.join("d1")).unwrap();
    fs::write(mnt.join("d1/f"), b"f").unwrap();
    fs::rename(mnt.join("d1"), mnt.join("src/sub/d1")).unwrap();
    assert_eq!(fs::read(mnt.join("src/sub/d1/f")).unwrap(), b"f");
    assert_eq!(fs::metadata(mnt.join("src/sub")).unwrap().nlink(), 3);
    // rmdir of a non-empty directory fails.
    assert_eq!(
        fs::remove_dir(mnt.join("src/sub/d1"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTEMPTY)
    );

    // Unlink while open: the data stays readable through the open file.
    fs::write(mnt.join("tmp"), b"still here").unwrap();
    let mut open = fs::File::open(mnt.join("tmp")).unwrap();
    fs::remove_file(mnt.join("tmp")).unwrap();
    assert!(!mnt.join("tmp").exists());
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    drop(open);

    // Freed inode numbers are reused within a mount, and a reused number never shows the old
    // file's bytes: delete files, make the kernel forget them, create files and grow them.
    fs::create_dir(mnt.join("reuse")).unwrap();
    let mut old_inos = std::collections::HashSet::new();
    for i in 0..50 {
        let p = mnt.join(format!("reuse/old{i}"));
        fs::write(&p, vec![0xa5u8; 8192 + i]).unwrap();
        old_inos.insert(fs::metadata(&p).unwrap().ino());
    }
    for i in 0..50 {
        fs::remove_file(mnt.join(format!("reuse/old{i}"))).unwrap();
    }
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut reused = 0;
    for i in 0..50 {
        let p = mnt.join(format!("reuse/new{i}"));
        let f = fs::File::create(&p).unwrap();
        f.set_len(8192 + 64).unwrap();
        drop(f);
        reused += usize::from(old_inos.contains(&fs::metadata(&p).unwrap().ino()));
        assert!(
            fs::read(&p).unwrap().iter().all(|&b| b == 0),
            "{p:?} shows old bytes"
        );
    }
    assert!(
        reused > 0,
        "no inode number was reused: the check proves nothing"
    );

    // A large directory: 3000 entries, listed exactly once each.
    fs::create_dir(mnt.join("many")).unwrap();
    for i in 0..3000 {
        fs::write(mnt.join(format!("many/file-{i:05}")), i.to_string()).unwrap();
    }
    let listed = names(&mnt.join("many"));
    assert_eq!(listed.len(), 3000);
    assert_eq!(listed[1234], "file-01234");
    assert_eq!(
        fs::read_to_string(mnt.join("many/file-02999")).unwrap(),
        "2999"
    );
    // Names too long.
    let long = mnt.join("n".repeat(256));
    assert_eq!(
        fs::write(&long, b"").unwrap_err().raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );

    // Checkpoint, damage, restore while mounted: the kernel sees the restored tree.
    m.checkpoint(|| env.store.checkpoint("box", "before").unwrap())
        .unwrap();
    let keep = fs::File::open(mnt.join("src")).unwrap(); // a directory handle across it
    fs::remove_dir_all(mnt.join("src")).unwrap();
    fs::remove_dir_all(mnt.join("many")).unwrap();
    fs::write(mnt.join("new-after"), b"new").unwrap();
    assert!(!mnt.join("src").exists());
    m.restore(
        || {
            env.store
                .diff(MapRef::Live("box"), MapRef::Checkpoint("box", "before"))
                .ok()
        },
        || env.store.restore("box", "before").unwrap(),
    )
    .unwrap();
    assert!(!mnt.join("new-after").exists());
    assert_eq!(fs::read(mnt.join("src/a.txt")).unwrap(), b"hello World!!");
    assert_eq!(names(&mnt.join("many")).len(), 3000);
    assert_eq!(
        fs::read(mnt.join("src/sub/hard")).unwrap(),
        b"hello World!!"
    );
    drop(keep);
    // Without the diff (unknown change) the restore drops every cached name instead.
    fs::write(mnt.join("src/a.txt"), b"changed").unwrap();
    fs::remove_dir_all(mnt.join("many")).unwrap();
    fs::remove_file(mnt.join("src/sub/hard")).unwrap();
    assert!(!mnt.join("src/sub/hard").exists()); // a negative entry in the kernel
    m.restore(|| None, || env.store.restore("box", "before").unwrap())
        .unwrap();
    assert_eq!(
        fs::read(mnt.join("src/sub/hard")).unwrap(),
        b"hello World!!"
    );
    assert_eq!(fs::read(mnt.join("src/a.txt")).unwrap(), b"hello World!!");
    assert_eq!(names(&mnt.join("many")).len(), 3000);

    // A fork of the checkpoint, mounted beside the source, writable on its own.
    env.store.fork("box", "before", "box2", false).unwrap();
    let (mut m2, mnt2) = env.mount("box2");
    assert_eq!(fs::read(mnt2.join("src/a.txt")).unwrap(), b"hello World!!");
    fs::write(mnt2.join("src/a.txt"), b"fork").unwrap();
    assert_eq!(fs::read(mnt.join("src/a.txt")).unwrap(), b"hello World!!");
    m2.stop().unwrap();

    // Remount: everything is still there.
    m.stop().unwrap();
    let (mut m, mnt) = env.mount("box");
    assert_eq!(fs::read(mnt.join("src/a.txt")).unwrap(), b"hello World!!");
    assert_eq!(fs::read(mnt.join("big.bin")).unwrap(), big);
    assert_eq!(xattr_get(&mnt.join("src/a.txt"), "user.k").unwrap(), b"v1");
    assert_eq!(names(&mnt.join("many")).len(), 3000);
    assert_eq!(
        fs::read_link(mnt.join("link")).unwrap(),
        Path::new("src/a.txt")
    );
    m.stop().unwrap();
}

/// Damaged metadata (a directory bucket that does not decode, an inode claiming 4 GiB of
/// xattrs) is an IO error for the operations that touch it — never a panic, a huge
/// allocation or wrong data — and the rest of the tree keeps working.
#[test]
fn damaged_metadata_is_an_error_not_a_panic() {
    let env = Env::new();
    env.create("dmg");
    let (mut m, mnt) = env.mount("dmg");
    fs::create_dir(mnt.join("d1")).unwrap();
    fs::write(mnt.join("d1/f"), b"f").unwrap();
    fs::write(mnt.join("x"), b"x").unwrap();
    let x_ino = fs::metadata(mnt.join("x")).unwrap().ino();
    let d1_ino = fs::metadata(mnt.join("d1")).unwrap().ino();
    m.stop().unwrap();

    let v = env.store.open_volume("dmg").unwrap();
    // d1's only bucket: the first mapped block of its content span.
    let span = (1u64 << 61) + d1_ino * (1u64 << 37);
    let bucket = v.next_data(span).unwrap();
    let mut bad = vec![0u8; 4096];
    bad[0] = 200; // 200 entries: more than a block holds
    v.write_blocks(&[(bucket - bucket % 4096, &bad)]).unwrap();
    // x's inode claims 4 GiB of xattrs (xattr_len at byte 96 of the 256-byte slot).
    let slot = (1u64 << 40) + x_ino * 256;
    let blk = slot - slot % 4096;
    let mut b = vec![0u8; 4096];
    v.read_bytes(blk, &mut b).unwrap();
    let at = (slot - blk) as usize + 96;
    b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    v.write_blocks(&[(blk, &b)]).unwrap();
    drop(v);

    let (mut m, mnt) = env.mount("dmg");
    let e = fs::read_dir(mnt.join("d1")).and_then(|d| d.collect::<Result<Vec<_>, _>>());
    assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(
        fs::metadata(mnt.join("d1/f")).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(xattr_get(&mnt.join("x"), "user.k").is_none());
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EIO)
    );
    // Everything else still works.
    assert_eq!(fs::read(mnt.join("x")).unwrap(), b"x");
    fs::write(mnt.join("y"), b"y").unwrap();
    assert_eq!(names(&mnt), vec!["d1", "x", "y"]);
    m.stop().unwrap();
}

/// What a crash can leave behind now that metadata is written in groups after the data:
/// bytes mapped past a file's recorded end (a write whose size change, or whose file's
/// create, was lost). Growing the file over them — truncate, a write past the end, an
/// extending fallocate — must show zeros there, never those bytes.
#[test]
fn bytes_past_the_end_never_show_when_a_file_grows() {
    let env = Env::new();
    env.create("eof");
    let (mut m, mnt) = env.mount("eof");
    let names = ["truncated", "written", "allocated"];
    let mut inos = Vec::new();
    for n in names {
        fs::write(mnt.join(n), b"0123456789").unwrap();
        inos.push(fs::metadata(mnt.join(n)).unwrap().ino());
    }
    m.stop().unwrap();

    let v = env.store.open_volume("eof").unwrap();
    for ino in &inos {
        let content = (1u64 << 61) + ino * (1u64 << 37);
        v.write_bytes(content + 10, &[0xAB; 30_000]).unwrap();
    }
    drop(v);

    let (mut m, mnt) = env.mount("eof");
    let open = |n: &str| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join(n))
            .unwrap()
    };
    open("truncated").set_len(20_000).unwrap();
    open("written").write_all_at(b"x", 15_000).unwrap();
    let f = open("allocated");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: `fd` is open for the call; mode 0 extends the file.
    let r = unsafe { libc::fallocate(fd, 0, 0, 25_000) };
    assert_eq!(r, 0);
    drop(f);
    for (n, len, x) in [
        ("truncated", 20_000, None),
        ("written", 15_001, Some(15_000)),
        ("allocated", 25_000, None),
    ] {
        let b = fs::read(mnt.join(n)).unwrap();
        assert_eq!(b.len(), len, "{n}");
        assert_eq!(&b[..10], b"0123456789", "{n}");
        for (i, &c) in b.iter().enumerate().skip(10) {
            let want = if Some(i) == x { b'x' } else { 0 };
            assert_eq!(c, want, "{n}: byte {i} shows what lay past the old end");
        }
    }
    m.stop().unwrap();
}

/// A stopped mount and a dropped handle have let go of their volume when the call returns:
/// the caller can delete, restore or mount it again at once, and nothing of the tree is
/// written after that (their serving and committing threads are done with it).
#[test]
fn a_closed_tree_lets_go_of_its_volume_at_once() {
    let env = Env::new();
    let src = env.dir.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..20 {
        fs::write(src.join("d").join(format!("f{i}")), vec![i as u8; 5000]).unwrap();
    }
    for round in 0..10 {
        let name = format!("m{round}");
        env.create(&name);
        let (mut m, mnt) = env.mount(&name);
        fs::write(mnt.join("new"), b"x").unwrap();
        m.stop().unwrap();
        drop(m);
        env.store.delete_volume(&name).unwrap();

        let name = format!("h{round}");
        env.create(&name);
        let open = || {
            strata_fuse::tree::TreeHandle::open(
                env.store.open_volume(&name).unwrap(),
                &env.dir.path().join("store"),
            )
            .unwrap()
        };
        drop(open()); // formats the tree
        env.store.checkpoint(&name, "empty").unwrap();
        let h = open();
        h.import(&src, &std::sync::atomic::AtomicU64::new(0))
            .unwrap();
        drop(h);
        // Restored right after the handle closed: nothing the handle staged may land on
        // top of the restored tree.
        env.store.restore(&name, "empty").unwrap();
        let (mut m, mnt) = env.mount(&name);
        assert!(names(&mnt).is_empty(), "round {round}: {:?}", names(&mnt));
        m.stop().unwrap();
        drop(m);
        env.store.delete_volume(&name).unwrap();
    }
}
