//! Serves a Strata volume and its checkpoints as image files over FUSE.
//!
//! A mount holds one volume: `VOL.img` is the live volume (read-write unless the export is
//! read-only) and `VOL@CKPT.img` is each checkpoint, read-only. The directory is listed live
//! from the store, so checkpoints taken or deleted after mounting show up at once. File
//! operations map onto the engine: read and write (at any byte offset), `fsync` → flush,
//! `fallocate` punch-hole and zero-range → unmap, `SEEK_DATA`/`SEEK_HOLE` from the extent
//! map, `truncate` to grow. `docs/fuse.md` has the user's view.

mod fs;
mod prefetch;
pub mod tree;

use fs::ImageFs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use strata_engine::{Store, Volume};

pub use fs::{CHECKPOINT_INO_BASE, ROOT_INO, VOLUME_INO};

/// How a volume is served.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Refuse writes to the live volume's file too.
    pub read_only: bool,
    /// Threads reading requests from the kernel, each with its own `/dev/fuse` clone.
    pub threads: usize,
    /// Let users other than the daemon's access the mount (`allow_other`); permissions are
    /// still checked by the kernel (`default_permissions`).
    pub allow_other: bool,
    /// Serve tree mounts over FUSE's io_uring queues when the kernel has them (Linux 6.14+;
    /// the `fuse.enable_uring` parameter is turned on if it is off). Default: on, unless
    /// the environment has `STRATA_FUSE_URING=0`.
    pub uring: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            read_only: false,
            threads: 4,
            allow_other: false,
            uring: !matches!(
                std::env::var("STRATA_FUSE_URING").as_deref(),
                Ok("0" | "off" | "no" | "false")
            ),
        }
    }
}

/// Why an export could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("mount point {0} does not exist")]
    NoMountpoint(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mount point {0} is not empty")]
    NotEmpty(PathBuf),
    #[error("mount point {0} is busy (a file in it is open or loop-mounted); close it and retry")]
    Busy(PathBuf),
    #[error("mount point {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Unmount attempts 20 ms apart (one second) while the kernel reports the mount busy: what a
/// file closed just before holds until its RELEASE is answered.
const BUSY_RETRIES: u32 = 50;
/// How long an unmount waits for the kernel to end the session before taking the
/// filesystem to be mounted elsewhere too.
const SESSION_END_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until thread `t` has finished or `deadline` has passed; whether it finished.
pub(crate) fn finished_by<T>(t: &std::thread::JoinHandle<T>, deadline: std::time::Instant) -> bool {
    while !t.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    t.is_finished()
}

/// A mounted FUSE session: mounting, unmounting and detaching shared by the image-file
/// export and tree mounts. Dropping it without stopping detaches the mount lazily.
#[derive(Debug)]
pub(crate) struct MountSession {
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    what: &'static str,
}

impl MountSession {
    /// Mounts `fs` for `volume` at `mountpoint` (an existing empty directory; `checked` is
    /// its canonical path from [`prepare_mountpoint`]) with the options every Strata mount
    /// has plus `extra`, served by `opts.threads` threads on `/dev/fuse` clones. `on_init`
    /// runs once the kernel's `INIT` is answered, before those threads start.
    pub(crate) fn start<FS: fuser::Filesystem + Send + Sync + 'static>(
        fs: FS,
        volume: &str,
        checked: PathBuf,
        opts: &FuseOptions,
        extra: Vec<fuser::MountOption>,
        what: &'static str,
        on_init: impl FnOnce(&fuser::Session<FS>),
    ) -> Result<(MountSession, fuser::Notifier), FuseError> {
        let mountpoint = checked;
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("strata:{volume}")),
            fuser::MountOption::Subtype("strata".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
        ];
        config.mount_options.extend(extra);
        if opts.read_only {
            config.mount_options.push(fuser::MountOption::RO);
        }
        if opts.allow_other {
            config.acl = fuser::SessionACL::All;
        }
        config.n_threads = Some(opts.threads.clamp(1, 64));
        config.clone_fd = true;
        let io = |source| FuseError::Io {
            path: mountpoint.clone(),
            source,
        };
        let session = fuser::Session::new(fs, &mountpoint, &config).map_err(io)?;
        on_init(&session);
        let session = session.spawn().map_err(io)?;
        let notifier = session.notifier();
        tracing::info!(volume = %volume, mountpoint = %mountpoint.display(), "{what} mounted");
        Ok((
            MountSession {
                mountpoint,
                session: Some(session),
                what,
            },
            notifier,
        ))
    }

    pub(crate) fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the serving threads. Refused with [`FuseError::Busy`] while a
    /// file in the mount is open (or loop-mounted, or a working directory): it keeps serving.
    /// Returns whether the session ended: it does not while the filesystem is still mounted
    /// elsewhere (a bind mount of the mountpoint, maybe in another mount namespace, such as
    /// a container's root); its threads then go on serving that mount and end with it.
    pub(crate) fn stop(&mut self) -> Result<bool, FuseError> {
        if self.session.is_none() {
            return Ok(true);
        }
        let dev = mounts()
            .into_iter()
            .find(|m| m.mountpoint == self.mountpoint)
            .map(|m| m.dev);
        // A file closed just before holds the mount until the serving threads answer its
        // RELEASE (the kernel sends it in the background): retry for a moment before
        // calling the mount busy.
        let mut tries = 0;
        let unmounted = loop {
            match unmount(&self.mountpoint, 0) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < BUSY_RETRIES => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r,
            }
        };
        unmounted.map_err(|source| {
            if source.raw_os_error() == Some(libc::EBUSY) {
                FuseError::Busy(self.mountpoint.clone())
            } else {
                FuseError::Io {
                    path: self.mountpoint.clone(),
                    source,
                }
            }
        })?;
        // Bind mounts in this namespace show at once; those in others only by the session
        // not ending.
        let bound = dev.is_some_and(|d| mounts().iter().any(|m| m.dev == d));
        let ended = self.session.take().is_none_or(|s| self.end(s, bound));
        tracing::info!(mountpoint = %self.mountpoint.display(), "{} unmounted", self.what);
        Ok(ended)
    }

    /// Waits (up to [`SESSION_END_WAIT`]) for a session whose mountpoint was unmounted to
    /// end; one still mounted elsewhere (`bound`: known to be) is left running.
    fn end(&self, s: fuser::BackgroundSession, bound: bool) -> bool {
        let wait = if bound {
            std::time::Duration::ZERO
        } else {
            SESSION_END_WAIT
        };
        if !finished_by(&s.guard, std::time::Instant::now() + wait) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "{} is still mounted elsewhere (a bind mount): it is served until that mount goes", self.what);
            std::mem::forget(s);
            return false;
        }
        if let Err(e) = s.join() {
            tracing::warn!(error = %e, "FUSE session ended with an error");
        }
        true
    }

    /// Unmounts even when busy (a lazy detach: open files keep working until closed, new
    /// opens see the directory underneath). For daemon shutdown.
    pub(crate) fn detach(mut self) {
        if self.session.is_none() {
            return;
        }
        match unmount(&self.mountpoint, 0) {
            Ok(()) => {
                if let Some(s) = self.session.take() {
                    self.end(s, false);
                }
            }
            Err(_) => {
                if let Err(e) = unmount(&self.mountpoint, libc::MNT_DETACH) {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "detaching the FUSE mount");
                }
                // The serving threads end when the last open file closes; the process does
                // not wait for them.
                if let Some(s) = self.session.take() {
                    std::mem::forget(s);
                }
            }
        }
    }
}

