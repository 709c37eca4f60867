//! The filesystem itself, independent of FUSE: namespace, attributes, extended attributes and
//! file IO over a tree volume, with POSIX errors. Every metadata change is one
//! [`Txn`]: the blocks it touches are staged in memory whole, and the staged changes of many
//! operations are written together with one `Volume::write_blocks`, one journal group (group
//! commit: [`COMMIT_INTERVAL`] after the first, or at `fsync`), so after a crash an
//! operation (a rename, a create) is all there or not at all, and the operations that are
//! there are the first ones, in order.

use super::diff::Touched;
use super::format::*;
use fuser::Errno;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;
use strata_engine::{ByteRange, Volume};

pub type R<T> = Result<T, Errno>;

/// Metadata blocks kept in memory; the cache is dropped whole when it grows past this.
const CACHE_BLOCKS: usize = 32 * 1024;
/// Inode numbers reserved per superblock write.
const INO_RESERVE: u64 = 64;
/// Content of at most this many mapped blocks is freed in the same journal group as the
/// inode; more is unmapped first.
const FREE_INLINE_BLOCKS: usize = 256;
/// Locks serializing content changes of one inode against its truncation and freeing.
const STRIPES: usize = 64;
/// Staged metadata changes are written at most this long after the first of them (a crash
/// of the daemon loses at most this much of the metadata operations not `fsync`ed).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(5);
/// Appends of at most this many bytes are held in memory and written with the next group
/// (see [`Core::write`]) ...
const HOLD_WRITE: usize = 128 << 10;
/// ... up to this many bytes per file ...
const HOLD_FILE: usize = 1 << 20;
/// ... and this many in all (past it the appending writer writes the group itself).
const HOLD_TOTAL: usize = 16 << 20;
/// How long the committer waits before it tries again after a failed group write.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

fn eio(what: &str, e: impl std::fmt::Display) -> Errno {
    tracing::warn!(error = %e, "tree: {what}");
    Errno::EIO
}

fn engine_err(what: &str, e: strata_engine::Error) -> Errno {
    match e {
        strata_engine::Error::NoSpace | strata_engine::Error::QuotaExceeded { .. } => Errno::ENOSPC,
        e => eio(what, e),
    }
}

/// What the kernel has been told about, for invalidation after a restore.
#[derive(Default)]
pub struct Known {
    /// Inode → lookup count the kernel holds.
    pub lookups: HashMap<u64, u64>,
    /// Per inode the kernel holds, the (parent, name) entries it was handed for it;
    /// dropped when the kernel forgets the inode, so this is bounded by the kernel's cache.
    pub names: HashMap<u64, HashSet<(u64, Vec<u8>)>>,
}

pub struct Meta {
    cache: HashMap<u64, Arc<Vec<u8>>>,
    /// The next inode number to hand out.
    next_ino: u64,
    /// What the superblock records: numbers below it are handed out or reserved. Numbers
    /// are reserved 64 at a time, so a create does not rewrite the superblock.
    reserved: u64,
    /// Inodes freed during this mount (content unmapped with them), reused first.
    free: Vec<u64>,
    /// Metadata blocks changed by operations already answered and not written yet: their
    /// content is in `cache` (a zero block for content being unmapped), kept there until
    /// [`Core::commit_staged`] writes them all as one group.
    staged: BTreeSet<u64>,
    /// The group being written (outside this lock): its metadata blocks (kept in `cache`)
    /// and the files whose held appends it writes (read only after it is done).
    inflight: BTreeSet<u64>,
    inflight_files: HashSet<u64>,
    /// Inodes freed by staged changes: reused only once those are written (their content's
    /// zero blocks must land before a new file's data does).
    freed_staged: Vec<u64>,
    /// Appends held in memory, by file: (offset of the first byte, bytes). The file's size
    /// already counts them; reads, seeks, truncation and non-append writes of the file
    /// write them first ([`Core::write_held`]), the next group writes them all.
    held: HashMap<u64, (u64, Vec<u8>)>,
    held_bytes: usize,
    /// Why the last group write failed; cleared by the next one that succeeds. While set,
    /// every new metadata change fails with it.
    failed: Option<Errno>,
    /// The one zero block staged for content being unmapped (told apart by pointer).
    zero: Arc<Vec<u8>>,
    /// Inodes whose timestamps changed in the cache only (writes that did not change the
    /// size); written with the next metadata change of their block, or by
    /// [`Core::sync_times`].
    dirty_times: HashSet<u64>,
    pub known: Known,
    /// Per inode, restores that replaced it with another file (see [`Core::generation`]).
    epochs: HashMap<u64, u64>,
    /// Xattr blobs read or written, by inode (bounded by [`XCACHE_BYTES`]).
    xcache: HashMap<u64, Arc<Vec<u8>>>,
    xcache_bytes: usize,
}

/// Bytes of xattr blobs kept in memory; the cache is dropped whole past this.
const XCACHE_BYTES: usize = 64 << 20;

impl Meta {
    fn cache_xblob(&mut self, ino: u64, b: Arc<Vec<u8>>) {
        if self.xcache_bytes + b.len() > XCACHE_BYTES {
            self.xcache.clear();
            self.xcache_bytes = 0;
        }
        self.xcache_bytes += b.len();
        if let Some(old) = self.xcache.insert(ino, b) {
            self.xcache_bytes -= old.len();
        }
    }
}

pub struct Core {
    pub vol: Volume,
    /// Held shared by every operation, exclusively by a restore or checkpoint.
    gate: RwLock<()>,
    meta: Mutex<Meta>,
    stripes: Vec<RwLock<()>>,
    pub store_dir: std::path::PathBuf,
    /// Wakes the committer thread (see [`committer`]).
    kick: Arc<Kick>,
    /// The committer thread, joined by [`Core::stop_committer`].
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held while a group is written: one at a time, in order.
    group: Mutex<()>,
}

/// The committer's wake-up: `armed` when changes were staged onto an empty stage, `stop`
/// when the core is dropped.
#[derive(Default)]
struct Kick {
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Kick {
    fn arm(&self) {
        self.state.lock().0 = true;
        self.cv.notify_one();
    }

    fn stop(&self) {
        self.state.lock().1 = true;
        self.cv.notify_one();
    }

    /// Waits until armed (true) or stopped (false).
    fn wait(&self) -> bool {
        let mut s = self.state.lock();
        while !s.0 && !s.1 {
            self.cv.wait(&mut s);
        }
        s.0 = false;
        !s.1
    }

    /// Sleeps for `d` unless stopped first; returns false when stopped.
    fn nap(&self, d: Duration) -> bool {
        let until = std::time::Instant::now() + d;
        let mut s = self.state.lock();
        while !s.1 && !self.cv.wait_until(&mut s, until).timed_out() {}
        !s.1
    }
}

/// Writes staged metadata [`COMMIT_INTERVAL`] after the first change of each group. Holds
/// the core only while writing: it ends when the core is dropped.
fn committer(core: Weak<Core>, kick: Arc<Kick>) {
    while kick.wait() {
        if !kick.nap(COMMIT_INTERVAL) {
            // Stopped: the core's owner writes what is staged.
            return;
        }
        let Some(core) = core.upgrade() else {
            return;
        };
        if core.commit_staged().is_err() {
            // Logged by the failed write; the stage is kept and tried again.
            drop(core);
            if !kick.nap(RETRY_INTERVAL) {
                return;
            }
            kick.arm();
        }
    }
}

/// The first block at or after `at` and before `end` that holds metadata: mapped in the
/// volume, staged, or being written.
fn next_block(vol: &Volume, m: &Meta, at: u64, end: u64) -> Option<u64> {
    let mapped = vol.next_data_before(at, end).map(|o| o - o % BS);
    let staged = m.staged.range(at..end).next().copied();
    let inflight = m.inflight.range(at..end).next().copied();
    [mapped, staged, inflight].into_iter().flatten().min()
}

/// A group taken for writing: metadata blocks as staged, held appends, freed numbers.
struct Group {
    blocks: Vec<(u64, Arc<Vec<u8>>)>,
    held: HashMap<u64, (u64, Vec<u8>)>,
    freed: Vec<u64>,
}

impl Group {
    /// Writes the group: a held append that starts inside a block first merges into it
    /// with a write of its own; the rest, whole blocks of data (a last partial one padded
    /// with zeros: past the end of its file) and the metadata, as one journal group.
    fn write(&self, vol: &Volume) -> strata_engine::Result<()> {
        let head_len = |at: u64, len: usize| ((BS - at % BS) % BS).min(len as u64) as usize;
        let mut tails = Vec::new();
        let mut blocks: BTreeMap<u64, &[u8]> = BTreeMap::new();
        for (&ino, (off, buf)) in &self.held {
            let at = data_off(ino) + off;
            let head = head_len(at, buf.len());
            if head > 0 {
                vol.write_bytes(at, &buf[..head])?;
            }
            let mut o = at + head as u64;
            for c in buf[head..].chunks(BS as usize) {
                if c.len() == BS as usize {
                    blocks.insert(o, c);
                } else {
                    let mut b = c.to_vec();
                    b.resize(BS as usize, 0);
                    tails.push((o, b));
                }
                o += BS;
            }
        }
        for (o, b) in &tails {
            blocks.insert(*o, b);
        }
        for (o, b) in &self.blocks {
            blocks.insert(*o, b);
        }
        let blocks: Vec<(u64, &[u8])> = blocks.into_iter().collect();
        vol.write_blocks(&blocks)
    }
}

/// What the kernel must drop after a restore.
#[derive(Default, Debug)]
pub struct Stale {
    /// Inodes whose attributes and pages (a directory's: its listing) may be stale.
    pub inodes: Vec<u64>,
    /// Names (directory, name) that now lead elsewhere or nowhere.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// The change was not listed (or too large to): every cached name must go.
    pub all_names: bool,
}

/// Past this many touched inodes or directory buckets, a restore drops every cached name
/// instead of listing what changed.
const RESTORE_LIST_LIMIT: u64 = 20_000;

/// What [`Core::hold_or_settle`] did with a write.
enum Appended {
    /// Held in memory; whether set-id bits were cleared.
    Held { killed: bool },
    /// Not held (what was held for the file is written); the file's size.
    Not { size: u64 },
}

/// Attributes to change (setattr).
#[derive(Default, Debug)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// `Some(None)`: now.
    pub atime: Option<Option<Ts>>,
    pub mtime: Option<Option<Ts>>,
    /// Clear the set-id bits as the kernel would for this caller (uid, gid): a chown, or a
    /// truncation by a caller without CAP_FSETID (see [`kill_setid`]).
    pub kill_setid: Option<(u32, u32)>,
}

