//! The on-volume format of a sandbox tree: where the superblock, inodes, directories,
//! extended attributes and file contents live in a tree volume's address space, and how each
//! metadata block is encoded. `docs/design/trees.md` is the reference; keep them in step.
//!
//! Everything is a 4 KiB block of the volume, so the engine versions the whole tree in one
//! map: a checkpoint, restore or fork of the volume is one of the tree, in O(1). The address
//! space is sparse; only written blocks cost anything.

use std::time::{SystemTime, UNIX_EPOCH};

pub const BS: u64 = 4096;
pub const MAGIC: &[u8; 8] = b"STRATAFS";
pub const VERSION: u32 = 1;

/// Block 0: the superblock.
pub const SUPER_OFF: u64 = 0;
/// Inode `i` is the 256-byte slot at `INODE_BASE + i * INODE_SIZE`.
pub const INODE_BASE: u64 = 1 << 40;
pub const INODE_SIZE: u64 = 256;
/// One bit per inode: set while the inode has no links but may still be open (an orphan,
/// freed when the kernel forgets it, or at the next mount).
pub const ORPHAN_BASE: u64 = 1 << 44;
/// Inode `i`'s extended attributes: one blob of `Inode::xattr_len` bytes at
/// `XATTR_BASE + i * XATTR_SPAN`.
pub const XATTR_BASE: u64 = 1 << 45;
pub const XATTR_SPAN: u64 = 1 << 20;
/// Inode `i`'s content (file bytes, symlink target, or directory buckets) starts at
/// `DATA_BASE + i * DATA_SPAN`.
pub const DATA_BASE: u64 = 1 << 61;
pub const DATA_SPAN: u64 = 1 << 37;
/// Inode numbers are below this: `DATA_BASE + MAX_INO * DATA_SPAN` is the volume's end.
pub const MAX_INO: u64 = 1 << 24;
/// Largest file.
pub const MAX_FILE_SIZE: u64 = DATA_SPAN;
pub const ROOT_INO: u64 = 1;
/// Directory buckets per directory (a hash table in the directory's content span).
pub const BUCKETS: u64 = 1 << 20;
pub const MAX_NAME: usize = 255;

// The regions do not overlap.
const _: () = assert!(INODE_BASE + MAX_INO * INODE_SIZE <= ORPHAN_BASE);
const _: () = assert!(ORPHAN_BASE + MAX_INO / 8 <= XATTR_BASE);
const _: () = assert!(XATTR_BASE + MAX_INO * XATTR_SPAN <= DATA_BASE);
const _: () = assert!(BUCKETS * BS <= DATA_SPAN);

pub fn inode_block(ino: u64) -> (u64, usize) {
    let off = INODE_BASE + ino * INODE_SIZE;
    (off - off % BS, (off % BS) as usize)
}

pub fn orphan_bit(ino: u64) -> (u64, usize, u8) {
    let byte = ino / 8;
    (
        ORPHAN_BASE + byte - byte % BS,
        (byte % BS) as usize,
        1 << (ino % 8),
    )
}

pub fn data_off(ino: u64) -> u64 {
    DATA_BASE + ino * DATA_SPAN
}

pub fn xattr_off(ino: u64) -> u64 {
    XATTR_BASE + ino * XATTR_SPAN
}

pub fn bucket_off(dir: u64, bucket: u64) -> u64 {
    data_off(dir) + bucket * BS
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ts {
    pub sec: i64,
    pub nsec: u32,
}

impl Ts {
    pub fn now() -> Ts {
        Ts::from(SystemTime::now())
    }
    pub fn to_system(self) -> SystemTime {
        if self.sec >= 0 {
            UNIX_EPOCH + std::time::Duration::new(self.sec as u64, self.nsec)
        } else {
            UNIX_EPOCH - std::time::Duration::from_secs(self.sec.unsigned_abs())
                + std::time::Duration::from_nanos(u64::from(self.nsec))
        }
    }
}

impl From<SystemTime> for Ts {
    fn from(t: SystemTime) -> Ts {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Ts {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Ts { sec, nsec }
            }
        }
    }
}

/// One inode. `mode == 0` marks a free slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inode {
    /// File type and permission bits, as in `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Bytes for files and symlinks; entries for directories.
    pub size: u64,
    pub rdev: u64,
    pub atime: Ts,
    pub mtime: Ts,
    pub ctime: Ts,
    pub btime: Ts,
    pub generation: u64,
    /// Directory holding the first link (for `..` and for diff's paths).
    pub parent: u64,
    pub xattr_len: u32,
}

struct W<'a>(&'a mut [u8], usize);
impl W<'_> {
    fn put(&mut self, b: &[u8]) {
        self.0[self.1..self.1 + b.len()].copy_from_slice(b);
        self.1 += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn ts(&mut self, t: Ts) {
        self.put(&t.sec.to_le_bytes());
        self.u32(t.nsec);
    }
}