impl Drop for MountSession {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = unmount(&self.mountpoint, libc::MNT_DETACH);
            std::mem::forget(s);
        }
    }
}

/// Checks that `p` is an existing empty directory; returns its canonical path.
pub(crate) fn prepare_mountpoint(p: &Path) -> Result<PathBuf, FuseError> {
    check_mountpoint(p)?;
    p.canonicalize().map_err(|source| FuseError::Io {
        path: p.to_path_buf(),
        source,
    })
}

/// A running FUSE export. [`FuseExport::stop`] unmounts it; dropping it without stopping
/// detaches the mount lazily.
#[derive(Debug)]
pub struct FuseExport {
    fs: Arc<fs::Shared>,
    mount: MountSession,
    notifier: fuser::Notifier,
}

impl FuseExport {
    /// Mounts `volume` (and `store`'s checkpoints of it) at `mountpoint`, which must be an
    /// existing empty directory. The store is held weakly: the export never keeps a stopped
    /// daemon's store open.
    pub fn start(
        store: Weak<Store>,
        volume: Volume,
        mountpoint: &Path,
        opts: &FuseOptions,
    ) -> Result<FuseExport, FuseError> {
        let checked = prepare_mountpoint(mountpoint)?;
        let name = volume.name().to_string();
        let shared = Arc::new(fs::Shared::new(store, volume, opts.read_only));
        shared.start_readahead();
        let extra = vec![fuser::MountOption::NoDev, fuser::MountOption::NoSuid];
        let (mount, notifier) = MountSession::start(
            ImageFs::new(shared.clone()),
            &name,
            checked,
            opts,
            extra,
            "FUSE export",
            |_| {},
        )?;
        Ok(FuseExport {
            fs: shared,
            mount,
            notifier,
        })
    }

    pub fn mountpoint(&self) -> &Path {
        self.mount.mountpoint()
    }

