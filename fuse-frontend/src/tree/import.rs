//! `strata fs import TREE DIR`: copies a directory tree into a tree volume, keeping what a
//! root filesystem needs — file types (regular, directory, symlink, device nodes, FIFOs,
//! sockets), permission bits including set-id and sticky, owners, access and modification
//! times, extended attributes, hard links, and holes (copied with SEEK_DATA/SEEK_HOLE, so a
//! sparse file stays sparse). Symlinks are copied, never followed. Any entry that cannot be
//! read fails the import with its path: nothing is skipped silently.

use super::core::{Core, NewNode, SetAttr};
use super::format::{Ts, ROOT_INO};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// What an import copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Device nodes, FIFOs and sockets.
    pub special: u64,
    pub hard_links: u64,
    /// File bytes copied (holes not counted).
    pub bytes: u64,
}

/// Bytes of regular files under `src` (the progress total).
pub fn total_bytes(src: &Path) -> Result<u64, String> {
    let mut total = 0;
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let e = e.map_err(|e| format!("{}: {e}", d.display()))?;
            let m = e
                .path()
                .symlink_metadata()
                .map_err(|err| format!("{}: {err}", e.path().display()))?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    Ok(total)
}

fn errno(path: &Path, what: &str, e: fuser::Errno) -> String {
    let code = i32::from(e);
    format!(
        "{}: {what}: {}",
        path.display(),
        std::io::Error::from_raw_os_error(code)
    )
}

fn ts(sec: i64, nsec: i64) -> Ts {
    Ts {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

/// (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn xattrs(path: &Path) -> Result<Xattrs, String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let err = |what: &str| {
        format!(
            "{}: {what}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )
    };
    // SAFETY: `c` is a valid C string; a null buffer with size 0 asks for the size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        // A filesystem without xattrs has none to copy.
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(Vec::new());
        }
        return Err(err("listing xattrs"));
    }
    let mut names = vec![0u8; n as usize];
    // SAFETY: the buffer is `names.len()` bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(err("listing xattrs"));
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).map_err(|e| e.to_string())?;
        let mut v = vec![0u8; 65536];
        // SAFETY: valid C strings; the buffer is `v.len()` bytes.
        let r = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if r < 0 {
            return Err(err("reading an xattr"));
        }
        v.truncate(r as usize);
        out.push((name.to_vec(), v));
    }
    Ok(out)
}

/// Copies a regular file's data regions (holes stay holes).
fn copy_data(
    core: &Core,
    ino: u64,
    path: &Path,
    size: u64,
    done: &AtomicU64,
) -> Result<u64, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let fd = f.as_raw_fd();
    let mut copied = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut at: u64 = 0;
    while at < size {
        // SAFETY: `fd` is open for the duration of the call.
        let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, (hole.max(data) as u64).min(size));
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], off)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            core.write(ino, off, &buf[..n], None)
                .map_err(|e| errno(path, "writing", e))?;
            off += n as u64;
            copied += n as u64;
            done.fetch_add(n as u64, Ordering::Relaxed);
        }
        at = end.max(start + 1);
    }
    Ok(copied)
}

/// Copies the contents of `src` into the tree's root (like `cp -a src/. TREE/`); the root
/// takes `src`'s mode, owner, times and xattrs. Names already in the tree are refused
/// (EEXIST), nothing is overwritten.
pub fn import_dir(core: &Core, src: &Path, done: &AtomicU64) -> Result<ImportStats, String> {
    let mut stats = ImportStats::default();
    let mut links: HashMap<(u64, u64), u64> = HashMap::new();
    // Directories get their times last (adding entries changes them).
    let mut dir_times: Vec<(u64, std::fs::Metadata, std::path::PathBuf)> = Vec::new();
    let root_meta = src
        .symlink_metadata()
        .map_err(|e| format!("{}: {e}", src.display()))?;
    if !root_meta.is_dir() {
        return Err(format!("{} is not a directory", src.display()));
    }
    let mut stack = vec![(src.to_path_buf(), ROOT_INO)];
    dir_times.push((ROOT_INO, root_meta, src.to_path_buf()));
    while let Some((dir, parent)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let name = e.file_name();
            let m = path
                .symlink_metadata()
                .map_err(|err| format!("{}: {err}", path.display()))?;
            let ft = m.file_type();
            if !ft.is_dir() && m.nlink() > 1 {
                if let Some(&ino) = links.get(&(m.dev(), m.ino())) {
                    core.link(ino, parent, name.as_bytes())
                        .map_err(|er| errno(&path, "linking", er))?;
                    stats.hard_links += 1;
                    continue;
                }
            }
            let target = if ft.is_symlink() {
                Some(
                    std::fs::read_link(&path)
                        .map_err(|err| format!("{}: {err}", path.display()))?
                        .into_os_string()
                        .into_vec(),
                )
            } else {
                None
            };
            let node = NewNode {
                mode: m.mode(),
                umask: 0,
                rdev: m.rdev(),
                uid: m.uid(),
                gid: m.gid(),
                target: target.as_deref(),
            };
            let (ino, _) = core
                .create(parent, name.as_bytes(), node)
                .map_err(|er| errno(&path, "creating", er))?;
            if ft.is_file() {
                stats.files += 1;
                stats.bytes += copy_data(core, ino, &path, m.len(), done)?;
            } else if ft.is_dir() {
                stats.dirs += 1;
                stack.push((path.clone(), ino));
            } else if ft.is_symlink() {
                stats.symlinks += 1;
            } else {
                stats.special += 1;
            }
            if !ft.is_dir() && m.nlink() > 1 {
                links.insert((m.dev(), m.ino()), ino);
            }
            for (n, v) in xattrs(&path)? {
                core.setxattr(ino, &n, Some(&v), 0)
                    .map_err(|er| errno(&path, "setting an xattr", er))?;
            }
            if ft.is_dir() {
                dir_times.push((ino, m, path));
            } else {
                finish(core, ino, &m, &path, ft.is_file())?;
            }
        }
    }
    for (n, v) in xattrs(src)? {
        core.setxattr(ROOT_INO, &n, Some(&v), 0)
            .map_err(|er| errno(src, "setting an xattr", er))?;
    }
    // Deepest directories were pushed last: set their times first.
    for (ino, m, path) in dir_times.iter().rev() {
        finish(core, *ino, m, path, false)?;
    }
    Ok(stats)
}

/// Owner, permission bits (set-id included), size (trailing holes) and times.
fn finish(
    core: &Core,
    ino: u64,
    m: &std::fs::Metadata,
    path: &Path,
    file: bool,
) -> Result<(), String> {
    let a = SetAttr {
        // A symlink's mode is always 0777.
        mode: if m.file_type().is_symlink() {
            None
        } else {
            Some(m.mode() & 0o7777)
        },
        uid: Some(m.uid()),
        gid: Some(m.gid()),
        size: file.then_some(m.len()),
        atime: Some(Some(ts(m.atime(), m.atime_nsec()))),
        mtime: Some(Some(ts(m.mtime(), m.mtime_nsec()))),
        kill_setid: None,
    };
    core.setattr(ino, &a)
        .map(|_| ())
        .map_err(|e| errno(path, "setting attributes", e))
}