/// `mode` after a write, truncation or chown by `caller` (uid, gid) that clears set-id bits
/// (FUSE_HANDLE_KILLPRIV_V2 leaves this to the filesystem): set-user-ID always; set-group-ID
/// when group members may execute the file, or when the caller is not root and not of the
/// file's group (as the kernel's `setattr_should_drop_sgid`, with the caller's primary
/// group standing for its groups).
fn kill_setid(mode: u32, file_gid: u32, caller: (u32, u32)) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 || (caller.0 != 0 && caller.1 != file_gid) {
        m &= !libc::S_ISGID;
    }
    m
}

pub struct Txn<'a> {
    vol: &'a Volume,
    meta: &'a mut Meta,
    kick: &'a Kick,
    dirty: BTreeMap<u64, Vec<u8>>,
    /// An xattr blob this change writes, cached once it commits.
    xpending: Option<(u64, Arc<Vec<u8>>)>,
    /// Content blocks this change unmaps (written as zero blocks in the same group).
    zeros: Vec<u64>,
    /// The allocator as it was before this change (restored when the change is dropped
    /// uncommitted: a raised reservation must not outlive the superblock write it needs).
    before: (u64, u64),
    /// An inode number this change took from the free list (given back if dropped).
    reused: Option<u64>,
    committed: bool,
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if !self.committed {
            (self.meta.next_ino, self.meta.reserved) = self.before;
            if let Some(i) = self.reused.take() {
                self.meta.free.push(i);
            }
        }
    }
}

