//! `checkpoint diff` for trees: which paths differ between two versions of a tree.
//!
//! The engine's diff gives the block ranges that differ between the two maps (shared
//! subtrees skipped, so the cost follows the change, not the tree). Those ranges name the
//! inodes to look at: inode-table blocks (16 inodes each), xattr spans and content spans.
//! Each is read in both versions and classified; paths come from parent pointers and the
//! parents' directory entries.

use super::format::*;
use std::collections::{BTreeSet, HashMap};
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

/// The inodes a set of changed byte ranges touches: (all candidates, content changed,
/// xattrs changed).
fn touched(ranges: &[ByteRange]) -> (BTreeSet<u64>, BTreeSet<u64>, BTreeSet<u64>) {
    let (mut all, mut content, mut xattr) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for r in ranges {
        let (start, end) = (r.offset, r.offset + r.len);
        let span = |base: u64, shift: u64, set: &mut BTreeSet<u64>, all: &mut BTreeSet<u64>| {
            let lo = start.max(base);
            let first = (lo - base) / shift;
            let last = ((end - 1).saturating_sub(base) / shift).min(MAX_INO - 1);
            for ino in first..=last.min(first + 1_000_000) {
                set.insert(ino);
                all.insert(ino);
            }
        };
        if end > DATA_BASE {
            span(DATA_BASE, DATA_SPAN, &mut content, &mut all);
        } else if end > XATTR_BASE {
            span(XATTR_BASE, XATTR_SPAN, &mut xattr, &mut all);
        } else if end > INODE_BASE && start < ORPHAN_BASE {
            let lo = start.max(INODE_BASE);
            let hi = end.min(ORPHAN_BASE);
            let first = (lo - INODE_BASE) / INODE_SIZE;
            let last = (hi - 1 - INODE_BASE) / INODE_SIZE;
            all.extend(first..=last.min(MAX_INO - 1));
        }
    }
    all.remove(&0);
    (all, content, xattr)
}

/// Paths that differ from `a` to `b`, sorted by path.
pub fn diff(a: &Side, b: &Side, ranges: &[ByteRange]) -> Result<Vec<PathChange>, String> {
    let (all, content, xattr) = touched(ranges);
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
                let data = !dir && (content.contains(&ino) || x.size != y.size);
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
