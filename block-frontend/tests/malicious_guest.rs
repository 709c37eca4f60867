#![allow(clippy::unwrap_used, clippy::type_complexity)]
//! Scenario: a malicious guest. A test frontend writes crafted descriptor chains into a
//! virtqueue in guest memory — loops, over-long chains, addresses outside guest memory, zero
//! and huge lengths, wrong directions, sectors beyond capacity, a header in a write-only
//! descriptor, unknown request types, reserved flags — and the device must answer each with
//! an error status (IOERR or UNSUPP), never panic, return every chain to the used ring, and
//! still serve a good request afterwards. Good requests (read, write, flush, GET_ID, discard,
//! write-zeroes) are checked end to end, including a buffer spanning two memory regions.

use parking_lot::Mutex;
use strata_block::request::{
    drain_queue, Limits, Status, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use strata_block::{Disk, DiskError};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const DISK: u64 = 1 << 20;

struct MemDisk(Mutex<Vec<u8>>);

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        DISK
    }
    fn id(&self) -> &str {
        "test-volume-with-a-long-name"
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let d = self.0.lock();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.0.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.0.lock()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.discard(offset, len)
    }
}

/// Guest memory: two adjacent regions (so one buffer can span both) and a hole above them.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x10_0000), 0x10_0000),
    ])
    .unwrap()
}

const HDR: u64 = 0x4_0000;
const DATA: u64 = 0x5_0000;
const STATUS: u64 = 0x9_0000;

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Sets each descriptor's `next` to the one after it in the table, as a driver would.
fn linked(chain: &[RawDescriptor], start: u16) -> Vec<RawDescriptor> {
    chain
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            let next = if d.flags() & F_NEXT != 0 {
                start + i as u16 + 1
            } else {
                0
            };
            RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), d.flags(), next))
        })
        .collect()
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
    mem.read_obj::<u8>(GuestAddress(at)).unwrap()
}

/// Puts the chains in a fresh queue, drains it, and returns the statuses the device reported.
fn run(
    mem: &GuestMemoryMmap,
    disk: &MemDisk,
    chains: &[Vec<RawDescriptor>],
    ro: bool,
) -> (Vec<Option<u8>>, u16) {
    let mock = MockSplitQueue::new(mem, 64);
    let mut start = 0u16;
    for c in chains {
        mock.add_desc_chains(&linked(c, start), start).unwrap();
        start += c.len() as u16;
    }
    let mut q: Queue = mock.create_queue().unwrap();
    let out = drain_queue(disk, Limits { read_only: ro }, &mut q, mem).unwrap();
    let used = mock.used().idx().load();
    (out.iter().map(|o| o.status).collect(), used)
}

fn disk() -> MemDisk {
    MemDisk(Mutex::new((0..DISK).map(|i| (i % 251) as u8).collect()))
}

#[test]
fn good_requests_work_end_to_end() {
    let mem = memory();
    let d = disk();
    // Write 8 KiB at sector 8 from a buffer that spans the two memory regions.
    let span = 0x10_0000 - 4096;
    mem.write_slice(&[0xabu8; 8192], GuestAddress(span))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 8);
    let w = vec![
        desc(HDR, 16, F_NEXT),
        desc(span, 8192, F_NEXT),
        desc(STATUS, 1, F_WRITE),
    ];
    let (st, used) = run(&mem, &d, &[w], false);
    assert_eq!((st, used), (vec![Some(Status::Ok as u8)], 1));
    assert!(d.0.lock()[4096..4096 + 8192].iter().all(|&b| b == 0xab));

    header(&mem, VIRTIO_BLK_T_IN, 8);
    let r = vec![
        desc(HDR, 16, F_NEXT),
        desc(DATA, 8192, F_NEXT | F_WRITE),
        desc(STATUS, 1, F_WRITE),
    ];
    let (st, _) = run(&mem, &d, &[r], false);
    assert_eq!(st, vec![Some(0)]);
    let mut back = vec![0u8; 8192];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
    assert_eq!(status(&mem, STATUS), 0);

    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let id = vec![
        desc(HDR, 16, F_NEXT),
        desc(DATA, 20, F_NEXT | F_WRITE),
        desc(STATUS, 1, F_WRITE),
    ];
    assert_eq!(run(&mem, &d, &[id], false).0, vec![Some(0)]);
    let mut serial = [0u8; 20];
    mem.read_slice(&mut serial, GuestAddress(DATA)).unwrap();
    assert_eq!(&serial, b"test-volume-with-a-l");

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let f = vec![desc(HDR, 16, F_NEXT), desc(STATUS, 1, F_WRITE)];
    assert_eq!(run(&mem, &d, &[f], false).0, vec![Some(0)]);

    for (kind, flags) in [(VIRTIO_BLK_T_DISCARD, 0u32), (VIRTIO_BLK_T_WRITE_ZEROES, 1)] {
        d.0.lock()[..4096].fill(7);
        header(&mem, kind, 0);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        let c = vec![
            desc(HDR, 16, F_NEXT),
            desc(DATA, 16, F_NEXT),
            desc(STATUS, 1, F_WRITE),
        ];
        assert_eq!(run(&mem, &d, &[c], false).0, vec![Some(0)]);
        assert!(d.0.lock()[..4096].iter().all(|&b| b == 0));
    }
}

