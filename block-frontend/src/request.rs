//! virtio-blk requests: walk one descriptor chain, execute it against a [`Disk`], write the
//! status byte. Nothing here knows about vhost-user; it works on any guest memory and queue,
//! so it is tested with mock queues and fuzzed directly.
//!
//! Every field of a chain is untrusted. The chain walk is bounded by the queue size (loops end
//! there), addresses are checked against guest memory by `Reader`/`Writer` (buffers spanning
//! two memory regions are split, not assumed contiguous), lengths are bounded before anything
//! is allocated, and a request that cannot be served gets IOERR or UNSUPP — every chain is
//! returned to the used ring, so a bad request never stalls the queue.

use crate::disk::Disk;
use virtio_queue::{DescriptorChain, Reader, Writer};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

pub const SECTOR: u64 = 512;
/// Largest data payload of one request; see `config.rs` for the limits advertised to guests.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest number of discard / write-zeroes segments in one request.
pub const MAX_DISCARD_SEGMENTS: usize = 1;
/// Bytes of the serial number GET_ID returns.
pub const ID_BYTES: usize = 20;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// The status byte a request completes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
}

/// What one request did, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub kind: u32,
    pub bytes: u64,
    pub status: Option<u8>,
    /// Time from taking the chain off the ring to returning it.
    pub latency: std::time::Duration,
    /// Bytes a read wrote straight into guest memory.
    pub in_place: u64,
}

/// The guest memory and chain a request's data buffers are found in.
struct Guest<'a, T> {
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<T>,
}

impl<T> Guest<'_, T>
where
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    /// The data buffers of the chain: for a read (`write`: the device writes them) the first
    /// `len` bytes of the writable descriptors, for a write the `len` bytes of the readable
    /// descriptors after the 16-byte header. `None` if the chain does not hold them (the
    /// reader and writer built from the same chain already checked every address).
    fn buffers(&self, write: bool, len: usize) -> Option<Vec<VolatileSlice<'_>>> {
        let (descs, perm, mut skip): (Vec<_>, _, usize) = if write {
            (
                self.chain.clone().writable().collect(),
                Permissions::Write,
                0,
            )
        } else {
            (
                self.chain.clone().readable().collect(),
                Permissions::Read,
                16,
            )
        };
        let mut left = len;
        let mut out = Vec::new();
        for d in descs {
            if left == 0 {
                break;
            }
            for slice in self.mem.get_slices(d.addr(), d.len() as usize, perm).ok()? {
                let mut vs = slice.ok()?;
                if skip > 0 {
                    let n = skip.min(vs.len());
                    vs = vs.offset(n).ok()?;
                    skip -= n;
                }
                let n = left.min(vs.len());
                if n == 0 {
                    continue;
                }
                out.push(vs.subslice(0, n).ok()?);
                left -= n;
            }
        }
        (left == 0).then_some(out)
    }
}

/// Per-device settings a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub read_only: bool,
}

/// The request type of a chain and the data bytes it moves (for the volume's limits), read
/// without serving it; `None` for a malformed chain (serving it answers IOERR).
pub fn peek<T>(chain: &DescriptorChain<T>, mem: &GuestMemoryMmap) -> Option<(u32, u64)>
where
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let mut reader = Reader::<()>::new(mem, chain.clone()).ok()?;
    let (kind, _) = header(&mut reader)?;
    let bytes = match kind {
        VIRTIO_BLK_T_IN => Writer::<()>::new(mem, chain.clone())
            .ok()?
            .available_bytes()
            .saturating_sub(1),
        VIRTIO_BLK_T_OUT => reader.available_bytes(),
        _ => 0,
    };
    Some((kind, bytes as u64))
}

