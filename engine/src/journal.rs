//! The map journal: one 64-byte entry per extent change since the last commit.
//!
//! Data records reach the segment files before their write is acknowledged, but the extent
//! map reaches RocksDB only at a commit. The journal bridges the two: each acknowledged write
//! has appended its entry (a plain `pwrite`, no sync), so a process crash loses nothing that
//! was acknowledged. After a power cut, entries and data may be torn or missing; replay keeps
//! only entries whose own checksum and whose data's checksum verify, so a block comes back
//! old or new, never garbage. Every commit starts a new journal file; files older than the
//! last durable commit are deleted.
//!
//! A flush makes the journal durable instead of committing (docs/design/durability.md,
//! "Flush"): it syncs the data segments and every journal file not yet covered by a
//! durable commit, and the journal directory once per new file.

use crate::codec::{JournalEntry, JOURNAL_ENTRY_SIZE};
use crate::io::{IoEngine, IoFile, Op};
use crate::{Error, Result};
use parking_lot::{Mutex, RwLock};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct JournalFile {
    pub generation: u64,
    pub file: Arc<IoFile>,
    next_offset: AtomicU64,
    /// Its directory entry is durable (the directory was synced after it was created).
    dir_synced: AtomicBool,
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    engine: Arc<dyn IoEngine>,
    current: RwLock<Arc<JournalFile>>,
    /// Files whose entries no durable commit covers yet (the current one, and older ones
    /// until the commit that rotated away from them is durable).
    live: Mutex<Vec<Arc<JournalFile>>>,
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal-{generation:016x}.log"))
}

fn parse_journal_name(name: &str) -> Option<u64> {
    u64::from_str_radix(name.strip_prefix("journal-")?.strip_suffix(".log")?, 16).ok()
}

/// What an existing journal directory held.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Intact entries, in sequence order.
    pub entries: Vec<JournalEntry>,
    pub next_generation: u64,
}

impl Journal {
    /// Reads every journal file in `dir` (for replay) and starts a new one after them.
    pub fn open(dir: &Path, engine: Arc<dyn IoEngine>) -> Result<(Self, Recovered)> {
        let mut rec = Recovered {
            entries: Vec::new(),
            next_generation: 1,
        };
        let listing = std::fs::read_dir(dir).map_err(|e| Error::io("listing journal", e))?;
        for ent in listing {
            let ent = ent.map_err(|e| Error::io("listing journal", e))?;
            let Some(generation) = ent.file_name().to_str().and_then(parse_journal_name) else {
                continue;
            };
            rec.next_generation = rec.next_generation.max(generation + 1);
            let bytes = std::fs::read(ent.path()).map_err(|e| Error::io("reading journal", e))?;
            rec.entries.extend(
                bytes
                    .chunks_exact(JOURNAL_ENTRY_SIZE)
                    .filter_map(JournalEntry::decode),
            );
        }
        rec.entries.sort_by_key(|e| e.seq);
        let current = Self::create(dir, &engine, rec.next_generation)?;
        let j = Journal {
            dir: dir.to_path_buf(),
            engine,
            live: Mutex::new(vec![current.clone()]),
            current: RwLock::new(current),
        };
        Ok((j, rec))
    }

    fn create(dir: &Path, engine: &Arc<dyn IoEngine>, generation: u64) -> Result<Arc<JournalFile>> {
        let file = engine
            .open(&journal_path(dir, generation), true)
            .map_err(|e| Error::io("creating journal", e))?;
        Ok(Arc::new(JournalFile {
            generation,
            file,
            next_offset: AtomicU64::new(0),
            dir_synced: AtomicBool::new(false),
        }))
    }

    /// Reserves room for `n` entries in the current file. Called under the store's write gate
    /// so that reservation order matches commit snapshots.
    pub fn reserve(&self, n: usize) -> (Arc<JournalFile>, u64) {
        let cur = self.current.read().clone();
        let off = cur
            .next_offset
            .fetch_add((n * JOURNAL_ENTRY_SIZE) as u64, Ordering::Relaxed);
        (cur, off)
    }

    /// The write op for reserved entries.
    pub fn write_op(file: &JournalFile, offset: u64, entries: &[JournalEntry]) -> Op<'static> {
        let mut buf = Vec::with_capacity(entries.len() * JOURNAL_ENTRY_SIZE);
        for e in entries {
            buf.extend_from_slice(&e.encode());
        }
        Op::Write {
            file: file.file.clone(),
            offset,
            buf: crate::io::Data::Owned(buf),
        }
    }

    /// Starts a new journal file; returns the generation every later entry goes to.
    pub fn rotate(&self) -> Result<u64> {
        let next = self.current.read().generation + 1;
        let file = Self::create(&self.dir, &self.engine, next)?;
        self.live.lock().push(file.clone());
        *self.current.write() = file;
        Ok(next)
    }

    /// The files a flush must sync: every one no durable commit covers yet.
    pub fn live_files(&self) -> Vec<Arc<JournalFile>> {
        self.live.lock().clone()
    }

    /// Makes the directory entries of `files` durable (one directory sync for any number
    /// of new files; nothing when every one was synced already).
    pub fn sync_dir(&self, files: &[Arc<JournalFile>]) -> Result<()> {
        if files.iter().all(|f| f.dir_synced.load(Ordering::Acquire)) {
            return Ok(());
        }
        self.engine
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("syncing the journal directory", e))?;
        for f in files {
            f.dir_synced.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Deletes journal files older than `generation` (their entries are committed).
    pub fn remove_before(&self, generation: u64) -> Result<()> {
        self.live.lock().retain(|f| f.generation >= generation);
        let listing = std::fs::read_dir(&self.dir).map_err(|e| Error::io("listing journal", e))?;
        for ent in listing.flatten() {
            if let Some(g) = ent.file_name().to_str().and_then(parse_journal_name) {
                if g < generation {
                    self.engine
                        .remove(&ent.path())
                        .map_err(|e| Error::io("removing journal", e))?;
                }
            }
        }
        Ok(())
    }
}