#[test]
fn crafted_chains_get_error_statuses_and_the_queue_lives_on() {
    let mem = memory();
    let d = disk();
    let before = d.0.lock().clone();
    let ioerr = Some(Status::IoErr as u8);
    let unsupp = Some(Status::Unsupp as u8);
    let good_read = || {
        vec![
            desc(HDR + 0x100, 16, F_NEXT),
            desc(DATA, 512, F_NEXT | F_WRITE),
            desc(STATUS + 8, 1, F_WRITE),
        ]
    };
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR + 0x100)).unwrap();

    let cases: Vec<(&str, u32, u64, Vec<RawDescriptor>, Option<u8>)> = vec![
        (
            "sector beyond capacity",
            VIRTIO_BLK_T_IN,
            DISK / 512,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 512, F_NEXT | F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "range crossing the end",
            VIRTIO_BLK_T_OUT,
            DISK / 512 - 1,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 1024, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "sector overflow",
            VIRTIO_BLK_T_IN,
            u64::MAX / 256,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 512, F_NEXT | F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "header in a write-only descriptor",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, F_NEXT | F_WRITE),
                desc(DATA, 512, F_NEXT | F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "short header",
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(HDR, 8, F_NEXT), desc(STATUS, 1, F_WRITE)],
            ioerr,
        ),
        (
            "data outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(0x100_0000_0000, 512, F_NEXT | F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "header outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(0x7fff_ffff_0000, 16, F_NEXT), desc(STATUS, 1, F_WRITE)],
            ioerr,
        ),
        (
            "huge length",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 0x8000_0000, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "huge length within memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(0, 0x1f_0000, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        // A chain over 2^32 bytes is illegal; the walk stops before the status descriptor, so
        // there is nothing to report into, but the chain is still returned.
        (
            "chain longer than 4 GiB",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, u32::MAX, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            None,
        ),
        (
            "unaligned length",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 100, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "zero-length data on write",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 0, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            Some(0),
        ),
        (
            "data in the wrong direction",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 512, F_NEXT | F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "unknown request type",
            99,
            0,
            vec![desc(HDR, 16, F_NEXT), desc(STATUS, 1, F_WRITE)],
            unsupp,
        ),
        (
            "discard with reserved flags",
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA + 0x8000, 16, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            unsupp,
        ),
        (
            "discard with a ragged payload",
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![
                desc(HDR, 16, F_NEXT),
                desc(DATA, 15, F_NEXT),
                desc(STATUS, 1, F_WRITE),
            ],
            ioerr,
        ),
        (
            "no status byte at all",
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(HDR, 16, 0)],
            None,
        ),
    ];
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..].copy_from_slice(&4u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA + 0x8000)).unwrap();
    for (name, kind, sector, chain, want) in cases {
        header(&mem, kind, sector);
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let n = chain.len();
        let (st, used) = run(&mem, &d, &[chain, good_read()], false);
        assert_eq!(used, 2, "{name}: every chain goes back to the used ring");
        assert_eq!(st[0], want, "{name}");
        if want.is_some() && n > 1 {
            assert_eq!(
                Some(status(&mem, STATUS)),
                want,
                "{name}: status byte in guest memory"
            );
        }
        assert_eq!(
            st[1],
            Some(0),
            "{name}: the queue still serves a good request"
        );
    }
    assert!(*d.0.lock() == before, "no bad request changed the disk");

    // Writes to a read-only export.
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let w = vec![
        desc(HDR, 16, F_NEXT),
        desc(DATA, 512, F_NEXT),
        desc(STATUS, 1, F_WRITE),
    ];
    assert_eq!(run(&mem, &d, &[w], true).0, vec![ioerr]);
    assert!(*d.0.lock() == before);
}

#[test]
fn descriptor_loops_and_overlong_chains_terminate() {
    let mem = memory();
    let d = disk();
    // A chain whose last descriptor points back at the first: the walk must stop at the queue
    // size, and the chain must still be returned.
    let mock = MockSplitQueue::new(&mem, 16);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let table = mock.desc_table();
    table
        .store(
            0,
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 1)),
        )
        .unwrap();
    table
        .store(
            1,
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, F_NEXT, 0)),
        )
        .unwrap();
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(1);
    let mut q: Queue = mock.create_queue().unwrap();
    let out = drain_queue(&d, Limits { read_only: false }, &mut q, &mem).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(mock.used().idx().load(), 1);

    // A chain as long as the whole queue, every descriptor a 1-byte write buffer.
    let mock = MockSplitQueue::new(&mem, 16);
    let mut long = vec![desc(HDR, 16, F_NEXT)];
    for i in 0..15 {
        long.push(desc(DATA + i * 2, 1, F_NEXT | F_WRITE));
    }
    header(&mem, VIRTIO_BLK_T_IN, 0);
    mock.add_desc_chains(&linked(&long, 0), 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let out = drain_queue(&d, Limits { read_only: false }, &mut q, &mem).unwrap();
    assert_eq!(
        out[0].status,
        Some(Status::IoErr as u8),
        "14 data bytes is not a whole sector"
    );
    assert_eq!(mock.used().idx().load(), 1);
}