impl Txn<'_> {
    fn load(&mut self, off: u64) -> R<Vec<u8>> {
        if let Some(b) = self.dirty.get(&off) {
            return Ok(b.clone());
        }
        if let Some(b) = self.meta.cache.get(&off) {
            return Ok(b.as_ref().clone());
        }
        let mut b = vec![0u8; BS as usize];
        self.vol
            .read_bytes(off, &mut b)
            .map_err(|e| eio("reading metadata", e))?;
        if self.meta.cache.len() >= CACHE_BLOCKS {
            // Dropped whole, except staged blocks and inode blocks holding timestamps not
            // written yet.
            let keep: HashSet<u64> = self
                .meta
                .dirty_times
                .iter()
                .map(|&i| inode_block(i).0)
                .collect();
            let (staged, inflight) = (&self.meta.staged, &self.meta.inflight);
            self.meta
                .cache
                .retain(|o, _| keep.contains(o) || staged.contains(o) || inflight.contains(o));
        }
        self.meta.cache.insert(off, Arc::new(b.clone()));
        Ok(b)
    }

    fn with_block<T>(&mut self, off: u64, f: impl FnOnce(&[u8]) -> T) -> R<T> {
        if let Some(b) = self.dirty.get(&off) {
            return Ok(f(b));
        }
        if !self.meta.cache.contains_key(&off) {
            self.load(off)?;
        }
        Ok(f(&self.meta.cache[&off]))
    }

    fn block_mut(&mut self, off: u64) -> R<&mut Vec<u8>> {
        if !self.dirty.contains_key(&off) {
            let b = self.load(off)?;
            self.dirty.insert(off, b);
        }
        Ok(self.dirty.get_mut(&off).expect("just inserted"))
    }

    pub fn inode(&mut self, ino: u64) -> R<Inode> {
        if ino == 0 || ino >= MAX_INO {
            return Err(Errno::ENOENT);
        }
        let (off, at) = inode_block(ino);
        let i = self.with_block(off, |b| Inode::decode(&b[at..at + INODE_SIZE as usize]))?;
        if i.mode == 0 {
            return Err(Errno::ENOENT);
        }
        Ok(i)
    }

    fn put_inode(&mut self, ino: u64, i: &Inode) -> R<()> {
        let (off, at) = inode_block(ino);
        let b = self.block_mut(off)?;
        i.encode_into(&mut b[at..at + INODE_SIZE as usize]);
        Ok(())
    }

    fn set_orphan(&mut self, ino: u64, on: bool) -> R<()> {
        let (off, at, bit) = orphan_bit(ino);
        let b = self.block_mut(off)?;
        if on {
            b[at] |= bit;
        } else {
            b[at] &= !bit;
        }
        Ok(())
    }

    fn bucket(&mut self, dir: u64, n: u64) -> R<Bucket> {
        self.with_block(bucket_off(dir, n), Bucket::decode)?
            .map_err(|e| eio("reading a directory", format!("directory {dir}: {e}")))
    }

    fn put_bucket(&mut self, dir: u64, n: u64, b: &Bucket) -> R<()> {
        *self.block_mut(bucket_off(dir, n))? = b.encode();
        Ok(())
    }

    /// Finds `name` in `dir`: (bucket, index in it, entry).
    fn find(&mut self, dir: u64, name: &[u8]) -> R<Option<(u64, usize, Dirent)>> {
        let h = name_hash(name);
        let mut n = home_bucket(h);
        for _ in 0..BUCKETS {
            let b = self.bucket(dir, n)?;
            if let Some(i) = b.entries.iter().position(|e| e.hash == h && e.name == name) {
                return Ok(Some((n, i, b.entries[i].clone())));
            }
            if !b.overflow {
                return Ok(None);
            }
            n = (n + 1) % BUCKETS;
        }
        Ok(None)
    }

    /// Directory `dir` gained (or lost) `entries` entries and `links` subdirectories:
    /// counts and times updated and written.
    fn dir_changed(&mut self, dir: u64, d: &mut Inode, entries: i32, links: i32, now: Ts) -> R<()> {
        d.size = d.size.saturating_add_signed(i64::from(entries));
        d.nlink = d.nlink.saturating_add_signed(links);
        d.mtime = now;
        d.ctime = now;
        self.put_inode(dir, d)
    }

    /// Directory `parent`, checked to be a live directory without an entry `name`.
    fn dir_for_new(&mut self, parent: u64, name: &[u8]) -> R<Inode> {
        let p = self.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if p.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        if self.find(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        Ok(p)
    }

    fn insert(&mut self, dir: u64, name: &[u8], ino: u64, mode: u32) -> R<()> {
        let h = name_hash(name);
        let mut n = home_bucket(h);
        for _ in 0..BUCKETS {
            let mut b = self.bucket(dir, n)?;
            let clash = b
                .entries
                .iter()
                .any(|e| cookie_hash(e.hash) == cookie_hash(h));
            if b.fits(name.len()) && !clash {
                b.entries.push(Dirent {
                    hash: h,
                    ino,
                    kind: (mode >> 12) as u8,
                    name: name.to_vec(),
                });
                b.sort();
                return self.put_bucket(dir, n, &b);
            }
            if !b.overflow {
                b.overflow = true;
                self.put_bucket(dir, n, &b)?;
            }
            n = (n + 1) % BUCKETS;
        }
        Err(Errno::ENOSPC)
    }

    fn remove_at(&mut self, dir: u64, n: u64, i: usize) -> R<()> {
        let mut b = self.bucket(dir, n)?;
        b.entries.remove(i);
        self.put_bucket(dir, n, &b)
    }

    fn replace_at(&mut self, dir: u64, n: u64, i: usize, ino: u64, mode: u32) -> R<()> {
        let mut b = self.bucket(dir, n)?;
        b.entries[i].ino = ino;
        b.entries[i].kind = (mode >> 12) as u8;
        self.put_bucket(dir, n, &b)
    }

    /// Inode `ino`'s xattr blob (`len` bytes): entries `[name len u8][value len u32 LE]
    /// [name][value]`, in the order they were set. Kept decoded-free: operations scan it.
    fn xblob(&mut self, ino: u64, len: u32) -> R<Arc<Vec<u8>>> {
        if let Some(b) = self
            .meta
            .xcache
            .get(&ino)
            .filter(|b| b.len() == len as usize)
        {
            return Ok(b.clone());
        }
        if u64::from(len) > XATTR_SPAN {
            return Err(eio(
                "reading xattrs",
                format!("inode {ino} claims {len} bytes of xattrs"),
            ));
        }
        let mut blob = Vec::with_capacity(len as usize);
        let base = xattr_off(ino);
        let mut off = 0u64;
        while off < u64::from(len) {
            let take = (u64::from(len) - off).min(BS) as usize;
            self.with_block(base + off, |b| blob.extend_from_slice(&b[..take]))?;
            off += BS;
        }
        check_xattrs(&blob).map_err(|e| eio("reading xattrs", format!("inode {ino}: {e}")))?;
        let blob = Arc::new(blob);
        self.meta.cache_xblob(ino, blob.clone());
        Ok(blob)
    }

    /// Replaces the blob: writes only the blocks whose bytes change (appending an
    /// attribute to a long list rewrites its last block, not the list).
    fn put_xblob(&mut self, ino: u64, i: &mut Inode, old: &[u8], blob: Vec<u8>) -> R<()> {
        if blob.len() as u64 > XATTR_SPAN {
            return Err(Errno::ENOSPC);
        }
        let base = xattr_off(ino);
        let blocks = (old.len().max(blob.len()) as u64).div_ceil(BS);
        let part = |v: &[u8], k: u64| -> Vec<u8> {
            let mut b = vec![0u8; BS as usize];
            let from = (k * BS) as usize;
            if from < v.len() {
                let to = (from + BS as usize).min(v.len());
                b[..to - from].copy_from_slice(&v[from..to]);
            }
            b
        };
        for k in 0..blocks {
            let nb = part(&blob, k);
            if nb != part(old, k) {
                *self.block_mut(base + k * BS)? = nb;
            }
        }
        i.xattr_len = blob.len() as u32;
        self.xpending = Some((ino, Arc::new(blob)));
        Ok(())
    }

    fn alloc_ino(&mut self) -> R<u64> {
        if let Some(i) = self.meta.free.pop() {
            self.reused = Some(i);
            return Ok(i);
        }
        let i = self.meta.next_ino;
        if i >= MAX_INO {
            return Err(Errno::ENOSPC);
        }
        self.meta.next_ino += 1;
        if i >= self.meta.reserved {
            // Written with this operation: a crash never leaves a number in use that the
            // superblock does not cover.
            self.meta.reserved = (i + INO_RESERVE).min(MAX_INO);
            *self.block_mut(SUPER_OFF)? = Super {
                next_ino: self.meta.reserved,
            }
            .encode();
        }
        Ok(i)
    }

    /// Stages the change: from here on every operation sees it, and it is written with the
    /// next group. Fails (and the change is dropped) only while group writes fail.
    fn commit(mut self) -> R<()> {
        if self.dirty.is_empty() && self.zeros.is_empty() {
            self.committed = true;
            return Ok(());
        }
        if let Some(e) = self.meta.failed {
            return Err(e);
        }
        let was_empty = self.meta.staged.is_empty();
        for (o, b) in std::mem::take(&mut self.dirty) {
            self.meta.cache.insert(o, Arc::new(b));
            self.meta.staged.insert(o);
        }
        for o in std::mem::take(&mut self.zeros) {
            self.meta.cache.insert(o, self.meta.zero.clone());
            self.meta.staged.insert(o);
        }
        if let Some((ino, b)) = self.xpending.take() {
            self.meta.cache_xblob(ino, b);
        }
        self.committed = true;
        if was_empty {
            self.kick.arm();
        }
        Ok(())
    }
}

fn read_super(vol: &Volume) -> R<Super> {
    let mut b = vec![0u8; BS as usize];
    vol.read_bytes(SUPER_OFF, &mut b)
        .map_err(|e| eio("reading the superblock", e))?;
    match Super::decode(&b) {
        Some(Ok(s)) => Ok(s),
        Some(Err(e)) => Err(eio("reading the superblock", e)),
        None => Err(eio("reading the superblock", "not a Strata tree")),
    }
}

/// Writes an empty tree (superblock and a root directory owned by root) into a new tree
/// volume.
fn mkfs(vol: &Volume) -> strata_engine::Result<()> {
    let now = Ts::now();
    let root = Inode {
        mode: libc::S_IFDIR | 0o755,
        nlink: 2,
        atime: now,
        mtime: now,
        ctime: now,
        btime: now,
        parent: ROOT_INO,
        generation: 1,
        ..Inode::default()
    };
    let (off, at) = inode_block(ROOT_INO);
    let mut ib = vec![0u8; BS as usize];
    root.encode_into(&mut ib[at..]);
    let sb = Super {
        next_ino: ROOT_INO + 1,
    }
    .encode();
    vol.write_blocks(&[(SUPER_OFF, &sb), (off, &ib)])?;
    vol.flush()
}

/// The generation the kernel is given for `ino`: the stored one plus 2^24 per restore that
/// replaced the file, in 32 bits (the kernel keeps no more).
fn generation_of(m: &Meta, ino: u64, i: &Inode) -> u64 {
    let e = m.epochs.get(&ino).copied().unwrap_or(0);
    i.generation.wrapping_add(e << 24) & 0xffff_ffff
}

