//! A full store filesystem: the reserve and the low-space state.
//!
//! Data records, the journal and RocksDB share the store's filesystem. When a guest fills it,
//! RocksDB must still be able to commit (and to open after a restart), or the store could not
//! record a delete that would free space, nor shut down cleanly. So the store keeps a
//! **reserve**: `STORE/reserve`, allocated up front: 1/32 of the filesystem, at least 4 MiB
//! and at most [`RESERVE_BYTES`]. The first write that
//! finds the filesystem full (`ENOSPC`) deletes it and puts the store in **low space**:
//!
//! - new data may only go to pages freed inside the segments (reuse); a write that would
//!   grow a segment fails with `Error::NoSpace` (a device IOERR, `ENOSPC` through FUSE) while
//!   the filesystem has less than twice the reserve free, so guests do not eat the room
//!   RocksDB and the journal need;
//! - the committer punches every freed page at once (instead of keeping free runs for
//!   reuse), so a deleted volume or checkpoint gives its space back to the filesystem;
//! - once three reserves' worth is free again, the reserve is allocated again and the store
//!   leaves low space.
//!
//! A store opened on a full filesystem deletes its reserve before RocksDB opens.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest reserve file.
pub const RESERVE_BYTES: u64 = 64 << 20;
const MIN_RESERVE: u64 = 4 << 20;
const FILE: &str = "reserve";

#[derive(Debug)]
pub(crate) struct Reserve {
    path: PathBuf,
    dir: PathBuf,
    /// Size of the reserve.
    bytes: u64,
    low: AtomicBool,
}

/// Bytes an unprivileged writer may still allocate on the filesystem holding `dir`.
fn available(dir: &Path) -> Option<u64> {
    statvfs(dir).map(|st| st.f_bavail * st.f_frsize)
}

/// Size of the filesystem holding `dir`.
fn fs_size(dir: &Path) -> Option<u64> {
    statvfs(dir).map(|st| st.f_blocks * st.f_frsize)
}

fn statvfs(dir: &Path) -> Option<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data: all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st)
}

impl Reserve {
    /// Looks at the store directory `dir` (which exists): a filesystem with less than a
    /// reserve free gives the reserve back now (so RocksDB can open) and starts low on space;
    /// otherwise the reserve is made if it is missing.
    pub fn open(dir: &Path) -> Reserve {
        let bytes = fs_size(dir).map_or(RESERVE_BYTES, |s| {
            (s / 32).clamp(MIN_RESERVE, RESERVE_BYTES)
        });
        let r = Reserve {
            path: dir.join(FILE),
            dir: dir.to_path_buf(),
            bytes,
            low: AtomicBool::new(false),
        };
        match available(dir) {
            Some(a) if a < bytes => r.release(),
            _ => {
                if !r.path.exists() && !r.allocate() {
                    r.low.store(true, Ordering::Relaxed);
                }
            }
        }
        r
    }

    /// Allocates the reserve file; false if the filesystem has no room for it.
    fn allocate(&self) -> bool {
        let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
        else {
            return false;
        };
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid open file descriptor; fallocate touches no memory of ours.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, self.bytes as libc::off_t) };
        if r != 0 {
            drop(f);
            let _ = std::fs::remove_file(&self.path);
            return false;
        }
        let _ = f.sync_all();
        true
    }

    /// Gives the reserve back to the filesystem and enters low space.
    fn release(&self) {
        if !self.low.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.dir.display(),
                "the store's filesystem is full: reserve released; writes that need new space \
                 fail until space is freed (delete a volume or checkpoint)"
            );
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// A write found the filesystem full.
    pub fn on_full(&self) {
        self.release();
    }

    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// While low: whether a segment may grow (twice the reserve is free).
    pub fn may_grow(&self) -> bool {
        !self.is_low() || available(&self.dir).is_some_and(|a| a >= 2 * self.bytes)
    }

    /// While low: leaves low space once three reserves' worth is free and the reserve is
    /// allocated again. Returns whether the store is still low.
    pub fn recover(&self) -> bool {
        if !self.is_low() {
            return false;
        }
        if available(&self.dir).is_some_and(|a| a >= 3 * self.bytes) && self.allocate() {
            self.low.store(false, Ordering::Relaxed);
            tracing::info!(dir = %self.dir.display(), "space freed: reserve allocated again");
            return false;
        }
        true
    }
}
