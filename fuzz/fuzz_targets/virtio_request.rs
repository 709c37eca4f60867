#![no_main]
//! Descriptor walking and virtio-blk request handling on guest-controlled bytes: the input
//! becomes a descriptor table (addresses, lengths, flags, next indices), the available ring,
//! and the contents of guest memory (headers, discard segments). The device must never panic
//! and must return every chain it takes.

use libfuzzer_sys::fuzz_target;
use parking_lot::Mutex;
use strata_block::request::{drain_queue, Limits};
use strata_block::{Disk, DiskError};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE: u16 = 16;
const DISK: u64 = 256 * 1024;

struct MemDisk(Mutex<Vec<u8>>);

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        DISK
    }
    fn id(&self) -> &str {
        "fuzz"
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let d = self.0.lock();
        let end = usize::try_from(offset).map_err(|_| DiskError)? + buf.len();
        buf.copy_from_slice(d.get(offset as usize..end).ok_or(DiskError)?);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let mut d = self.0.lock();
        let end = usize::try_from(offset).map_err(|_| DiskError)? + data.len();
        d.get_mut(offset as usize..end).ok_or(DiskError)?.copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let mut d = self.0.lock();
        let (s, e) = (usize::try_from(offset).map_err(|_| DiskError)?, usize::try_from(offset + len).map_err(|_| DiskError)?);
        d.get_mut(s..e).ok_or(DiskError)?.fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.discard(offset, len)
    }
}

fn word(data: &[u8], at: usize, n: usize) -> u64 {
    let mut v = 0u64;
    for i in 0..n {
        v |= u64::from(*data.get(at + i).unwrap_or(&0)) << (8 * i);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)]).unwrap();
    let mock = MockSplitQueue::new(&mem, QUEUE);
    // 16 descriptors of 16 bytes each, then avail entries, then guest memory contents.
    for i in 0..QUEUE as usize {
        let at = i * 16;
        // Keep most addresses inside memory so requests get past the walk, but allow any.
        let raw_addr = word(data, at, 8);
        let addr = if raw_addr & (1 << 63) != 0 { raw_addr } else { 0x4000 + (raw_addr % 0x1_c000) };
        let len = word(data, at + 8, 4) as u32;
        let flags = word(data, at + 12, 2) as u16 & 0x7;
        let next = word(data, at + 14, 2) as u16;
        let _ = mock.desc_table().store(i as u16, RawDescriptor::from(Descriptor::new(addr, len, flags, next)));
    }
    let base = QUEUE as usize * 16;
    let n = (word(data, base, 1) % u64::from(QUEUE + 1)) as u16;
    for i in 0..n {
        let head = word(data, base + 1 + i as usize, 1) as u16 % QUEUE;
        let _ = mock.avail().ring().ref_at(i as usize).map(|r| r.store(head));
    }
    mock.avail().idx().store(n);
    let payload = data.get(base + 1 + QUEUE as usize..).unwrap_or(&[]);
    let _ = mem.write_slice(&payload[..payload.len().min(0x1_c000)], GuestAddress(0x4000));
    let Ok(mut q): Result<Queue, _> = mock.create_queue() else { return };
    let disk = MemDisk(Mutex::new(vec![0; DISK as usize]));
    let ro = data.first().is_some_and(|b| b & 1 == 1);
    if let Ok(out) = drain_queue(&disk, Limits { read_only: ro }, &mut q, &mem) {
        assert_eq!(out.len(), n as usize, "every available chain is taken and returned");
    }
});