/// Serves one chain. Returns the number of bytes written into guest memory (the used-ring
/// length) and what happened.
pub fn handle_chain<T>(
    disk: &dyn Disk,
    limits: Limits,
    chain: DescriptorChain<T>,
    mem: &GuestMemoryMmap,
) -> (u32, Outcome)
where
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    // The status is the last writable byte; without one there is nothing to report into.
    let Ok(mut data_writer) = Writer::<()>::new(mem, chain.clone()) else {
        // Some writable buffer lies outside guest memory; still report IOERR in the last
        // writable byte if that one is valid.
        let last = chain.writable().last();
        let status_addr =
            last.and_then(|d| d.addr().checked_add(u64::from(d.len()).checked_sub(1)?));
        if let Some(addr) = status_addr {
            if mem.write_obj(Status::IoErr as u8, addr).is_ok() {
                return (
                    1,
                    Outcome {
                        status: Some(Status::IoErr as u8),
                        ..Default::default()
                    },
                );
            }
        }
        return (0, Outcome::default());
    };
    let writable = data_writer.available_bytes();
    if writable == 0 {
        return (0, Outcome::default());
    }
    let Ok(mut status_writer) = data_writer.split_at(writable - 1) else {
        return (0, Outcome::default());
    };
    let guest = Guest {
        mem,
        chain: chain.clone(),
    };
    let (status, mut outcome) = match Reader::<()>::new(mem, chain) {
        Ok(mut reader) => execute(disk, limits, &guest, &mut reader, &mut data_writer),
        Err(_) => (Status::IoErr, Outcome::default()),
    };
    outcome.status = Some(status as u8);
    // Reads fill guest memory in place, not through the writer: count them here.
    let written = data_writer.bytes_written() + outcome.in_place as usize;
    if status_writer.write_obj(status as u8).is_err() {
        return (written as u32, outcome);
    }
    ((written + 1) as u32, outcome)
}

/// Serves every chain available in `queue`, returning each to the used ring. Returns what
/// each request did, in order.
pub fn drain_queue(
    disk: &dyn Disk,
    limits: Limits,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Outcome>, virtio_queue::Error> {
    let mut out = Vec::new();
    while let Some(outcome) = serve_next(disk, limits, queue, mem)? {
        out.push(outcome);
    }
    Ok(out)
}

/// Serves the next available chain, if any, and puts it on the used ring (the caller
/// decides when to notify the driver).
pub fn serve_next(
    disk: &dyn Disk,
    limits: Limits,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<Outcome>, virtio_queue::Error> {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Ok(None);
    };
    let start = std::time::Instant::now();
    let head = chain.head_index();
    let (len, mut outcome) = handle_chain(disk, limits, chain, mem);
    queue.add_used(mem, head, len)?;
    outcome.latency = start.elapsed();
    Ok(Some(outcome))
}

fn header(reader: &mut Reader<'_>) -> Option<(u32, u64)> {
    let h: [u8; 16] = reader.read_obj().ok()?;
    let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    Some((kind, sector))
}

/// Byte range of `len` bytes at `sector`, if it lies inside the disk.
fn range(disk: &dyn Disk, sector: u64, len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR)?;
    (offset.checked_add(len)? <= disk.size()).then_some(offset)
}

fn execute<T>(
    disk: &dyn Disk,
    limits: Limits,
    guest: &Guest<'_, T>,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
) -> (Status, Outcome)
where
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let Some((kind, sector)) = header(reader) else {
        return (Status::IoErr, Outcome::default());
    };
    let mut out = Outcome {
        kind,
        ..Default::default()
    };
    let writes = matches!(
        kind,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    if writes && limits.read_only {
        return (Status::IoErr, out);
    }
    // Buffers must point the way the request type needs: data the device reads for writes,
    // data the device writes for reads. Anything else is a malformed chain.
    let wrong_direction = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => reader.available_bytes() != 0,
        VIRTIO_BLK_T_OUT
        | VIRTIO_BLK_T_FLUSH
        | VIRTIO_BLK_T_DISCARD
        | VIRTIO_BLK_T_WRITE_ZEROES => writer.available_bytes() != 0,
        _ => false,
    };
    if wrong_direction {
        return (Status::IoErr, out);
    }
    let status = match kind {
        VIRTIO_BLK_T_IN => read(disk, sector, guest, writer, &mut out),
        VIRTIO_BLK_T_OUT => write(disk, sector, guest, reader, &mut out),
        VIRTIO_BLK_T_FLUSH => ok_or_ioerr(disk.flush()),
        VIRTIO_BLK_T_GET_ID => {
            let id = disk.id();
            let mut bytes = [0u8; ID_BYTES];
            let n = id.len().min(ID_BYTES);
            bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
            let n = writer.available_bytes().min(ID_BYTES);
            ok_or_ioerr(std::io::Write::write_all(writer, &bytes[..n]).map_err(|_| ()))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => unmap(disk, kind, reader),
        _ => Status::Unsupp,
    };
    (status, out)
}