    /// The volume's IO statistics and limits (`VOL.img` and the checkpoint files count).
    pub fn io(&self) -> &std::sync::Arc<strata_engine::qos::VolumeIo> {
        self.fs.vol.io()
    }

    /// Call after the live volume's content or size changed behind the mount (a restore):
    /// drops the kernel's cached pages and attributes of `VOL.img`.
    pub fn volume_changed(&self) {
        self.fs.touch();
        self.invalidate(VOLUME_INO);
    }

    /// Call after a checkpoint of the volume was taken or deleted: the directory is listed
    /// again, and a deleted checkpoint's name stops resolving.
    pub fn checkpoints_changed(&self, deleted: Option<&str>) {
        self.invalidate(ROOT_INO);
        if let Some(ck) = deleted {
            let name = fs::checkpoint_file_name(self.fs.volume_name(), ck);
            if let Err(e) = self
                .notifier
                .inval_entry(fuser::INodeNo(ROOT_INO), name.as_ref())
            {
                tracing::debug!(error = %e, "invalidating a deleted checkpoint's entry");
            }
        }
    }

    /// True while a file of checkpoint `ck` is open in the mount: deleting the checkpoint
    /// then would pull its blocks from under the reader.
    pub fn checkpoint_open(&self, ck: &str) -> bool {
        self.fs.checkpoint_open(ck)
    }

    fn invalidate(&self, ino: u64) {
        // ENOENT means the kernel holds nothing for the inode: nothing to drop.
        if let Err(e) = self.notifier.inval_inode(fuser::INodeNo(ino), 0, 0) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(ino, error = %e, "invalidating the kernel's cache");
            }
        }
    }

    /// Unmounts and waits for the serving threads. Refused with [`FuseError::Busy`] while a
    /// file in the mount is open (or loop-mounted): the export then keeps serving.
    pub fn stop(&mut self) -> Result<(), FuseError> {
        self.mount.stop().map(|_| ())
    }

    /// Unmounts even when busy (a lazy detach: open files keep working until closed, new
    /// opens see the directory underneath). For daemon shutdown.
    pub fn detach(self) {
        self.mount.detach()
    }
}

fn check_mountpoint(p: &Path) -> Result<(), FuseError> {
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FuseError::NoMountpoint(p.to_path_buf()))
        }
        Err(source) => {
            return Err(FuseError::Io {
                path: p.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(FuseError::NotADirectory(p.to_path_buf()));
    }
    let mut entries = std::fs::read_dir(p).map_err(|source| FuseError::Io {
        path: p.to_path_buf(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(FuseError::NotEmpty(p.to_path_buf()));
    }
    Ok(())
}

fn unmount(p: &Path, flags: i32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One line of `/proc/self/mountinfo`: device, mount point, filesystem type, source.
struct MountInfo {
    /// `major:minor` of the filesystem (one per FUSE connection).
    dev: String,
    mountpoint: PathBuf,
    fstype: String,
    source: String,
}

fn mounts() -> Vec<MountInfo> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            // id parent maj:min root mountpoint opts [optional...] - fstype source opts
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split(' ');
            let l: Vec<&str> = left.split(' ').collect();
            Some(MountInfo {
                dev: l.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape_mountinfo(l.get(4)?)),
                fstype: r.next()?.to_string(),
                source: r.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Lazily unmounts Strata FUSE mounts whose daemon died (their mount point answers
/// `ENOTCONN`), so a crash leaves no dead mount behind once a daemon starts again. Live
/// mounts, of this store or another, are left alone. Returns the mount points cleaned.
pub fn clean_dead_mounts() -> Vec<PathBuf> {
    let mut cleaned = Vec::new();
    for m in mounts() {
        // Ours: fstype fuse (or fuse.strata where the subtype is applied), source strata:VOL.
        if !matches!(m.fstype.as_str(), "fuse" | "fuse.strata") || !m.source.starts_with("strata:")
        {
            continue;
        }
        if let Err(e) = std::fs::metadata(&m.mountpoint) {
            if e.raw_os_error() == Some(libc::ENOTCONN)
                && unmount(&m.mountpoint, libc::MNT_DETACH).is_ok()
            {
                tracing::warn!(mountpoint = %m.mountpoint.display(), "unmounted a dead FUSE export left by a crashed daemon");
                cleaned.push(m.mountpoint);
            }
        }
    }
    cleaned
}

/// Lazily unmounts every mount at or below `dir`, deepest first, whatever it is: for tests
/// and benchmarks clearing up after a server they killed (a dead FUSE mount cannot be
/// removed otherwise). Returns the mount points detached.
pub fn detach_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.retain(|p| unmount(p, libc::MNT_DETACH).is_ok());
    points
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
