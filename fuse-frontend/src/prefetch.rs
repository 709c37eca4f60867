//! Read-ahead for sequential direct-IO readers of the live volume's file.
//!
//! The kernel's page cache reads ahead for buffered readers; an `O_DIRECT` reader (a VM using
//! the image with `cache=none`, a backup tool) sends one request at a time, and each waits for
//! the engine read. When reads of the live volume follow each other (a read starts where the
//! previous one ended), a prefetch thread reads the next range of the same length while the
//! current one travels back to the reader; the next request is then served from memory.
//!
//! Consistency: every change to the volume (write, unmap, grow, restore) bumps a generation
//! number *after* it completes. A prefetch records the generation before it starts reading,
//! and its data is served only if the generation is still the same when a reader takes it, so
//! a prefetch that raced with a change is thrown away, never served.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Weak;
use strata_engine::Volume;

/// Smallest read that starts read-ahead: small reads are random IO more often than not.
const MIN_PREFETCH: usize = 128 << 10;

#[derive(Debug)]
enum Slot {
    Empty,
    /// A prefetch of `offset..offset+len` is running.
    Loading {
        offset: u64,
        len: usize,
    },
    Ready {
        offset: u64,
        data: Vec<u8>,
        gen: u64,
    },
}

#[derive(Debug)]
pub(crate) struct Prefetcher {
    gen: AtomicU64,
    /// Where the last read of the volume ended (`u64::MAX`: none yet).
    last_end: AtomicU64,
    slot: Mutex<Slot>,
    loaded: Condvar,
    jobs: Mutex<Option<Sender<(u64, usize)>>>,
    /// The buffer of the last prefetch served, for the next one: a fresh 1 MiB buffer per
    /// prefetch would cost an mmap, page faults and an munmap every time.
    spare: Mutex<Vec<u8>>,
}

impl Prefetcher {
    pub(crate) fn new() -> Self {
        Prefetcher {
            gen: AtomicU64::new(0),
            last_end: AtomicU64::new(u64::MAX),
            slot: Mutex::new(Slot::Empty),
            loaded: Condvar::new(),
            jobs: Mutex::new(None),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Starts the prefetch thread. It holds `owner` weakly and ends when the owner (and with
    /// it the job queue) is gone.
    pub(crate) fn start<T: Send + Sync + 'static>(
        &self,
        owner: Weak<T>,
        parts: fn(&T) -> (&Prefetcher, &Volume),
    ) {
        let (tx, rx) = channel::<(u64, usize)>();
        let spawned = std::thread::Builder::new()
            .name("strata-fuse-ra".into())
            .spawn(move || {
                while let Ok((offset, len)) = rx.recv() {
                    let Some(owner) = owner.upgrade() else {
                        return;
                    };
                    let (p, vol) = parts(&owner);
                    p.load(vol, offset, len);
                }
            });
        match spawned {
            Ok(_) => *self.jobs.lock() = Some(tx),
            // Without the thread reads are simply not prefetched.
            Err(e) => tracing::warn!(error = %e, "no read-ahead thread for the FUSE export"),
        }
    }

    /// The volume changed (call after the change completed): prefetched data is stale.
    pub(crate) fn invalidate(&self) {
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    fn load(&self, vol: &Volume, offset: u64, len: usize) {
        let gen = self.gen.load(Ordering::Acquire);
        let mut data = std::mem::take(&mut *self.spare.lock());
        data.resize(len, 0);
        let ok = vol.read_bytes(offset, &mut data).is_ok();
        let mut slot = self.slot.lock();
        if matches!(*slot, Slot::Loading { offset: o, .. } if o == offset) {
            // A failed prefetch leaves nothing: the reader reads (and reports) it itself.
            *slot = if ok {
                Slot::Ready { offset, data, gen }
            } else {
                Slot::Empty
            };
        }
        self.loaded.notify_all();
    }

    /// Gives back the buffer [`Prefetcher::take`] returned, once its bytes were sent.
    pub(crate) fn recycle(&self, buf: Vec<u8>) {
        *self.spare.lock() = buf;
    }

    /// Serves `offset..offset+len` from a prefetch if one covers it exactly and is still
    /// current (waiting for one that is running), else returns `None`.
    pub(crate) fn take(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut slot = self.slot.lock();
        loop {
            match &*slot {
                Slot::Loading { offset: o, len: l } if *o == offset && *l == len => {
                    // Bounded: should the prefetch thread be gone, the reader reads itself.
                    if self
                        .loaded
                        .wait_for(&mut slot, std::time::Duration::from_secs(1))
                        .timed_out()
                    {
                        return None;
                    }
                }
                Slot::Ready {
                    offset: o,
                    data,
                    gen,
                } if *o == offset
                    && data.len() == len
                    && *gen == self.gen.load(Ordering::Acquire) =>
                {
                    let Slot::Ready { data, .. } = std::mem::replace(&mut *slot, Slot::Empty)
                    else {
                        return None;
                    };
                    return Some(data);
                }
                _ => return None,
            }
        }
    }

    /// Records a read of `offset..offset+len` of a volume of `size` bytes; when it continues
    /// the previous one, queues a prefetch of the range after it.
    pub(crate) fn note_read(&self, offset: u64, len: usize, size: u64) {
        let end = offset + len as u64;
        let sequential = self.last_end.swap(end, Ordering::AcqRel) == offset;
        if !sequential || len < MIN_PREFETCH || end >= size {
            return;
        }
        let next = (size - end).min(len as u64) as usize;
        {
            let mut slot = self.slot.lock();
            if matches!(*slot, Slot::Loading { .. }) {
                return;
            }
            *slot = Slot::Loading {
                offset: end,
                len: next,
            };
        }
        let queued = self
            .jobs
            .lock()
            .as_ref()
            .is_some_and(|tx| tx.send((end, next)).is_ok());
        if !queued {
            *self.slot.lock() = Slot::Empty;
            self.loaded.notify_all();
        }
    }
}
