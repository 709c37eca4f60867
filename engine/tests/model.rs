#![allow(clippy::unwrap_used, clippy::needless_range_loop, clippy::map_entry)]
//! Scenario: random sequences of write, write-zeroes, discard, flush, checkpoint, restore,
//! fork, grow, delete and reopen run against the engine and against a plain in-memory model
//! (a byte vector per volume and per checkpoint); every read is compared, and at the end of
//! each sequence every volume and checkpoint is read whole and compared, the scrub and the
//! metadata check (maps = records, counts = records) must be clean, and deleting everything must bring live data back to zero.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use strata_engine::{MapRef, Store, VolumeOptions};

const VOL_SIZE: u64 = 256 * 1024;
const VOLS: [&str; 3] = ["a", "b", "c"];
const CKPTS: [&str; 3] = ["x", "y", "z"];

#[derive(Clone, Debug)]
enum Op {
    Write {
        vol: usize,
        off: u64,
        len: u64,
        seed: u64,
    },
    Zeroes {
        vol: usize,
        off: u64,
        len: u64,
    },
    Discard {
        vol: usize,
        off: u64,
        len: u64,
    },
    Read {
        vol: usize,
        off: u64,
        len: u64,
    },
    Flush,
    Checkpoint {
        vol: usize,
        ck: usize,
    },
    Restore {
        vol: usize,
        ck: usize,
    },
    Fork {
        vol: usize,
        ck: usize,
        to: usize,
    },
    DeleteCheckpoint {
        vol: usize,
        ck: usize,
    },
    DeleteVolume {
        vol: usize,
    },
    Create {
        vol: usize,
    },
    Grow {
        vol: usize,
    },
    Reopen,
    /// Rewrites the volume's fragmented chunks; content must not change.
    Defragment {
        vol: usize,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Sector-aligned ranges, biased toward block edges and small sizes.
    (0u64..VOL_SIZE / 512, 1u64..96).prop_map(|(s, n)| {
        let off = s * 512;
        let len = (n * 512).min(VOL_SIZE - off);
        (off, len.max(512).min(VOL_SIZE - off))
    })
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0..VOLS.len();
    let c = 0..CKPTS.len();
    prop_oneof![
        8 => (v.clone(), range(), any::<u64>()).prop_map(|(vol, (off, len), seed)| Op::Write { vol, off, len, seed }),
        2 => (v.clone(), range()).prop_map(|(vol, (off, len))| Op::Zeroes { vol, off, len }),
        2 => (v.clone(), range()).prop_map(|(vol, (off, len))| Op::Discard { vol, off, len }),
        4 => (v.clone(), range()).prop_map(|(vol, (off, len))| Op::Read { vol, off, len }),
        1 => Just(Op::Flush),
        3 => (v.clone(), c.clone()).prop_map(|(vol, ck)| Op::Checkpoint { vol, ck }),
        2 => (v.clone(), c.clone()).prop_map(|(vol, ck)| Op::Restore { vol, ck }),
        2 => (v.clone(), c.clone(), v.clone()).prop_map(|(vol, ck, to)| Op::Fork { vol, ck, to }),
        2 => (v.clone(), c.clone()).prop_map(|(vol, ck)| Op::DeleteCheckpoint { vol, ck }),
        1 => v.clone().prop_map(|vol| Op::DeleteVolume { vol }),
        2 => v.clone().prop_map(|vol| Op::Create { vol }),
        1 => v.clone().prop_map(|vol| Op::Grow { vol }),
        1 => Just(Op::Reopen),
        2 => v.clone().prop_map(|vol| Op::Defragment { vol }),
    ]
}

#[derive(Default)]
struct Model {
    vols: BTreeMap<usize, Vec<u8>>,
    ckpts: BTreeMap<(usize, usize), Vec<u8>>,
}

struct Harness {
    dir: tempfile::TempDir,
    store: Option<Store>,
    uring: bool,
    lz4: bool,
}

impl Harness {
    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }
    fn reopen(&mut self) {
        self.store = None;
        let e = engines().remove(usize::from(self.uring)).1;
        self.store = Some(open(self.dir.path(), e));
    }
}

fn run(ops: Vec<Op>, uring: bool, lz4: bool) {
    let mut h = Harness {
        dir: tempfile::tempdir().unwrap(),
        store: None,
        uring,
        lz4,
    };
    h.reopen();
    let mut m = Model::default();
    let opts = VolumeOptions {
        lz4: h.lz4,
        block_size: lz4.then_some(16 * 1024),
        ephemeral: false,
        tree: false,
    };
    for op in ops {
        step(&mut h, &mut m, &op, opts);
    }
    verify_all(&h, &m);
    // Deleting everything gives every byte back.
    for vol in m.vols.keys() {
        h.store().delete_volume(VOLS[*vol]).unwrap();
    }
    h.store().flush().unwrap();
    assert_eq!(h.store().stats().live_bytes, 0);
    assert_eq!(h.store().stats().checkpoints, 0);
}