fn check_name(name: &[u8]) -> R<()> {
    if name.len() > MAX_NAME {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

#[derive(Debug)]
pub struct NewNode<'a> {
    pub mode: u32,
    pub umask: u32,
    pub rdev: u64,
    pub uid: u32,
    pub gid: u32,
    pub target: Option<&'a [u8]>,
}

/// An entry returned to readdir.
#[derive(Debug)]
pub struct ListEntry {
    pub ino: u64,
    pub kind: u32,
    pub name: Vec<u8>,
    /// Offset to resume after this entry.
    pub next: u64,
}

impl Core {
    /// Opens the tree in `vol` for serving: frees orphans a crash left behind, and starts
    /// the thread that writes staged metadata.
    pub fn open(vol: Volume, store_dir: std::path::PathBuf) -> Result<Arc<Core>, String> {
        if !vol.is_tree() {
            return Err(format!(
                "volume {} is a block volume, not a tree",
                vol.name()
            ));
        }
        if vol.mapped_bytes() == 0 {
            // A new tree volume is formatted by its first mount.
            mkfs(&vol).map_err(|e| format!("formatting the new tree: {e}"))?;
        }
        let mut b = vec![0u8; BS as usize];
        vol.read_bytes(SUPER_OFF, &mut b)
            .map_err(|e| format!("reading the superblock: {e}"))?;
        let sb = match Super::decode(&b) {
            Some(Ok(sb)) => sb,
            Some(Err(e)) => return Err(e),
            None => return Err(format!("volume {} holds no Strata tree", vol.name())),
        };
        let core = Core {
            vol,
            gate: RwLock::new(()),
            meta: Mutex::new(Meta {
                cache: HashMap::new(),
                next_ino: sb.next_ino,
                reserved: sb.next_ino,
                free: Vec::new(),
                staged: BTreeSet::new(),
                freed_staged: Vec::new(),
                held: HashMap::new(),
                held_bytes: 0,
                inflight: BTreeSet::new(),
                inflight_files: HashSet::new(),
                failed: None,
                zero: Arc::new(vec![0u8; BS as usize]),
                dirty_times: HashSet::new(),
                known: Known::default(),
                epochs: HashMap::new(),
                xcache: HashMap::new(),
                xcache_bytes: 0,
            }),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            store_dir,
            kick: Arc::new(Kick::default()),
            committer: Mutex::new(None),
            group: Mutex::new(()),
        };
        let n = core
            .free_orphans()
            .map_err(|e| format!("freeing orphaned inodes: {e:?}"))?;
        core.commit_staged()
            .map_err(|e| format!("freeing orphaned inodes: {e:?}"))?;
        if n > 0 {
            tracing::info!(volume = %core.vol.name(), inodes = n, "freed inodes unlinked while open before a crash");
        }
        let core = Arc::new(core);
        let (weak, kick) = (Arc::downgrade(&core), core.kick.clone());
        let thread = std::thread::Builder::new()
            .name("tree-commit".into())
            .spawn(move || committer(weak, kick))
            .map_err(|e| format!("starting the metadata committer: {e}"))?;
        *core.committer.lock() = Some(thread);
        Ok(core)
    }

    /// Stops the committer thread and waits for it: it holds the core while it writes a
    /// group, so without this the core's last reference (whose drop writes what is
    /// staged) could be the committer's, and that write land after its owner moved on
    /// (e.g. restored the volume). Staged changes then wait for [`Core::commit`] or the
    /// drop. For owners that are done with the core.
    pub fn stop_committer(&self) {
        self.kick.stop();
        let thread = self.committer.lock().take();
        if let Some(t) = thread {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Writes the staged metadata changes and held appends (one group), outside the
    /// metadata lock: operations go on meanwhile (they see the group's blocks in the cache;
    /// reads of a file whose appends it writes wait for it). On failure everything goes
    /// back to the stage (the operations were answered: they are tried again, not dropped)
    /// and `failed` says why.
    pub fn commit_staged(&self) -> R<()> {
        let _one = self.group.lock();
        let g = {
            let mut m = self.meta.lock();
            if m.staged.is_empty() && m.held.is_empty() {
                return Ok(());
            }
            let staged = std::mem::take(&mut m.staged);
            let blocks: Vec<(u64, Arc<Vec<u8>>)> =
                staged.iter().map(|o| (*o, m.cache[o].clone())).collect();
            m.inflight = staged;
            let held = std::mem::take(&mut m.held);
            m.held_bytes = 0;
            m.inflight_files = held.keys().copied().collect();
            Group {
                blocks,
                held,
                freed: std::mem::take(&mut m.freed_staged),
            }
        };
        let r = g.write(&self.vol);
        let mut m = self.meta.lock();
        m.inflight.clear();
        m.inflight_files.clear();
        match r {
            Ok(()) => {
                m.failed = None;
                for (o, b) in &g.blocks {
                    // Unmapped content is read from the volume again (now zeros there),
                    // unless changed since.
                    if Arc::ptr_eq(b, &m.zero) && m.cache.get(o).is_some_and(|c| Arc::ptr_eq(c, b))
                    {
                        m.cache.remove(o);
                    }
                }
                m.free.extend(g.freed);
                Ok(())
            }
            Err(e) => {
                let e = engine_err("writing metadata", e);
                m.failed = Some(e);
                m.staged.extend(g.blocks.iter().map(|(o, _)| *o));
                m.freed_staged.extend(g.freed);
                for (ino, (off, mut buf)) in g.held {
                    // Appends held since go after these.
                    if let Some((_, later)) = m.held.remove(&ino) {
                        buf.extend_from_slice(&later);
                    }
                    m.held_bytes += buf.len();
                    m.held.insert(ino, (off, buf));
                }
                Err(e)
            }
        }
    }

    /// Writes the appends held for `ino`, if any (kept held if that fails), after the group
    /// being written when it holds some of them.
    fn write_held(&self, m: &mut MutexGuard<'_, Meta>, ino: u64) -> R<()> {
        self.wait_inflight(m, ino);
        if let Some((off, buf)) = m.held.remove(&ino) {
            if let Err(e) = self.vol.write_bytes(data_off(ino) + off, &buf) {
                m.held.insert(ino, (off, buf));
                return Err(engine_err("writing file data", e));
            }
            m.held_bytes -= buf.len();
        }
        Ok(())
    }

    /// Waits (with the metadata lock released) while the group being written holds appends
    /// of `ino`.
    fn wait_inflight(&self, m: &mut MutexGuard<'_, Meta>, ino: u64) {
        while m.inflight_files.contains(&ino) {
            MutexGuard::unlocked(m, || drop(self.group.lock()));
        }
    }

    /// Writes held timestamps and every staged change: what was answered before is then
    /// in the volume (a crash of the daemon keeps it; [`Core::fsync`] also survives a
    /// power cut).
    pub fn commit(&self) -> R<()> {
        self.sync_times()?;
        self.commit_staged()
    }

    fn stripe(&self, ino: u64) -> &RwLock<()> {
        &self.stripes[(ino as usize) % STRIPES]
    }

    fn txn<'a>(&'a self, meta: &'a mut Meta) -> Txn<'a> {
        let before = (meta.next_ino, meta.reserved);
        Txn {
            vol: &self.vol,
            meta,
            kick: &self.kick,
            dirty: BTreeMap::new(),
            xpending: None,
            zeros: Vec::new(),
            before,
            reused: None,
            committed: false,
        }
    }

    /// Runs `f` (a checkpoint of the volume) with every operation held off and every
    /// staged change written first.
    pub fn quiesce<T>(&self, f: impl FnOnce() -> T) -> R<T> {
        let _g = self.gate.write();
        self.commit()?;
        Ok(f())
    }

    /// Runs `f` (a restore, which replaces the volume's content) with every operation held
    /// off, then drops every cache. `diff` gives the byte ranges where the restored content
    /// differs from the current one (`None`: unknown); only what they touch is looked at.
    /// Each inode the kernel holds that is now another file (or was deleted and is back)
    /// gets a new generation, so the kernel drops its old inode instead of reusing it;
    /// inodes that are the same file keep theirs: open handles to them see the restored
    /// content.
    ///
    /// Returns, with `f`'s result, what the kernel must drop: see [`Stale`].
    pub fn restore<T>(
        &self,
        diff: impl FnOnce() -> Option<Vec<ByteRange>>,
        f: impl FnOnce() -> T,
    ) -> R<(T, Stale)> {
        let _g = self.gate.write();
        self.commit()?;
        // What to look at: the inodes the kernel holds, all of them or those the change
        // touches; and the directory buckets the change touches, by directory.
        let touched = diff()
            .map(|r| Touched::of(&r))
            .filter(|t| t.inodes.len() as u64 <= RESTORE_LIST_LIMIT);
        let mut m = self.meta.lock();
        let inos: Vec<u64> = match &touched {
            Some(t) => t
                .inodes
                .iter()
                .filter(|i| m.known.lookups.contains_key(i))
                .copied()
                .collect(),
            None => m.known.lookups.keys().copied().collect(),
        };
        let mut t = self.txn(&mut m);
        let before: Vec<(u64, Option<Inode>)> =
            inos.iter().map(|i| (*i, t.inode(*i).ok())).collect();
        // The changed buckets of the directories among them (none past the limit: then
        // every cached name goes instead).
        let mut buckets: Vec<(u64, Vec<u64>)> = Vec::new();
        let mut all_names = touched.is_none();
        if let Some(tc) = &touched {
            let mut n = 0u64;
            for (ino, old) in &before {
                let Some(ranges) = tc
                    .content
                    .get(ino)
                    .filter(|_| old.as_ref().is_some_and(Inode::is_dir))
                else {
                    continue;
                };
                n += ranges.iter().map(|(a, b)| b - a + 1).sum::<u64>();
                if n > RESTORE_LIST_LIMIT {
                    all_names = true;
                    buckets.clear();
                    break;
                }
                buckets.push((*ino, ranges.iter().flat_map(|(a, b)| *a..=*b).collect()));
            }
        }
        let entries_of = |t: &mut Txn<'_>| -> Vec<(u64, HashMap<Vec<u8>, u64>)> {
            buckets
                .iter()
                .map(|(d, bs)| {
                    let mut names = HashMap::new();
                    for n in bs {
                        // A bucket that does not decode lists nothing (a damaged one is
                        // an error for whoever reads it next, not for the restore).
                        if let Ok(b) = t.bucket(*d, *n) {
                            names.extend(b.entries.into_iter().map(|e| (e.name, e.ino)));
                        }
                    }
                    (*d, names)
                })
                .collect()
        };
        let names_before = entries_of(&mut t);
        drop(t);
        drop(m);
        let out = f();
        let mut m = self.meta.lock();
        m.cache.clear();
        m.xcache.clear();
        m.xcache_bytes = 0;
        m.free.clear();
        m.freed_staged.clear();
        m.dirty_times.clear();
        // Inode numbers the kernel may still hold are never handed out again.
        let sb = read_super(&self.vol)?;
        m.next_ino = m.next_ino.max(sb.next_ino);
        m.reserved = sb.next_ino;
        let mut t = self.txn(&mut m);
        let after: Vec<(u64, Option<Inode>)> =
            before.iter().map(|(i, _)| (*i, t.inode(*i).ok())).collect();
        let names_after = entries_of(&mut t);
        drop(t);
        let mut stale = Stale {
            all_names,
            ..Stale::default()
        };
        for ((ino, old), (_, new)) in before.into_iter().zip(after) {
            let same = match (&old, &new) {
                (Some(o), Some(n)) => {
                    o.nlink > 0
                        && o.kind() == n.kind()
                        && o.btime == n.btime
                        && o.generation == n.generation
                }
                _ => false,
            };
            if !same {
                *m.epochs.entry(ino).or_insert(0) += 1;
                // Its names go too: a lookup then finds the new generation.
                if let Some(held) = m.known.names.get(&ino) {
                    stale.entries.extend(held.iter().cloned());
                }
            }
            // Any change shows in the ctime (or the size and mtime, which set it) — or, when
            // the change is listed, in its content.
            let untouched = matches!((&old, &new), (Some(o), Some(n))
                if o.size == n.size && o.mtime == n.mtime && o.ctime == n.ctime)
                && touched
                    .as_ref()
                    .is_none_or(|t| !t.content.contains_key(&ino));
            if !same || !untouched || (touched.is_none() && old.as_ref().is_some_and(Inode::is_dir))
            {
                stale.inodes.push(ino);
            }
        }
        // Names a changed directory no longer has, has for another inode, or has newly
        // (the kernel may hold a negative entry for it).
        for ((dir, old), (_, new)) in names_before.into_iter().zip(names_after) {
            for (name, ino) in &new {
                if old.get(name) != Some(ino) {
                    stale.entries.push((dir, name.clone()));
                }
            }
            for (name, ino) in old {
                if new.get(&name) != Some(&ino) {
                    stale.entries.push((dir, name));
                }
            }
            stale.inodes.push(dir);
        }
        stale.inodes.sort_unstable();
        stale.inodes.dedup();
        stale.entries.sort_unstable();
        stale.entries.dedup();
        Ok((out, stale))
    }

    /// The generation the kernel is given for `ino`: see [`generation_of`].
    pub fn generation(&self, ino: u64, i: &Inode) -> u64 {
        generation_of(&self.meta.lock(), ino, i)
    }

    /// The names the kernel holds directly under the root: invalidating them drops every
    /// cached name below them too (the kernel prunes the subtree of an invalidated entry).
    pub fn known_top_entries(&self) -> Vec<Vec<u8>> {
        let m = self.meta.lock();
        m.known
            .names
            .values()
            .flatten()
            .filter(|(parent, _)| *parent == ROOT_INO)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// The inodes the kernel holds (for invalidation).
    pub fn known_inodes(&self) -> Vec<u64> {
        self.meta.lock().known.lookups.keys().copied().collect()
    }

    fn free_orphans(&self) -> R<usize> {
        let mut found = Vec::new();
        let mut at = ORPHAN_BASE;
        while let Some(off) = self.vol.next_data_before(at, XATTR_BASE) {
            let blk = off - off % BS;
            let mut b = vec![0u8; BS as usize];
            self.vol
                .read_bytes(blk, &mut b)
                .map_err(|e| eio("reading orphans", e))?;
            for (i, byte) in b.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        found.push(((blk - ORPHAN_BASE) + i as u64) * 8 + bit);
                    }
                }
            }
            at = blk + BS;
        }
        for ino in &found {
            self.free_if_unused(*ino)?;
        }
        Ok(found.len())
    }

    /// Frees inode `ino` if it is unlinked and the kernel holds no reference: its content,
    /// slot and orphan bit in one change (content of more than [`FREE_INLINE_BLOCKS`]
    /// mapped blocks is unmapped just before), so a reused number never shows old bytes.
    /// Takes the inode's stripe and the metadata lock itself: callers hold neither.
    fn free_if_unused(&self, ino: u64) -> R<()> {
        let _s = self.stripe(ino).write();
        let mut m = self.meta.lock();
        if Self::held(&m, ino) {
            return Ok(());
        }
        let mut t = self.txn(&mut m);
        let i = match t.inode(ino) {
            Ok(i) if i.nlink == 0 => i,
            // Linked again, or already free: only the orphan mark may be left.
            _ => {
                t.set_orphan(ino, false)?;
                return t.commit();
            }
        };
        drop(t);
        // Its appends: dropped if held, waited for if being written (so the scan below
        // sees every block they map).
        self.wait_inflight(&mut m, ino);
        if let Some((_, b)) = m.held.remove(&ino) {
            m.held_bytes -= b.len();
        }
        let span = if i.is_dir() {
            BUCKETS * BS
        } else {
            // (A size past the span, from a damaged inode, cannot reach another file.)
            i.size.min(MAX_FILE_SIZE).div_ceil(BS) * BS
        };
        // Few mapped blocks: freed with the slot, in one group. Many: unmapped first.
        let (base, end) = (data_off(ino), data_off(ino) + span);
        let mut mapped = Vec::new();
        let mut at = base;
        while let Some(off) = next_block(&self.vol, &m, at, end) {
            if mapped.len() == FREE_INLINE_BLOCKS {
                // The unlink is written first: a crash never shows a linked file whose
                // content is gone. Not under the metadata lock: nothing reaches an unlinked
                // inode nobody holds, and its stripe is ours.
                drop(m);
                self.commit_staged()?;
                self.vol
                    .unmap_bytes(base, span)
                    .map_err(|e| engine_err("freeing content", e))?;
                m = self.meta.lock();
                mapped.clear();
                break;
            }
            let blk = off - off % BS;
            mapped.push(blk);
            at = blk + BS;
        }
        let mut t = self.txn(&mut m);
        if i.xattr_len > 0 {
            let old = t.xblob(ino, i.xattr_len)?;
            let mut tmp = i.clone();
            t.put_xblob(ino, &mut tmp, &old, Vec::new())?;
        }
        // A free slot (mode 0) keeps its generation: the next inode with this number gets
        // the one after it.
        let free = Inode {
            generation: i.generation,
            ..Inode::default()
        };
        t.put_inode(ino, &free)?;
        t.set_orphan(ino, false)?;
        t.zeros = mapped;
        t.commit()?;
        m.dirty_times.remove(&ino);
        m.freed_staged.push(ino);
        Ok(())
    }

    pub fn getattr(&self, ino: u64) -> R<Inode> {
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let i = self.txn(&mut m).inode(ino);
        i
    }

    fn remember(m: &mut Meta, parent: u64, name: &[u8], ino: u64) {
        *m.known.lookups.entry(ino).or_insert(0) += 1;
        m.known
            .names
            .entry(ino)
            .or_default()
            .insert((parent, name.to_vec()));
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> R<(u64, Inode)> {
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let p = t.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let ino = match name {
            b"." => parent,
            b".." => p.parent,
            _ => {
                check_name(name)?;
                t.find(parent, name)?.ok_or(Errno::ENOENT)?.2.ino
            }
        };
        let i = t.inode(ino)?;
        drop(t);
        Self::remember(&mut m, parent, name, ino);
        Ok((ino, i))
    }

    /// The kernel dropped `n` references: an unlinked inode nobody holds is freed.
    pub fn forget(&self, ino: u64, n: u64) {
        let _g = self.gate.read();
        {
            let mut m = self.meta.lock();
            let Some(c) = m.known.lookups.get_mut(&ino) else {
                return;
            };
            *c = c.saturating_sub(n);
            if *c > 0 {
                return;
            }
            m.known.lookups.remove(&ino);
            m.known.names.remove(&ino);
            if ino == ROOT_INO || !matches!(self.txn(&mut m).inode(ino), Ok(i) if i.nlink == 0) {
                return;
            }
        }
        if let Err(e) = self.free_if_unused(ino) {
            tracing::warn!(ino, error = ?e, "freeing an unlinked inode failed; the next mount frees it");
        }
    }

    fn held(m: &Meta, ino: u64) -> bool {
        m.known.lookups.get(&ino).is_some_and(|c| *c > 0)
    }

    /// Creates a node of any kind in `parent`.
    pub fn create(&self, parent: u64, name: &[u8], n: NewNode<'_>) -> R<(u64, Inode)> {
        check_name(name)?;
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let mut p = t.dir_for_new(parent, name)?;
        let kind = n.mode & libc::S_IFMT;
        let mut perm = n.mode & 0o7777 & !n.umask;
        let mut gid = n.gid;
        if p.mode & libc::S_ISGID != 0 {
            gid = p.gid;
            if kind == libc::S_IFDIR {
                perm |= libc::S_ISGID;
            }
        }
        if kind == libc::S_IFLNK {
            perm = 0o777;
        }
        let ino = t.alloc_ino()?;
        let old_gen = {
            let (off, at) = inode_block(ino);
            t.with_block(off, |b| {
                Inode::decode(&b[at..at + INODE_SIZE as usize]).generation
            })?
        };
        let now = Ts::now();
        let mut i = Inode {
            mode: kind | perm,
            uid: n.uid,
            gid,
            nlink: if kind == libc::S_IFDIR { 2 } else { 1 },
            size: 0,
            rdev: n.rdev,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            generation: old_gen + 1,
            parent,
            xattr_len: 0,
        };
        if let Some(target) = n.target {
            if target.len() >= BS as usize {
                return Err(Errno::ENAMETOOLONG);
            }
            let mut b = vec![0u8; BS as usize];
            b[..target.len()].copy_from_slice(target);
            *t.block_mut(data_off(ino))? = b;
            i.size = target.len() as u64;
        }
        t.insert(parent, name, ino, i.mode)?;
        t.put_inode(ino, &i)?;
        let links = i32::from(kind == libc::S_IFDIR);
        t.dir_changed(parent, &mut p, 1, links, now)?;
        t.commit()?;
        Self::remember(&mut m, parent, name, ino);
        Ok((ino, i))
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> R<Inode> {
        check_name(name)?;
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let mut i = t.inode(ino)?;
        if i.is_dir() {
            return Err(Errno::EPERM);
        }
        let mut p = t.dir_for_new(parent, name)?;
        if i.nlink >= 65000 {
            return Err(Errno::EMLINK);
        }
        let now = Ts::now();
        t.insert(parent, name, ino, i.mode)?;
        if i.nlink == 0 {
            t.set_orphan(ino, false)?;
        }
        i.nlink += 1;
        i.ctime = now;
        t.put_inode(ino, &i)?;
        t.dir_changed(parent, &mut p, 1, 0, now)?;
        t.commit()?;
        Self::remember(&mut m, parent, name, ino);
        Ok(i)
    }

    /// unlink (`dir == false`) or rmdir.
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> R<()> {
        check_name(name)?;
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let mut p = t.inode(parent)?;
        if !p.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let (b, idx, e) = t.find(parent, name)?.ok_or(Errno::ENOENT)?;
        let mut i = t.inode(e.ino)?;
        let now = Ts::now();
        if dir {
            if !i.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            if i.size > 0 {
                return Err(Errno::ENOTEMPTY);
            }
            i.nlink = 0;
        } else {
            if i.is_dir() {
                return Err(Errno::EISDIR);
            }
            i.nlink -= 1;
        }
        i.ctime = now;
        t.remove_at(parent, b, idx)?;
        t.dir_changed(parent, &mut p, -1, -i32::from(dir), now)?;
        t.put_inode(e.ino, &i)?;
        let gone = i.nlink == 0;
        if gone {
            t.set_orphan(e.ino, true)?;
        }
        t.commit()?;
        drop(m);
        if gone {
            self.free_if_unused(e.ino)?;
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> R<()> {
        check_name(name)?;
        check_name(newname)?;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(Errno::EINVAL);
        }
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let sp = t.inode(parent)?;
        let dp = t.inode(newparent)?;
        if !sp.is_dir() || !dp.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let (sb, si, se) = t.find(parent, name)?.ok_or(Errno::ENOENT)?;
        let src = t.inode(se.ino)?;
        let target = t.find(newparent, newname)?;
        let now = Ts::now();
        // A directory moved to another parent: its `..` and both parents' link counts.
        let moved_dir = |t: &mut Txn<'_>, ino: u64, from: u64, to: u64| -> R<()> {
            let mut d = t.inode(ino)?;
            if d.is_dir() && from != to {
                let mut f = t.inode(from)?;
                f.nlink -= 1;
                t.put_inode(from, &f)?;
                let mut g = t.inode(to)?;
                g.nlink += 1;
                t.put_inode(to, &g)?;
            }
            d.parent = to;
            d.ctime = now;
            t.put_inode(ino, &d)
        };
        let mut freed = None;
        if exchange {
            let (db, di, de) = target.ok_or(Errno::ENOENT)?;
            if de.ino == se.ino {
                return Ok(());
            }
            let dst = t.inode(de.ino)?;
            t.replace_at(parent, sb, si, de.ino, dst.mode)?;
            t.replace_at(newparent, db, di, se.ino, src.mode)?;
            moved_dir(&mut t, se.ino, parent, newparent)?;
            moved_dir(&mut t, de.ino, newparent, parent)?;
            for d in [parent, newparent] {
                let mut x = t.inode(d)?;
                t.dir_changed(d, &mut x, 0, 0, now)?;
            }
        } else {
            if let Some((db, di, de)) = target {
                if noreplace {
                    return Err(Errno::EEXIST);
                }
                if de.ino == se.ino {
                    // Two links to one inode: POSIX says do nothing.
                    return Ok(());
                }
                let mut dst = t.inode(de.ino)?;
                if src.is_dir() {
                    if !dst.is_dir() {
                        return Err(Errno::ENOTDIR);
                    }
                    if dst.size > 0 {
                        return Err(Errno::ENOTEMPTY);
                    }
                } else if dst.is_dir() {
                    return Err(Errno::EISDIR);
                }
                // The old target loses this link.
                t.remove_at(newparent, db, di)?;
                let mut np = t.inode(newparent)?;
                t.dir_changed(newparent, &mut np, -1, -i32::from(dst.is_dir()), now)?;
                if dst.is_dir() {
                    dst.nlink = 0;
                } else {
                    dst.nlink -= 1;
                }
                dst.ctime = now;
                t.put_inode(de.ino, &dst)?;
                if dst.nlink == 0 {
                    t.set_orphan(de.ino, true)?;
                    freed = Some(de.ino);
                }
            }
            // Remove the source entry (looked up again: removing the target may have
            // shifted it inside a shared bucket), then insert the new one.
            let (sb, si, _) = t.find(parent, name)?.ok_or(Errno::ENOENT)?;
            t.remove_at(parent, sb, si)?;
            t.insert(newparent, newname, se.ino, src.mode)?;
            let mut p = t.inode(parent)?;
            t.dir_changed(parent, &mut p, -1, 0, now)?;
            let mut np = t.inode(newparent)?;
            t.dir_changed(newparent, &mut np, 1, 0, now)?;
            moved_dir(&mut t, se.ino, parent, newparent)?;
        }
        t.commit()?;
        drop(m);
        if let Some(ino) = freed {
            self.free_if_unused(ino)?;
        }
        Ok(())
    }

    pub fn setattr(&self, ino: u64, a: &SetAttr) -> R<Inode> {
        let _g = self.gate.read();
        let _s = a.size.map(|_| self.stripe(ino).write());
        let mut m = self.meta.lock();
        if a.size.is_some() {
            self.write_held(&mut m, ino)?;
        }
        let mut t = self.txn(&mut m);
        let mut i = t.inode(ino)?;
        let now = Ts::now();
        let mut changed = false;
        if let Some(size) = a.size {
            if i.is_dir() {
                return Err(Errno::EISDIR);
            }
            if !i.is_reg() {
                return Err(Errno::EINVAL);
            }
            if size > MAX_FILE_SIZE {
                return Err(Errno::EFBIG);
            }
            if size < i.size {
                // Unmapping first: a crash leaves the old size over zeros, never the new
                // size over stale bytes. Not under the metadata lock: the inode's stripe,
                // held for writing, keeps its content and size ours meanwhile.
                drop(t);
                drop(m);
                self.vol
                    .unmap_bytes(data_off(ino) + size, i.size - size)
                    .map_err(|e| engine_err("truncating", e))?;
                m = self.meta.lock();
                t = self.txn(&mut m);
                i = t.inode(ino)?;
            } else if size > i.size {
                drop(t);
                drop(m);
                self.zero_past_eof(ino, i.size, size)?;
                m = self.meta.lock();
                t = self.txn(&mut m);
                i = t.inode(ino)?;
            }
            i.size = size;
            i.mtime = now;
            changed = true;
        }
        if let Some(c) = a.kill_setid.filter(|_| !i.is_dir()) {
            i.mode = kill_setid(i.mode, i.gid, c);
            changed = true;
        }
        if let Some(mode) = a.mode {
            i.mode = (i.mode & libc::S_IFMT) | (mode & 0o7777);
            changed = true;
        }
        if let Some(uid) = a.uid {
            i.uid = uid;
            changed = true;
        }
        if let Some(gid) = a.gid {
            i.gid = gid;
            changed = true;
        }
        if let Some(at) = a.atime {
            i.atime = at.unwrap_or(now);
            changed = true;
        }
        if let Some(mt) = a.mtime {
            i.mtime = mt.unwrap_or(now);
            changed = true;
        }
        if changed {
            i.ctime = now;
        }
        t.put_inode(ino, &i)?;
        t.commit()?;
        m.dirty_times.remove(&ino);
        Ok(i)
    }

    pub fn readlink(&self, ino: u64) -> R<Vec<u8>> {
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let i = t.inode(ino)?;
        if i.kind() != libc::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        let len = (i.size as usize).min(BS as usize);
        t.with_block(data_off(ino), |b| b[..len].to_vec())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> R<Vec<u8>> {
        let mut buf = Vec::new();
        let n = self.read_into(ino, offset, size, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// [`Core::read`] into `buf` (grown as needed, never shrunk, so a caller that
    /// keeps it pays for zeroing and faulting in its memory once, not per read): returns the
    /// bytes read, at the start of `buf`.
    pub fn read_into(&self, ino: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> R<usize> {
        let size = size as usize;
        if buf.len() < size {
            buf.resize(size, 0);
        }
        self.read_slice(ino, offset, &mut buf[..size])
    }

    /// Reads up to `buf.len()` bytes at `offset` into `buf`: returns the bytes read (fewer
    /// at the end of the file).
    pub fn read_slice(&self, ino: u64, offset: u64, buf: &mut [u8]) -> R<usize> {
        let _g = self.gate.read();
        let _s = self.stripe(ino).read();
        let i = {
            let mut m = self.meta.lock();
            let i = self.txn(&mut m).inode(ino)?;
            self.write_held(&mut m, ino)?;
            i
        };
        if i.is_dir() {
            return Err(Errno::EISDIR);
        }
        // A damaged inode's size never reaches past the file's span.
        let fsize = i.size.min(MAX_FILE_SIZE);
        if offset >= fsize {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(fsize - offset) as usize;
        self.vol
            .read_bytes(data_off(ino) + offset, &mut buf[..n])
            .map_err(|e| engine_err("reading", e))?;
        Ok(n)
    }

    /// Writes `data` at `offset`. `kill` (the caller's uid and gid): the kernel asks for
    /// the set-id bits to be cleared (a caller without CAP_FSETID). Returns the bytes
    /// written and whether set-id bits were cleared.
    pub fn write(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        kill: Option<(u32, u32)>,
    ) -> R<(u32, bool)> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(Errno::EFBIG)?;
        let _g = self.gate.read();
        let stripe = self.stripe(ino);
        let mut shared = Some(stripe.read());
        let mut _exclusive = None;
        let size = match self.hold_or_settle(ino, offset, data, kill)? {
            Appended::Held { killed } => return Ok((data.len() as u32, killed)),
            Appended::Not { size } => size,
        };
        if offset > size {
            // A gap past the end: zeroed first (see `zero_past_eof`), with the content ours.
            shared = None;
            _exclusive = Some(stripe.write());
            let size = self.settle(ino)?;
            if offset > size {
                self.zero_past_eof(ino, size, offset)?;
            }
        }
        self.vol
            .write_bytes(data_off(ino) + offset, data)
            .map_err(|e| engine_err("writing", e))?;
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let mut i = t.inode(ino)?;
        let now = Ts::now();
        i.mtime = now;
        i.ctime = now;
        let mode = kill.map_or(i.mode, |c| kill_setid(i.mode, i.gid, c));
        let killed = mode != i.mode;
        if end > i.size || killed {
            i.size = i.size.max(end);
            i.mode = mode;
            t.put_inode(ino, &i)?;
            t.commit()?;
            m.dirty_times.remove(&ino);
        } else {
            // Only the times changed: kept in the cached block (`inode` just put it there),
            // written with the next change of the block or at close, fsync, checkpoint or
            // unmount (see docs/design/trees.md, durability).
            drop(t);
            let (off, at) = inode_block(ino);
            if let Some(b) = m.cache.get_mut(&off) {
                i.encode_into(&mut Arc::make_mut(b)[at..at + INODE_SIZE as usize]);
                m.dirty_times.insert(ino);
            }
        }
        // The stripe is held to here: a truncation never lands between the data and the size.
        drop(m);
        drop(shared);
        Ok((data.len() as u32, killed))
    }

    /// Holds `data` in memory if it appends to regular file `ino` (at most [`HOLD_WRITE`]
    /// bytes at its end, after what is held for it, within [`HOLD_FILE`]); the size change is
    /// staged with it. A small file written by appends (an unpack, a clone, a build) then
    /// costs no write of its own: its data goes out with the next group, as whole blocks,
    /// with its metadata. Otherwise writes what is held for the file and returns its size.
    /// The caller holds the inode's stripe.
    fn hold_or_settle(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        kill: Option<(u32, u32)>,
    ) -> R<Appended> {
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let mut i = t.inode(ino)?;
        if !i.is_reg() {
            return Err(Errno::EINVAL);
        }
        let fits = !data.is_empty()
            && data.len() <= HOLD_WRITE
            && offset == i.size
            && match t.meta.held.get(&ino) {
                None => true,
                Some((o, b)) => o + b.len() as u64 == offset && b.len() + data.len() <= HOLD_FILE,
            };
        if !fits {
            drop(t);
            self.write_held(&mut m, ino)?;
            return Ok(Appended::Not { size: i.size });
        }
        let now = Ts::now();
        i.size = offset + data.len() as u64;
        i.mtime = now;
        i.ctime = now;
        let mode = kill.map_or(i.mode, |c| kill_setid(i.mode, i.gid, c));
        let killed = mode != i.mode;
        i.mode = mode;
        t.put_inode(ino, &i)?;
        t.commit()?;
        m.dirty_times.remove(&ino);
        m.held
            .entry(ino)
            .or_insert_with(|| (offset, Vec::new()))
            .1
            .extend_from_slice(data);
        m.held_bytes += data.len();
        if m.held_bytes > HOLD_TOTAL {
            drop(m);
            // Answered already: a failure is kept (and reported) by the stage.
            let _ = self.commit_staged();
        }
        Ok(Appended::Held { killed })
    }

    /// Writes the appends held for regular file `ino` and returns its size (EINVAL for any
    /// other kind).
    fn settle(&self, ino: u64) -> R<u64> {
        let mut m = self.meta.lock();
        let i = self.txn(&mut m).inode(ino)?;
        if !i.is_reg() {
            return Err(Errno::EINVAL);
        }
        self.write_held(&mut m, ino)?;
        Ok(i.size)
    }

    /// Makes the content of `ino` between its end (`size`) and `to` read as zeros, before
    /// the size grows over it. Bytes can lie there: a crash may lose a size change or a
    /// create (staged metadata) whose data was written, and a number handed out again then
    /// finds that data. Costs a map lookup, plus rewriting the last block when it is partly
    /// past the end. The caller holds the inode's stripe for writing.
    fn zero_past_eof(&self, ino: u64, size: u64, to: u64) -> R<()> {
        let (from, to) = (data_off(ino) + size, data_off(ino) + to.min(MAX_FILE_SIZE));
        if from < to && self.vol.next_data_before(from, to).is_some() {
            self.vol
                .unmap_bytes(from, to - from)
                .map_err(|e| engine_err("zeroing past the end of a file", e))?;
        }
        Ok(())
    }

    /// Writes timestamps held only in the cache.
    pub fn sync_times(&self) -> R<()> {
        let mut m = self.meta.lock();
        if m.dirty_times.is_empty() {
            return Ok(());
        }
        let inos: Vec<u64> = m.dirty_times.drain().collect();
        let mut t = self.txn(&mut m);
        for ino in inos {
            let (off, _) = inode_block(ino);
            t.block_mut(off)?;
        }
        t.commit()
    }

    pub fn fsync(&self) -> R<()> {
        let _g = self.gate.read();
        self.commit()?;
        self.vol.flush().map_err(|e| engine_err("fsync", e))
    }

    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> R<()> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(Errno::EFBIG)?;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if mode
            & !(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
            != 0
            || (punch && !keep)
            || (punch && zero)
        {
            return Err(Errno::EOPNOTSUPP);
        }
        let _g = self.gate.read();
        let _s = self.stripe(ino).write();
        let i = {
            let mut m = self.meta.lock();
            let i = self.txn(&mut m).inode(ino)?;
            self.write_held(&mut m, ino)?;
            i
        };
        if !i.is_reg() {
            return Err(Errno::ENODEV);
        }
        if !keep && end > i.size {
            self.zero_past_eof(ino, i.size, end)?;
        }
        if punch || zero {
            // Not under the metadata lock: the stripe, held for writing, keeps the content
            // and size ours.
            let to = end.min(if keep { i.size } else { end });
            if to > offset {
                self.vol
                    .unmap_bytes(data_off(ino) + offset, to - offset)
                    .map_err(|e| engine_err("punching", e))?;
            }
        }
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let mut i = t.inode(ino)?;
        let now = Ts::now();
        if !keep && end > i.size {
            i.size = end;
        }
        if punch || zero || !keep {
            i.mtime = now;
            i.ctime = now;
        }
        t.put_inode(ino, &i)?;
        t.commit()?;
        m.dirty_times.remove(&ino);
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE inside a file.
    pub fn lseek(&self, ino: u64, offset: u64, whence: i32) -> R<u64> {
        let _g = self.gate.read();
        let i = {
            let mut m = self.meta.lock();
            let i = self.txn(&mut m).inode(ino)?;
            self.write_held(&mut m, ino)?;
            i
        };
        let fsize = i.size.min(MAX_FILE_SIZE);
        if offset >= fsize {
            return Err(Errno::ENXIO);
        }
        let base = data_off(ino);
        match whence {
            libc::SEEK_DATA => match self.vol.next_data_before(base + offset, base + fsize) {
                Some(d) => Ok((d - base).max(offset)),
                None => Err(Errno::ENXIO),
            },
            libc::SEEK_HOLE => {
                let h = self.vol.next_hole(base + offset);
                Ok((h.saturating_sub(base)).max(offset).min(fsize))
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// Directory entries after `offset` (0 = from the start): `.`, `..`, then the buckets'
    /// entries in key order. Calls `add` until it returns true (the reply is full). With
    /// `plus` (readdirplus), each entry comes with its inode and generation, and every entry
    /// `add` accepted, except `.` and `..`, counts as a lookup the kernel holds.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(&ListEntry, Option<(&Inode, u64)>) -> bool,
    ) -> R<()> {
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut looked_up = Vec::new();
        let r = (|| {
            let mut t = self.txn(&mut m);
            let d = t.inode(ino)?;
            if !d.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            let mut emit = |t: &mut Txn<'_>, e: ListEntry, dot: bool| -> R<bool> {
                if !plus {
                    return Ok(add(&e, None));
                }
                let i = t.inode(e.ino)?;
                let g = generation_of(t.meta, e.ino, &i);
                let full = add(&e, Some((&i, g)));
                if !full && !dot {
                    looked_up.push((e.ino, e.name));
                }
                Ok(full)
            };
            let dots = [(1u64, ino, b".".to_vec()), (2, d.parent, b"..".to_vec())];
            for (next, i, name) in dots {
                if offset < next {
                    let e = ListEntry {
                        ino: i,
                        kind: libc::S_IFDIR,
                        name,
                        next,
                    };
                    if emit(&mut t, e, true)? {
                        return Ok(());
                    }
                }
            }
            // Keys strictly after this one.
            let after = offset.checked_sub(3);
            let first_bucket = after.map_or(0, |k| k >> COOKIE_HASH_BITS);
            let base = data_off(ino);
            let mut at = base + first_bucket * BS;
            let end = base + BUCKETS * BS;
            while let Some(off) = next_block(&self.vol, t.meta, at, end) {
                let n = (off - base) / BS;
                let b = t.bucket(ino, n)?;
                for e in b.entries {
                    let key = (n << COOKIE_HASH_BITS) | cookie_hash(e.hash);
                    if after.is_some_and(|a| key <= a) {
                        continue;
                    }
                    let le = ListEntry {
                        ino: e.ino,
                        kind: u32::from(e.kind) << 12,
                        name: e.name,
                        next: key + 3,
                    };
                    if emit(&mut t, le, false)? {
                        return Ok(());
                    }
                }
                at = base + (n + 1) * BS;
            }
            Ok(())
        })();
        for (child, name) in looked_up {
            Self::remember(&mut m, ino, &name, child);
        }
        r
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> R<Vec<u8>> {
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let i = t.inode(ino)?;
        let b = t.xblob(ino, i.xattr_len)?;
        for e in xattr_entries(&b) {
            let (_, n, v) = e.map_err(|e| eio("reading xattrs", e))?;
            if &b[n] == name {
                return Ok(b[v].to_vec());
            }
        }
        Err(Errno::ENODATA)
    }

    pub fn listxattr(&self, ino: u64) -> R<Vec<u8>> {
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let i = t.inode(ino)?;
        let b = t.xblob(ino, i.xattr_len)?;
        let mut out = Vec::new();
        for e in xattr_entries(&b) {
            let (_, n, _) = e.map_err(|e| eio("reading xattrs", e))?;
            out.extend_from_slice(&b[n]);
            out.push(0);
        }
        Ok(out)
    }

    /// Sets (`Some`) or removes (`None`) an extended attribute.
    pub fn setxattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>, flags: i32) -> R<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(Errno::ERANGE);
        }
        if value.is_some_and(|v| v.len() > 65536) {
            return Err(Errno::E2BIG);
        }
        let _g = self.gate.read();
        let mut m = self.meta.lock();
        let mut t = self.txn(&mut m);
        let mut i = t.inode(ino)?;
        let old = t.xblob(ino, i.xattr_len)?;
        let mut found = None;
        let mut names = 0usize;
        for e in xattr_entries(&old) {
            let (start, n, v) = e.map_err(|e| eio("reading xattrs", e))?;
            names += n.len() + 1;
            if &old[n.clone()] == name {
                found = Some(start..v.end);
            }
        }
        let blob = match (value, found) {
            (Some(_), Some(_)) if flags & libc::XATTR_CREATE != 0 => return Err(Errno::EEXIST),
            (Some(_), None) if flags & libc::XATTR_REPLACE != 0 => return Err(Errno::ENODATA),
            (None, None) => return Err(Errno::ENODATA),
            (Some(v), None) => {
                // listxattr(2) cannot return more than XATTR_LIST_MAX bytes of names.
                if names + name.len() + 1 > 65536 {
                    return Err(Errno::ENOSPC);
                }
                let mut b = old.as_ref().clone();
                b.extend_from_slice(&xattr_entry(name, v));
                b
            }
            (v, Some(r)) => {
                let mut b = Vec::with_capacity(old.len());
                b.extend_from_slice(&old[..r.start]);
                if let Some(v) = v {
                    b.extend_from_slice(&xattr_entry(name, v));
                }
                b.extend_from_slice(&old[r.end..]);
                b
            }
        };
        t.put_xblob(ino, &mut i, &old, blob)?;
        i.ctime = Ts::now();
        t.put_inode(ino, &i)?;
        t.commit()?;
        m.dirty_times.remove(&ino);
        Ok(())
    }

    /// (inodes in use, inodes left) for statfs.
    pub fn inode_counts(&self) -> (u64, u64) {
        let m = self.meta.lock();
        let used = m
            .next_ino
            .saturating_sub((m.free.len() + m.freed_staged.len()) as u64);
        (used, MAX_INO - used)
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.kick.stop();
        if let Err(e) = self.commit() {
            tracing::warn!(volume = %self.vol.name(), error = ?e, "tree: metadata changes not written at close");
        }
    }
}