struct R<'a>(&'a [u8], usize);
impl R<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.0[self.1..self.1 + n];
        self.1 += n;
        s
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4));
        u32::from_le_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8));
        u64::from_le_bytes(b)
    }
    fn ts(&mut self) -> Ts {
        let sec = self.u64() as i64;
        Ts {
            sec,
            nsec: self.u32(),
        }
    }
}

impl Inode {
    pub fn encode_into(&self, slot: &mut [u8]) {
        slot[..INODE_SIZE as usize].fill(0);
        let mut w = W(slot, 0);
        w.u32(self.mode);
        w.u32(self.uid);
        w.u32(self.gid);
        w.u32(self.nlink);
        w.u64(self.size);
        w.u64(self.rdev);
        for t in [self.atime, self.mtime, self.ctime, self.btime] {
            w.ts(t);
        }
        w.u64(self.generation);
        w.u64(self.parent);
        w.u32(self.xattr_len);
    }

    pub fn decode(slot: &[u8]) -> Inode {
        let mut r = R(slot, 0);
        Inode {
            mode: r.u32(),
            uid: r.u32(),
            gid: r.u32(),
            nlink: r.u32(),
            size: r.u64(),
            rdev: r.u64(),
            atime: r.ts(),
            mtime: r.ts(),
            ctime: r.ts(),
            btime: r.ts(),
            generation: r.u64(),
            parent: r.u64(),
            xattr_len: r.u32(),
        }
    }

    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
}

/// The superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Super {
    /// Inode numbers below this have been handed out in this tree's lineage.
    pub next_ino: u64,
}

impl Super {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BS as usize];
        let mut w = W(&mut b, 0);
        w.put(MAGIC);
        w.u32(VERSION);
        w.u64(self.next_ino);
        b
    }

    /// `None` when the block is not a Strata tree's superblock.
    pub fn decode(b: &[u8]) -> Option<Result<Super, String>> {
        if b.len() < 20 || &b[..8] != MAGIC {
            return None;
        }
        let mut r = R(b, 8);
        let v = r.u32();
        if v != VERSION {
            return Some(Err(format!(
                "tree format version {v} (this build reads {VERSION})"
            )));
        }
        let next_ino = r.u64();
        if !(ROOT_INO + 1..=MAX_INO).contains(&next_ino) {
            return Some(Err(format!("superblock names next inode {next_ino}")));
        }
        Some(Ok(Super { next_ino }))
    }
}

/// A directory entry as stored in a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirent {
    pub hash: u64,
    pub ino: u64,
    /// `S_IFMT` bits of the child, shifted down by 12 (fits a byte).
    pub kind: u8,
    pub name: Vec<u8>,
}

/// One directory bucket: entries sorted by their readdir key, and whether an entry whose
/// home is this bucket (or an earlier one) was pushed past it (lookups then probe on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub overflow: bool,
    pub entries: Vec<Dirent>,
}

const BUCKET_HEADER: usize = 4;
const DIRENT_HEADER: usize = 18;
/// Bits of the name hash in a readdir cookie (the bucket number takes the 20 above them).
pub const COOKIE_HASH_BITS: u32 = 43;

pub fn name_hash(name: &[u8]) -> u64 {
    // FNV-1a, then a finalizer so the top bits (the home bucket) mix every byte.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

pub fn home_bucket(hash: u64) -> u64 {
    hash >> (64 - 20)
}

pub fn cookie_hash(hash: u64) -> u64 {
    hash & ((1 << COOKIE_HASH_BITS) - 1)
}

impl Bucket {
    pub fn used(&self) -> usize {
        BUCKET_HEADER
            + self
                .entries
                .iter()
                .map(|e| DIRENT_HEADER + e.name.len())
                .sum::<usize>()
    }

    pub fn fits(&self, name_len: usize) -> bool {
        self.used() + DIRENT_HEADER + name_len <= BS as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BS as usize];
        let mut w = W(&mut b, 0);
        w.put(&(self.entries.len() as u16).to_le_bytes());
        w.put(&[u8::from(self.overflow), 0]);
        for e in &self.entries {
            w.u64(e.hash);
            w.u64(e.ino);
            w.put(&[e.kind, e.name.len() as u8]);
            w.put(&e.name);
        }
        b
    }

    /// Refuses a block that does not hold a well-formed bucket.
    pub fn decode(b: &[u8]) -> Result<Bucket, String> {
        if b.len() != BS as usize {
            return Err("bucket is not one block".into());
        }
        let n = u16::from_le_bytes([b[0], b[1]]) as usize;
        let overflow = b[2] & 1 != 0;
        let mut at = BUCKET_HEADER;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            if at + DIRENT_HEADER > b.len() {
                return Err("bucket entry runs past the block".into());
            }
            let mut r = R(b, at);
            let hash = r.u64();
            let ino = r.u64();
            let kind = b[at + 16];
            let len = b[at + 17] as usize;
            at += DIRENT_HEADER;
            if len == 0 || at + len > b.len() || ino == 0 || ino >= MAX_INO {
                return Err("bad bucket entry".into());
            }
            let name = b[at..at + len].to_vec();
            at += len;
            entries.push(Dirent {
                hash,
                ino,
                kind,
                name,
            });
        }
        Ok(Bucket { overflow, entries })
    }

    pub fn sort(&mut self) {
        self.entries.sort_by_key(|e| cookie_hash(e.hash));
    }
}

