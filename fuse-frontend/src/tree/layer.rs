//! Applying a container image layer (an uncompressed tar stream, as the OCI image spec
//! defines a layer changeset) onto a tree: entries are added or replace what the tree
//! holds, `.wh.NAME` whiteouts delete `NAME`, and a `.wh..wh..opq` opaque marker hides
//! everything the lower layers had in its directory. Regular files, directories, symlinks,
//! hard links, character and block devices and FIFOs keep their mode (set-id and sticky
//! bits included), owner, modification time and `SCHILY.xattr.*` extended attributes.
//!
//! A path that climbs out of the tree (`..`), a hard link to a missing or directory target,
//! or a tar that does not parse (truncated, damaged) fails the layer with the entry's path;
//! the caller undoes a failed layer (the image import restores the previous checkpoint).

use super::core::{Core, NewNode, SetAttr};
use super::format::{Ts, ROOT_INO};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a layer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Device nodes and FIFOs.
    pub special: u64,
    pub hard_links: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// File bytes written.
    pub bytes: u64,
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

fn err(path: &Path, what: &str, e: fuser::Errno) -> String {
    format!(
        "{}: {what}: {}",
        path.display(),
        std::io::Error::from_raw_os_error(i32::from(e))
    )
}

/// The path's names, with `.` dropped; `None` when it leaves the tree.
fn names(path: &Path) -> Option<Vec<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.as_bytes().to_vec()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

struct Applier<'a> {
    core: &'a Core,
    /// Inodes this layer created or changed (an opaque marker keeps them).
    touched: HashSet<u64>,
    /// Directory times, set last (adding entries changes them).
    dir_times: Vec<(u64, Ts)>,
    stats: LayerStats,
}

