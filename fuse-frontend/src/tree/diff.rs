//! `checkpoint diff` for trees: which paths differ between two versions of a tree.
//!
//! The engine's diff gives the block ranges that differ between the two maps (shared
//! subtrees skipped, so the cost follows the change, not the tree). Those ranges name the
//! inodes to look at: inode-table blocks (16 inodes each), xattr spans and content spans.
//! Each is read in both versions and classified; paths come from parent pointers and the
//! parents' directory entries.

use super::format::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use strata_engine::ByteRange;

/// One version of a tree: a checkpoint or the live volume.
pub use strata_engine::Source as Side;

/// Reading tree metadata from either version.
trait TreeRead {
    fn block(&self, off: u64) -> Result<Vec<u8>, String>;
    fn inode(&self, ino: u64) -> Result<Option<Inode>, String>;
    fn xattrs(&self, ino: u64, len: u32) -> Result<Vec<u8>, String>;
}

impl TreeRead for Side {
    fn block(&self, off: u64) -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; BS as usize];
        self.read_bytes(off, &mut b).map_err(|e| e.to_string())?;
        Ok(b)
    }

    /// The inode, or `None` when the slot is free or the inode has no link left.
    fn inode(&self, ino: u64) -> Result<Option<Inode>, String> {
        let (off, at) = inode_block(ino);
        let b = self.block(off)?;
        let i = Inode::decode(&b[at..at + INODE_SIZE as usize]);
        Ok((i.mode != 0 && i.nlink > 0).then_some(i))
    }

    fn xattrs(&self, ino: u64, len: u32) -> Result<Vec<u8>, String> {
        if u64::from(len) > XATTR_SPAN {
            return Err(format!("inode {ino} claims {len} bytes of xattrs"));
        }
        let mut b = vec![0u8; len as usize];
        self.read_bytes(xattr_off(ino), &mut b)
            .map_err(|e| e.to_string())?;
        Ok(b)
    }
}

/// What happened to a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    pub path: String,
    /// "added", "removed", "modified" (content or size), "metadata" (mode, owner, mtime,
    /// xattrs), "renamed" (content and metadata unchanged).
    pub change: &'static str,
    /// For a rename (or a changed file that also moved): its path in the first version.
    pub from: Option<String>,
}

struct Paths<'a> {
    side: &'a Side,
    /// Directory → (child → name), read on first use.
    dirs: HashMap<u64, HashMap<u64, Vec<u8>>>,
}

impl Paths<'_> {
    fn names(&mut self, dir: u64) -> Result<&HashMap<u64, Vec<u8>>, String> {
        if !self.dirs.contains_key(&dir) {
            let mut m = HashMap::new();
            let base = data_off(dir);
            let end = base + BUCKETS * BS;
            let mut at = base;
            while let Some(off) = self.side.next_data_before(at, end) {
                let blk = off - off % BS;
                let b = Bucket::decode(&self.side.block(blk)?)
                    .map_err(|e| format!("directory {dir}: {e}"))?;
                for e in b.entries {
                    m.entry(e.ino).or_insert(e.name);
                }
                at = blk + BS;
            }
            self.dirs.insert(dir, m);
        }
        Ok(&self.dirs[&dir])
    }

    fn path(&mut self, ino: u64) -> Result<String, String> {
        let mut parts: Vec<String> = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == ROOT_INO {
                parts.reverse();
                return Ok(format!("/{}", parts.join("/")));
            }
            let Some(i) = self.side.inode(cur)? else {
                break;
            };
            let name = self.names(i.parent)?.get(&cur).cloned();
            match name {
                Some(n) => parts.push(String::from_utf8_lossy(&n).into_owned()),
                // A hard link whose first directory no longer holds it.
                None => parts.push(format!("<inode {cur}>")),
            }
            cur = i.parent;
        }
        Ok(format!("<inode {ino}>"))
    }
}