/// Xattr blobs: entries `[name length u8][value length u32 LE][name][value]`.
/// One xattr entry's position in a blob: (start, name range, value range).
pub type XEntry = (usize, std::ops::Range<usize>, std::ops::Range<usize>);

pub fn xattr_entries(b: &[u8]) -> impl Iterator<Item = Result<XEntry, String>> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= b.len() {
            return None;
        }
        let start = at;
        if b.len() - at < 5 {
            at = b.len();
            return Some(Err("truncated xattr header".into()));
        }
        let nl = b[at] as usize;
        let vl = u32::from_le_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]) as usize;
        let name = at + 5..at + 5 + nl;
        let value = name.end..name.end.saturating_add(vl);
        if nl == 0 || value.end > b.len() {
            at = b.len();
            return Some(Err("truncated xattr".into()));
        }
        at = value.end;
        Some(Ok((start, name, value)))
    })
}

pub fn check_xattrs(b: &[u8]) -> Result<(), String> {
    xattr_entries(b).try_for_each(|e| e.map(|_| ()))
}

pub fn xattr_entry(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + name.len() + value.len());
    out.push(name.len() as u8);
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn inode_roundtrip_and_layout() {
        let i = Inode {
            mode: libc::S_IFREG | 0o4755,
            uid: 7,
            gid: 8,
            nlink: 3,
            size: 1 << 36,
            rdev: 0x0801,
            atime: Ts { sec: -5, nsec: 9 },
            mtime: Ts { sec: 1, nsec: 2 },
            ctime: Ts { sec: 3, nsec: 4 },
            btime: Ts { sec: 5, nsec: 6 },
            generation: 11,
            parent: 1,
            xattr_len: 99,
        };
        let mut slot = [0u8; 256];
        i.encode_into(&mut slot);
        assert_eq!(Inode::decode(&slot), i);
        assert_eq!(inode_block(17), (INODE_BASE + 4096, 256));
        assert_eq!(orphan_bit(9), (ORPHAN_BASE, 1, 2));
        // The last inode's content span ends at the volume's end.
        assert_eq!(data_off(MAX_INO), strata_engine::TREE_VOLUME_SIZE);
    }

    #[test]
    fn timestamps_before_the_epoch() {
        for t in [
            Ts { sec: -1, nsec: 5 },
            Ts { sec: 0, nsec: 0 },
            Ts { sec: 12, nsec: 999 },
        ] {
            assert_eq!(Ts::from(t.to_system()), t);
        }
    }

    #[test]
    fn bucket_roundtrip_and_bad_input() {
        let mut b = Bucket {
            overflow: true,
            entries: vec![],
        };
        for (i, n) in ["a", "bb", &"x".repeat(255)].iter().enumerate() {
            b.entries.push(Dirent {
                hash: name_hash(n.as_bytes()),
                ino: i as u64 + 2,
                kind: 8,
                name: n.as_bytes().to_vec(),
            });
        }
        b.sort();
        let enc = b.encode();
        assert_eq!(Bucket::decode(&enc).unwrap(), b);
        let mut bad = enc.clone();
        bad[0] = 200; // more entries than the block holds
        assert!(Bucket::decode(&bad).is_err());
        assert!(Bucket::decode(&enc[..100]).is_err());
        let full = Bucket {
            overflow: false,
            entries: (0..14)
                .map(|i| Dirent {
                    hash: i,
                    ino: 2,
                    kind: 8,
                    name: vec![b'a'; 255],
                })
                .collect(),
        };
        assert!(!full.fits(255));
    }

    #[test]
    fn xattr_blobs() {
        let mut b = xattr_entry(b"user.a", b"1");
        b.extend(xattr_entry(b"security.selinux", &[7u8; 300]));
        let e: Vec<XEntry> = xattr_entries(&b).map(Result::unwrap).collect();
        assert_eq!(e.len(), 2);
        assert_eq!(&b[e[1].1.clone()], b"security.selinux");
        assert_eq!(b[e[1].2.clone()].len(), 300);
        assert!(check_xattrs(&b).is_ok());
        assert!(check_xattrs(&b[..b.len() - 1]).is_err());
        assert!(check_xattrs(&[0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn superblock() {
        let s = Super { next_ino: 2 };
        assert_eq!(Super::decode(&s.encode()).unwrap().unwrap(), s);
        assert!(Super::decode(&[0u8; 4096]).is_none());
        let mut b = s.encode();
        b[8] = 9;
        assert!(Super::decode(&b).unwrap().is_err());
    }
}