fn ok_or_ioerr<E>(r: Result<(), E>) -> Status {
    if r.is_ok() {
        Status::Ok
    } else {
        Status::IoErr
    }
}

fn data_len(n: usize) -> Option<usize> {
    (n <= MAX_REQUEST_BYTES && (n as u64).is_multiple_of(SECTOR)).then_some(n)
}

fn read<T>(
    disk: &dyn Disk,
    sector: u64,
    guest: &Guest<'_, T>,
    writer: &Writer<'_>,
    out: &mut Outcome,
) -> Status
where
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let Some(len) = data_len(writer.available_bytes()) else {
        return Status::IoErr;
    };
    let Some(offset) = range(disk, sector, len as u64) else {
        return Status::IoErr;
    };
    let Some(slices) = guest.buffers(true, len) else {
        return Status::IoErr;
    };
    let mut bufs: Vec<&mut [u8]> = slices
        .iter()
        // SAFETY: each slice lies inside guest memory (checked by `get_slices`), which stays
        // mapped while `guest.mem` is borrowed, i.e. for this whole request; the slices of
        // one chain do not overlap each other's use here (they are filled one after the
        // other). The guest may touch the buffers meanwhile; that only changes bytes it
        // handed to the device to fill, and nothing here interprets them.
        .map(|vs| unsafe { std::slice::from_raw_parts_mut(vs.ptr_guard_mut().as_ptr(), vs.len()) })
        .collect();
    if disk.read_vectored(offset, &mut bufs).is_err() {
        return Status::IoErr;
    }
    out.bytes = len as u64;
    out.in_place = len as u64;
    Status::Ok
}

fn write<T>(
    disk: &dyn Disk,
    sector: u64,
    guest: &Guest<'_, T>,
    reader: &Reader<'_>,
    out: &mut Outcome,
) -> Status
where
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let Some(len) = data_len(reader.available_bytes()) else {
        return Status::IoErr;
    };
    let Some(offset) = range(disk, sector, len as u64) else {
        return Status::IoErr;
    };
    let Some(slices) = guest.buffers(false, len) else {
        return Status::IoErr;
    };
    let bufs: Vec<&[u8]> = slices
        .iter()
        // SAFETY: as in `read`: inside guest memory, mapped for the request. The disk copies
        // these bytes before it checksums and stores them (`Disk::write_vectored`); a guest
        // changing them meanwhile gets whichever bytes were copied, as with any device doing
        // DMA.
        .map(|vs| unsafe { std::slice::from_raw_parts(vs.ptr_guard().as_ptr(), vs.len()) })
        .collect();
    out.bytes = len as u64;
    ok_or_ioerr(disk.write_vectored(offset, &bufs))
}

/// DISCARD and WRITE_ZEROES: a list of 16-byte segments (sector, sectors, flags).
fn unmap(disk: &dyn Disk, kind: u32, reader: &mut Reader<'_>) -> Status {
    let n = reader.available_bytes();
    if n == 0 || !n.is_multiple_of(16) || n / 16 > MAX_DISCARD_SEGMENTS {
        return Status::IoErr;
    }
    for _ in 0..n / 16 {
        let Ok(seg) = reader.read_obj::<[u8; 16]>() else {
            return Status::IoErr;
        };
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // Bit 0 is "unmap"; it is only meaningful for WRITE_ZEROES. Other bits are reserved.
        if flags & !1 != 0 || (kind == VIRTIO_BLK_T_DISCARD && flags != 0) {
            return Status::Unsupp;
        }
        let len = u64::from(sectors) * SECTOR;
        let Some(offset) = range(disk, sector, len) else {
            return Status::IoErr;
        };
        let r = if kind == VIRTIO_BLK_T_DISCARD {
            disk.discard(offset, len)
        } else {
            disk.write_zeroes(offset, len)
        };
        if r.is_err() {
            return Status::IoErr;
        }
    }
    Status::Ok
}
