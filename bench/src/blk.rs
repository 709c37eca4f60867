//! A libblkio (`virtio-blk-vhost-user`) client of a vhost-user-blk export: what the
//! benchmarks and the QoS test drive exports with, no guest kernel in between.

use crate::R;
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

/// One libblkio connection with a shared-memory buffer area.
#[allow(missing_debug_implementations)]
pub struct Client {
    _blkio: Blkio,
    q: Blkioq,
    base: *mut u8,
    pub capacity: u64,
}

/// Bytes of one request buffer (the largest request).
pub const SLOT: usize = 1 << 20;
/// Request buffers: the deepest queue.
pub const SLOTS: usize = 32;

impl Client {
    pub fn connect(socket: &Path) -> R<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().ok_or("path")?)?;
        b.connect()?;
        b.set_i32("num-queues", 1)?;
        let mut started = b.start()?;
        let q = started.queues.pop().ok_or("no queue")?;
        let region = b.alloc_mem_region(SLOT * SLOTS)?;
        b.map_mem_region(&region)?;
        let capacity = b.get_u64("capacity")?;
        Ok(Client {
            base: region.addr as *mut u8,
            _blkio: b,
            q,
            capacity,
        })
    }

    /// Keeps `depth` requests of `bs` bytes in flight for `secs`; returns ops per second
    /// (for writes, counted to the completion of a FLUSH issued after the last write, and
    /// to the last write).
    pub fn run(
        &mut self,
        write: bool,
        random: bool,
        bs: usize,
        depth: usize,
        secs: f64,
    ) -> R<Rate> {
        Ok(self.run_timed(write, random, bs, depth, secs)?.0)
    }

    /// Like `run`, also returning every request's latency.
    pub fn run_timed(
        &mut self,
        write: bool,
        random: bool,
        bs: usize,
        depth: usize,
        secs: f64,
    ) -> R<(Rate, Vec<Duration>)> {
        let blocks = self.capacity / bs as u64;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut seq = 0u64;
        let mut next = |_: usize| {
            if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % blocks) * bs as u64
            } else {
                let at = seq;
                seq = (seq + 1) % blocks;
                at * bs as u64
            }
        };
        let submit = |q: &mut Blkioq, slot: usize, off: u64, base: *mut u8| {
            // SAFETY: slot < SLOTS and bs <= SLOT, so the buffer lies inside the mapped region,
            // which lives as long as `self`; each slot has at most one request in flight.
            let buf = unsafe { base.add(slot * SLOT) };
            if write {
                q.write(off, buf, bs, slot, ReqFlags::empty());
            } else {
                q.read(off, buf, bs, slot, ReqFlags::empty());
            }
        };
        let mut issued_at = vec![Instant::now(); depth];
        let mut lat = Vec::new();
        let start = Instant::now();
        for (slot, at) in issued_at.iter_mut().enumerate() {
            *at = Instant::now();
            submit(&mut self.q, slot, next(slot), self.base);
        }
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        let mut done = 0u64;
        let mut inflight = depth;
        let mut stopping = false;
        while inflight > 0 {
            let n = self.q.do_io(&mut comps, 1, None, None)?;
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_read() };
                if c.ret != 0 {
                    return Err(format!("request failed: {}", c.ret).into());
                }
                done += 1;
                inflight -= 1;
                let slot = c.user_data;
                lat.push(issued_at[slot].elapsed());
                stopping |= start.elapsed().as_secs_f64() >= secs;
                if !stopping {
                    issued_at[slot] = Instant::now();
                    submit(&mut self.q, slot, next(slot), self.base);
                    inflight += 1;
                }
            }
        }
        let unflushed = done as f64 / start.elapsed().as_secs_f64();
        if write {
            self.flush()?;
        }
        let rate = Rate {
            unflushed,
            flushed: done as f64 / start.elapsed().as_secs_f64(),
        };
        Ok((rate, lat))
    }

    /// The first request buffer (what [`Client::io_at`] writes from and reads into).
    pub fn buffer(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= SLOT);
        // SAFETY: slot 0 is SLOT bytes inside the mapped region, which lives as long as
        // `self`; no request is in flight while the caller holds this borrow.
        unsafe { std::slice::from_raw_parts_mut(self.base, len) }
    }

    /// One request of `len` bytes at `offset` from (write) or into (read) the first buffer,
    /// waited for; returns its result (0, or a negative errno such as -EIO for a device
    /// IOERR) instead of failing on it.
    pub fn io_at(&mut self, write: bool, offset: u64, len: usize) -> R<i32> {
        assert!(len <= SLOT);
        if write {
            self.q.write(offset, self.base, len, 0, ReqFlags::empty());
        } else {
            self.q.read(offset, self.base, len, 0, ReqFlags::empty());
        }
        self.complete_one()
    }

    /// One FLUSH, waited for; its result as [`Client::io_at`]'s.
    pub fn try_flush(&mut self) -> R<i32> {
        self.q.flush(usize::MAX, ReqFlags::empty());
        self.complete_one()
    }

    /// One FLUSH, waited for.
    pub fn flush(&mut self) -> R<()> {
        match self.try_flush()? {
            0 => Ok(()),
            _ => Err("flush failed".into()),
        }
    }

    /// Waits for the one request in flight; its result (0 or a negative errno).
    fn complete_one(&mut self) -> R<i32> {
        let mut comps: Vec<MaybeUninit<Completion>> = vec![MaybeUninit::uninit()];
        let n = self.q.do_io(&mut comps, 1, None, None)?;
        if n != 1 {
            return Err("no completion".into());
        }
        // SAFETY: do_io initialised the first n completions.
        Ok(unsafe { comps[0].assume_init_read() }.ret)
    }

    /// Writes the whole disk once with 1 MiB requests at QD8, then one FLUSH; MiB/s to the
    /// flush's completion.
    pub fn pass(&mut self, tag: u8) -> R<f64> {
        let blocks = self.capacity / SLOT as u64;
        for i in 0..8 {
            // SAFETY: each slot is SLOT bytes inside the mapped region.
            unsafe { std::ptr::write_bytes(self.base.add(i * SLOT), tag ^ i as u8, SLOT) };
        }
        let t = Instant::now();
        let mut issued = 0u64;
        let mut inflight = 0usize;
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..8).map(|_| MaybeUninit::uninit()).collect();
        while issued < blocks || inflight > 0 {
            while issued < blocks && inflight < 8 {
                let slot = (issued % 8) as usize;
                // SAFETY: as in `run`.
                let buf = unsafe { self.base.add(slot * SLOT) };
                self.q
                    .write(issued * SLOT as u64, buf, SLOT, slot, ReqFlags::empty());
                issued += 1;
                inflight += 1;
            }
            let n = self.q.do_io(&mut comps, 1, None, None)?;
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                if unsafe { c.assume_init_read() }.ret != 0 {
                    return Err("fill write failed".into());
                }
            }
            inflight -= n;
        }
        self.flush()?;
        Ok(blocks as f64 / t.elapsed().as_secs_f64())
    }
}

/// A shape's rate to its last request, and (for writes) to the FLUSH after it.
#[derive(Default, Clone, Copy, Debug)]
pub struct Rate {
    pub unflushed: f64,
    pub flushed: f64,
}