fn step(h: &mut Harness, m: &mut Model, op: &Op, opts: VolumeOptions) {
    let s = h.store();
    match *op {
        Op::Write {
            vol,
            off,
            len,
            seed,
        } => {
            let Some(content) = m.vols.get_mut(&vol) else {
                return;
            };
            if off + len > content.len() as u64 {
                return;
            }
            let data = pattern(seed, len as usize);
            s.open_volume(VOLS[vol]).unwrap().write(off, &data).unwrap();
            content[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        Op::Zeroes { vol, off, len } | Op::Discard { vol, off, len } => {
            let Some(content) = m.vols.get_mut(&vol) else {
                return;
            };
            if off + len > content.len() as u64 {
                return;
            }
            let v = s.open_volume(VOLS[vol]).unwrap();
            if matches!(op, Op::Zeroes { .. }) {
                v.write_zeroes(off, len).unwrap();
            } else {
                v.discard(off, len).unwrap();
            }
            content[off as usize..(off + len) as usize].fill(0);
        }
        Op::Read { vol, off, len } => {
            let Some(content) = m.vols.get(&vol) else {
                return;
            };
            if off + len > content.len() as u64 {
                return;
            }
            let mut buf = vec![0u8; len as usize];
            s.open_volume(VOLS[vol])
                .unwrap()
                .read(off, &mut buf)
                .unwrap();
            assert!(
                buf == content[off as usize..(off + len) as usize],
                "read {op:?}"
            );
        }
        Op::Flush => s.flush().unwrap(),
        Op::Defragment { vol } => {
            let r = s.defragment(VOLS[vol], u64::MAX);
            assert_eq!(
                r.is_ok(),
                m.vols.contains_key(&vol),
                "defragment {op:?}: {r:?}"
            );
        }
        Op::Checkpoint { vol, ck } => {
            let Some(content) = m.vols.get(&vol) else {
                return;
            };
            let r = s.checkpoint(VOLS[vol], CKPTS[ck]);
            if m.ckpts.contains_key(&(vol, ck)) {
                assert!(r.is_err());
            } else {
                r.unwrap();
                m.ckpts.insert((vol, ck), content.clone());
            }
        }
        Op::Restore { vol, ck } => {
            let r = s.restore(VOLS[vol], CKPTS[ck]);
            match m.ckpts.get(&(vol, ck)) {
                Some(c) if m.vols.contains_key(&vol) => {
                    r.unwrap();
                    m.vols.insert(vol, c.clone());
                }
                _ => assert!(r.is_err()),
            }
        }
        Op::Fork { vol, ck, to } => {
            let r = s.fork(VOLS[vol], CKPTS[ck], VOLS[to], false);
            match m.ckpts.get(&(vol, ck)) {
                Some(c) if m.vols.contains_key(&vol) && !m.vols.contains_key(&to) => {
                    r.unwrap();
                    m.vols.insert(to, c.clone());
                }
                _ => assert!(r.is_err()),
            }
        }
        Op::DeleteCheckpoint { vol, ck } => {
            let r = s.delete_checkpoint(VOLS[vol], CKPTS[ck]);
            if m.ckpts.remove(&(vol, ck)).is_some() && m.vols.contains_key(&vol) {
                r.unwrap();
            } else {
                assert!(r.is_err());
            }
        }
        Op::DeleteVolume { vol } => {
            let r = s.delete_volume(VOLS[vol]);
            if m.vols.remove(&vol).is_some() {
                r.unwrap();
                m.ckpts.retain(|(v, _), _| *v != vol);
            } else {
                assert!(r.is_err());
            }
        }
        Op::Create { vol } => {
            let r = s.create_volume(VOLS[vol], VOL_SIZE, opts);
            if m.vols.contains_key(&vol) {
                assert!(r.is_err());
            } else {
                r.unwrap();
                m.vols.insert(vol, vec![0; VOL_SIZE as usize]);
            }
        }
        Op::Grow { vol } => {
            let Some(content) = m.vols.get_mut(&vol) else {
                return;
            };
            let new = content.len() as u64 + 64 * 1024;
            s.grow_volume(VOLS[vol], new).unwrap();
            content.resize(new as usize, 0);
        }
        Op::Reopen => h.reopen(),
    }
}

fn verify_all(h: &Harness, m: &Model) {
    let s = h.store();
    for (vol, content) in &m.vols {
        let v = s.open_volume(VOLS[*vol]).unwrap();
        assert_eq!(v.size(), content.len() as u64);
        let mut buf = vec![0u8; content.len()];
        v.read(0, &mut buf).unwrap();
        assert!(
            &buf == content,
            "volume {} differs from the model",
            VOLS[*vol]
        );
    }
    for ((vol, ck), content) in &m.ckpts {
        let snap = s.open_checkpoint(VOLS[*vol], CKPTS[*ck]).unwrap();
        let mut buf = vec![0u8; content.len()];
        snap.read(0, &mut buf).unwrap();
        assert!(
            &buf == content,
            "checkpoint {}@{} differs",
            VOLS[*vol],
            CKPTS[*ck]
        );
        // A diff against the live volume lists exactly the blocks whose content differs.
        if let Some(live) = m.vols.get(vol) {
            let diff = s
                .diff(
                    MapRef::Checkpoint(VOLS[*vol], CKPTS[*ck]),
                    MapRef::Live(VOLS[*vol]),
                )
                .unwrap();
            let bs = s.open_volume(VOLS[*vol]).unwrap().block_size() as usize;
            let n = content.len().max(live.len());
            for b in 0..n.div_ceil(bs) {
                let lo = b * bs;
                let get = |c: &Vec<u8>| c.get(lo..(lo + bs).min(c.len())).map(|s| s.to_vec());
                if get(content) != get(live) {
                    let off = lo as u64;
                    assert!(
                        diff.iter()
                            .any(|r| r.offset <= off && off < r.offset + r.len),
                        "diff misses block {b}"
                    );
                }
            }
        }
    }
    let scrub = s.scrub().unwrap();
    assert!(scrub.problems.is_empty(), "{:?}", scrub.problems);
    let check = s.check().unwrap();
    assert!(check.is_clean(), "{check:#?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..80), uring in any::<bool>()) {
        let mut ops = ops;
        ops.insert(0, Op::Create { vol: 0 });
        run(ops, uring, false);
    }

    #[test]
    fn compressed_engine_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut ops = ops;
        ops.insert(0, Op::Create { vol: 0 });
        run(ops, true, true);
    }
}