/// What a set of changed byte ranges touches (for a diff, and for what a restore must
/// invalidate).
#[derive(Default)]
pub(super) struct Touched {
    /// Every inode whose slot, xattrs or content a range covers (inode 0 excluded).
    pub inodes: BTreeSet<u64>,
    /// Inodes whose content a range covers → the covered block ranges (first, last) among
    /// the first `BUCKETS` blocks of the span (a directory's buckets).
    pub content: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Inodes whose xattr span a range covers.
    pub xattrs: BTreeSet<u64>,
}

impl Touched {
    pub(super) fn of(ranges: &[ByteRange]) -> Touched {
        let mut t = Touched::default();
        for r in ranges.iter().filter(|r| r.len > 0) {
            let (start, end) = (r.offset, r.offset.saturating_add(r.len));
            let span = |base: u64, shift: u64| {
                let first = (start.max(base) - base) / shift;
                let last = ((end - 1).saturating_sub(base) / shift).min(MAX_INO - 1);
                first..=last.min(first + 1_000_000)
            };
            if end > DATA_BASE {
                for ino in span(DATA_BASE, DATA_SPAN) {
                    t.inodes.insert(ino);
                    let base = data_off(ino);
                    let (lo, hi) = (start.max(base), end.min(base + BUCKETS * BS));
                    let blocks = t.content.entry(ino).or_default();
                    if lo < hi {
                        blocks.push(((lo - base) / BS, (hi - 1 - base) / BS));
                    }
                }
            } else if end > XATTR_BASE {
                for ino in span(XATTR_BASE, XATTR_SPAN) {
                    t.inodes.insert(ino);
                    t.xattrs.insert(ino);
                }
            } else if end > INODE_BASE && start < ORPHAN_BASE {
                let lo = start.max(INODE_BASE);
                let hi = end.min(ORPHAN_BASE);
                let first = (lo - INODE_BASE) / INODE_SIZE;
                let last = (hi - 1 - INODE_BASE) / INODE_SIZE;
                t.inodes.extend(first..=last.min(MAX_INO - 1));
            }
        }
        t.inodes.remove(&0);
        t
    }
}

/// Paths that differ from `a` to `b`, sorted by path.
pub fn diff(a: &Side, b: &Side, ranges: &[ByteRange]) -> Result<Vec<PathChange>, String> {
    let Touched {
        inodes: all,
        content,
        xattrs: xattr,
    } = Touched::of(ranges);
    let mut pa = Paths {
        side: a,
        dirs: HashMap::new(),
    };
    let mut pb = Paths {
        side: b,
        dirs: HashMap::new(),
    };
    let mut out = Vec::new();
    for ino in all {
        if ino == ROOT_INO {
            continue;
        }
        let (ia, ib) = (a.inode(ino)?, b.inode(ino)?);
        match (ia, ib) {
            (None, None) => {}
            (None, Some(_)) => out.push(PathChange {
                path: pb.path(ino)?,
                change: "added",
                from: None,
            }),
            (Some(_), None) => out.push(PathChange {
                path: pa.path(ino)?,
                change: "removed",
                from: None,
            }),
            (Some(x), Some(y)) if x.generation != y.generation || x.btime != y.btime => {
                out.push(PathChange {
                    path: pa.path(ino)?,
                    change: "removed",
                    from: None,
                });
                out.push(PathChange {
                    path: pb.path(ino)?,
                    change: "added",
                    from: None,
                });
            }
            (Some(x), Some(y)) => {
                let dir = y.is_dir();
                let data = !dir && (content.contains_key(&ino) || x.size != y.size);
                let xattrs = xattr.contains(&ino)
                    && (x.xattr_len != y.xattr_len
                        || a.xattrs(ino, x.xattr_len)? != b.xattrs(ino, y.xattr_len)?);
                let meta = x.mode != y.mode
                    || x.uid != y.uid
                    || x.gid != y.gid
                    || xattrs
                    || (!dir && x.mtime != y.mtime);
                let (from, to) = (pa.path(ino)?, pb.path(ino)?);
                let moved = from != to;
                let change = if data {
                    "modified"
                } else if meta {
                    "metadata"
                } else if moved {
                    "renamed"
                } else {
                    continue;
                };
                out.push(PathChange {
                    path: to,
                    change,
                    from: moved.then_some(from),
                });
            }
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path).then(x.change.cmp(y.change)));
    Ok(out)
}