impl Applier<'_> {
    /// The inode of directory `dirs` (created as root-owned 0755 where missing).
    fn dir(&mut self, path: &Path, dirs: &[Vec<u8>]) -> Result<u64, String> {
        let mut at = ROOT_INO;
        for d in dirs {
            at = match self.core.lookup(at, d) {
                Ok((ino, i)) if i.is_dir() => ino,
                Ok(_) => {
                    return Err(err(
                        path,
                        "a parent is not a directory",
                        fuser::Errno::ENOTDIR,
                    ))
                }
                Err(fuser::Errno::ENOENT) => {
                    let n = NewNode {
                        mode: libc::S_IFDIR | 0o755,
                        umask: 0,
                        rdev: 0,
                        uid: 0,
                        gid: 0,
                        target: None,
                    };
                    let (ino, _) = self
                        .core
                        .create(at, d, n)
                        .map_err(|e| err(path, "creating a parent directory", e))?;
                    self.touched.insert(ino);
                    ino
                }
                Err(e) => return Err(err(path, "looking up a parent", e)),
            };
        }
        Ok(at)
    }

    /// Removes `name` from `parent`, a directory with everything under it.
    fn remove(&mut self, path: &Path, parent: u64, name: &[u8]) -> Result<(), String> {
        let (ino, i) = match self.core.lookup(parent, name) {
            Ok(x) => x,
            Err(fuser::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(err(path, "looking up", e)),
        };
        if i.is_dir() {
            for child in self.children(path, ino)? {
                self.remove(path, ino, &child)?;
            }
        }
        self.core
            .remove(parent, name, i.is_dir())
            .map_err(|e| err(path, "removing", e))
    }

    fn children(&self, path: &Path, dir: u64) -> Result<Vec<Vec<u8>>, String> {
        let mut names = Vec::new();
        self.core
            .readdir(dir, 0, false, |e, _| {
                if e.name != b"." && e.name != b".." {
                    names.push(e.name.clone());
                }
                false
            })
            .map_err(|e| err(path, "listing", e))?;
        Ok(names)
    }

    fn entry<R: Read>(
        &mut self,
        mut e: tar::Entry<'_, R>,
        links: &mut HashMap<Vec<Vec<u8>>, u64>,
        done: &AtomicU64,
    ) -> Result<(), String> {
        let path = e
            .path()
            .map_err(|er| format!("a tar entry's path: {er}"))?
            .into_owned();
        let parts = names(&path).ok_or_else(|| format!("{}: leaves the tree", path.display()))?;
        let Some((name, dirs)) = parts.split_last() else {
            // The root itself: its metadata.
            if e.header().entry_type().is_dir() {
                self.finish(&path, ROOT_INO, &e, false)?;
            }
            return Ok(());
        };
        let parent = self.dir(&path, dirs)?;
        if name.as_slice() == OPAQUE.as_bytes() {
            for child in self.children(&path, parent)? {
                if let Ok((ino, _)) = self.core.lookup(parent, &child) {
                    if !self.touched.contains(&ino) {
                        self.remove(&path, parent, &child)?;
                    }
                }
            }
            self.stats.whiteouts += 1;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT.as_bytes()) {
            self.remove(&path, parent, hidden)?;
            self.stats.whiteouts += 1;
            return Ok(());
        }
        let kind = e.header().entry_type();
        let existing = match self.core.lookup(parent, name) {
            Ok(x) => Some(x),
            Err(fuser::Errno::ENOENT) => None,
            Err(er) => return Err(err(&path, "looking up", er)),
        };
        // A directory over a directory keeps its entries; anything else replaces.
        if let Some((ino, i)) = existing {
            if kind.is_dir() && i.is_dir() {
                self.touched.insert(ino);
                self.xattrs(&path, ino, &mut e)?;
                return self.finish(&path, ino, &e, false);
            }
            self.remove(&path, parent, name)?;
        }
        if kind.is_hard_link() {
            let target = e
                .link_name()
                .map_err(|er| format!("{}: link target: {er}", path.display()))?
                .ok_or_else(|| format!("{}: hard link without a target", path.display()))?;
            let tparts = names(&target)
                .ok_or_else(|| format!("{}: link target leaves the tree", path.display()))?;
            let ino = match links.get(&tparts) {
                Some(&ino) => ino,
                None => {
                    let (tname, tdirs) = tparts
                        .split_last()
                        .ok_or_else(|| format!("{}: hard link to the root", path.display()))?;
                    let tparent = self.dir(&target, tdirs)?;
                    let (ino, i) = self
                        .core
                        .lookup(tparent, tname)
                        .map_err(|er| err(&target, "hard link target", er))?;
                    if i.is_dir() {
                        return Err(format!("{}: hard link to a directory", path.display()));
                    }
                    ino
                }
            };
            self.core
                .link(ino, parent, name)
                .map_err(|er| err(&path, "linking", er))?;
            self.touched.insert(ino);
            self.stats.hard_links += 1;
            return Ok(());
        }
        let h = e.header();
        let perm = h
            .mode()
            .map_err(|er| format!("{}: mode: {er}", path.display()))?
            & 0o7777;
        let (typ, rdev) = match kind {
            k if k.is_dir() => (libc::S_IFDIR, 0),
            k if k.is_symlink() => (libc::S_IFLNK, 0),
            k if k.is_character_special() || k.is_block_special() => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let t = if k.is_character_special() {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                (t, libc::makedev(major, minor))
            }
            k if k.is_fifo() => (libc::S_IFIFO, 0),
            k if k.is_file() || k == tar::EntryType::Continuous || k.is_gnu_sparse() => {
                (libc::S_IFREG, 0)
            }
            // PAX and GNU long-name headers are read by the tar reader; anything else
            // (a socket has no tar type) has no place in a root filesystem.
            other => {
                return Err(format!(
                    "{}: unsupported tar entry type {other:?}",
                    path.display()
                ))
            }
        };
        let target = if typ == libc::S_IFLNK {
            Some(
                e.link_name_bytes()
                    .ok_or_else(|| format!("{}: symlink without a target", path.display()))?
                    .into_owned(),
            )
        } else {
            None
        };
        let n = NewNode {
            mode: typ | perm,
            umask: 0,
            rdev,
            uid: 0,
            gid: 0,
            target: target.as_deref(),
        };
        let (ino, _) = self
            .core
            .create(parent, name, n)
            .map_err(|er| err(&path, "creating", er))?;
        self.touched.insert(ino);
        if typ == libc::S_IFREG {
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            loop {
                let n = e
                    .read(&mut buf)
                    .map_err(|er| format!("{}: reading its data: {er}", path.display()))?;
                if n == 0 {
                    break;
                }
                self.core
                    .write(ino, off, &buf[..n], None)
                    .map_err(|er| err(&path, "writing", er))?;
                off += n as u64;
                done.fetch_add(n as u64, Ordering::Relaxed);
            }
            let want = e.size();
            if off != want {
                return Err(format!(
                    "{}: the layer ends inside this file ({off} of {want} bytes)",
                    path.display()
                ));
            }
            self.stats.files += 1;
            self.stats.bytes += off;
            links.insert(parts.clone(), ino);
        } else if typ == libc::S_IFDIR {
            self.stats.dirs += 1;
        } else if typ == libc::S_IFLNK {
            self.stats.symlinks += 1;
        } else {
            self.stats.special += 1;
            links.insert(parts.clone(), ino);
        }
        self.xattrs(&path, ino, &mut e)?;
        self.finish(&path, ino, &e, typ == libc::S_IFLNK)
    }

    fn xattrs<R: Read>(
        &mut self,
        path: &Path,
        ino: u64,
        e: &mut tar::Entry<'_, R>,
    ) -> Result<(), String> {
        let Some(exts) = e
            .pax_extensions()
            .map_err(|er| format!("{}: PAX header: {er}", path.display()))?
        else {
            return Ok(());
        };
        for x in exts {
            let x = x.map_err(|er| format!("{}: PAX header: {er}", path.display()))?;
            if let Some(name) = x.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                self.core
                    .setxattr(ino, name, Some(x.value_bytes()), 0)
                    .map_err(|er| err(path, "setting an xattr", er))?;
            }
        }
        Ok(())
    }

    /// Owner, mode and times from the header (a directory's times are set last).
    fn finish<R: Read>(
        &mut self,
        path: &Path,
        ino: u64,
        e: &tar::Entry<'_, R>,
        symlink: bool,
    ) -> Result<(), String> {
        let h = e.header();
        let bad = |what: &str, er: std::io::Error| format!("{}: {what}: {er}", path.display());
        let mtime = Ts {
            sec: h.mtime().map_err(|er| bad("mtime", er))? as i64,
            nsec: 0,
        };
        let a = SetAttr {
            mode: (!symlink)
                .then(|| h.mode().map(|m| m & 0o7777))
                .transpose()
                .map_err(|er| bad("mode", er))?,
            uid: Some(h.uid().map_err(|er| bad("uid", er))? as u32),
            gid: Some(h.gid().map_err(|er| bad("gid", er))? as u32),
            size: None,
            atime: Some(Some(mtime)),
            mtime: Some(Some(mtime)),
            kill_setid: None,
        };
        self.core
            .setattr(ino, &a)
            .map_err(|er| err(path, "setting attributes", er))?;
        if h.entry_type().is_dir() {
            self.dir_times.push((ino, mtime));
        }
        Ok(())
    }
}

/// Applies one layer (an uncompressed tar stream) onto the tree. `done` counts file bytes
/// written.
pub fn apply(core: &Core, r: impl Read, done: &AtomicU64) -> Result<LayerStats, String> {
    let mut a = Applier {
        core,
        touched: HashSet::new(),
        dir_times: Vec::new(),
        stats: LayerStats::default(),
    };
    let mut links = HashMap::new();
    let mut archive = tar::Archive::new(r);
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the layer: {e}"))?;
    for e in entries {
        let e = e.map_err(|e| format!("reading the layer: {e}"))?;
        a.entry(e, &mut links, done)?;
    }
    for (ino, t) in a.dir_times.iter().rev() {
        let s = SetAttr {
            mode: None,
            uid: None,
            gid: None,
            size: None,
            atime: Some(Some(*t)),
            mtime: Some(Some(*t)),
            kill_setid: None,
        };
        // A directory a later entry of the layer removed is gone: nothing to set.
        match core.setattr(*ino, &s) {
            Ok(_) | Err(fuser::Errno::ENOENT) => {}
            Err(e) => return Err(err(Path::new("."), "setting a directory's times", e)),
        }
    }
    Ok(a.stats)
}
