//! Fault-injecting engine for tests: simulated power loss and IO errors.
//!
//! It performs every operation for real (so the store under test behaves normally) and keeps,
//! per file, a model of what the media holds durably: the content as of the last `Sync`, plus
//! the writes and punches issued since. [`FaultEngine::power_cut`] rewrites each file as the
//! media could hold it after a power cut: durable content plus each unsynced write dropped,
//! kept, or torn at 512-byte sector granularity, chosen by a seed.
//!
//! Reads of cached pages ([`Op::ReadCached`]) always report nothing cached, so every read
//! takes the verifying path.
//!
//! A [`FaultPlan`] makes the Nth operation fail: either once (error injection: the store must
//! report it cleanly), or for good (a crash point: every later operation fails too, as if the
//! machine had stopped).

use super::{open_file, run_blocking, Done, IoEngine, IoFile, Op};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SECTOR: usize = 512;

/// Which operation fails, and how.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultPlan {
    /// Operation number (counting from 0) at which the machine "stops": it and every later
    /// operation fail.
    pub crash_at: Option<u64>,
    /// Operation number that fails once with EIO.
    pub fail_at: Option<u64>,
    /// Restrict `fail_at` counting to one kind: "read", "write", "sync" or "punch".
    pub fail_kind: Option<&'static str>,
}

/// What a power cut did.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashReport {
    pub files: usize,
    pub unsynced_writes: usize,
    pub dropped: usize,
    pub kept: usize,
    pub torn: usize,
}

#[derive(Debug, Default)]
struct FileModel {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct State {
    files: HashMap<PathBuf, FileModel>,
    paths: HashMap<u64, PathBuf>,
    next_id: u64,
    ops: u64,
    kind_ops: u64,
    dead: bool,
}

#[derive(Debug)]
pub struct FaultEngine {
    plan: Mutex<FaultPlan>,
    state: Mutex<State>,
}

fn kind(op: &Op<'_>) -> &'static str {
    match op {
        Op::Read { .. } | Op::ReadCached { .. } => "read",
        Op::Write { .. } => "write",
        Op::Sync { .. } => "sync",
        Op::Punch { .. } => "punch",
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultEngine {
    pub fn new(plan: FaultPlan) -> Self {
        Self {
            plan: Mutex::new(plan),
            state: Mutex::new(State::default()),
        }
    }

    /// Replaces the plan and restarts its counting from the next operation (so a test can
    /// aim at operations after a store has opened).
    pub fn arm(&self, plan: FaultPlan) {
        *self.plan.lock() = plan;
        let mut st = self.state.lock();
        st.ops = 0;
        st.kind_ops = 0;
    }

    /// Operations submitted so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().ops
    }

    /// True once a crash point has been reached.
    pub fn crashed(&self) -> bool {
        self.state.lock().dead
    }

    /// Stops the machine now: every later operation fails.
    pub fn crash(&self) {
        self.state.lock().dead = true;
    }

    /// Rewrites every tracked file as it could be after a power cut. Call after the store is
    /// dropped; the files are then reopened with a fresh engine.
    pub fn power_cut(&self, seed: u64) -> io::Result<CrashReport> {
        let mut st = self.state.lock();
        st.dead = true;
        let mut rng = SplitMix(seed);
        let mut report = CrashReport::default();
        for (path, model) in st.files.iter_mut() {
            if !path.exists() {
                continue;
            }
            report.files += 1;
            let mut content = model.durable.clone();
            for (offset, data) in model.pending.drain(..) {
                report.unsynced_writes += 1;
                match rng.next() % 3 {
                    0 => report.dropped += 1,
                    1 => {
                        report.kept += 1;
                        apply(&mut content, offset, &data, |_| true);
                    }
                    _ => {
                        report.torn += 1;
                        let keep_bits = rng.next();
                        apply(&mut content, offset, &data, |sector| {
                            keep_bits >> (sector % 64) & 1 == 1
                        });
                    }
                }
            }
            std::fs::write(path, &content)?;
            model.durable = content;
        }
        Ok(report)
    }

    fn check(&self, op: &Op<'_>) -> Option<io::Error> {
        let plan = *self.plan.lock();
        let mut st = self.state.lock();
        let n = st.ops;
        st.ops += 1;
        if st.dead {
            return Some(eio());
        }
        if plan.crash_at == Some(n) {
            st.dead = true;
            return Some(eio());
        }
        let counts = plan.fail_kind.is_none_or(|k| k == kind(op));
        if counts {
            let k = st.kind_ops;
            st.kind_ops += 1;
            if plan.fail_at == Some(k) {
                return Some(eio());
            }
        }
        None
    }

    fn record(&self, op: &Op<'_>) {
        let mut st = self.state.lock();
        let Some(path) = st.paths.get(&op.file().id()).cloned() else {
            return;
        };
        let Some(model) = st.files.get_mut(&path) else {
            return;
        };
        match op {
            Op::Write { offset, buf, .. } => model.pending.push((*offset, buf.bytes().to_vec())),
            Op::Punch { offset, len, .. } => {
                let len = usize::try_from(*len).unwrap_or(0).min(1 << 30);
                model.pending.push((*offset, vec![0; len]));
            }
            Op::Sync { .. } => {
                let pending = std::mem::take(&mut model.pending);
                for (offset, data) in pending {
                    apply(&mut model.durable, offset, &data, |_| true);
                }
            }
            Op::Read { .. } | Op::ReadCached { .. } => {}
        }
    }
}

fn apply(content: &mut Vec<u8>, offset: u64, data: &[u8], keep_sector: impl Fn(usize) -> bool) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    for (i, chunk) in data.chunks(SECTOR).enumerate() {
        if !keep_sector(i) {
            continue;
        }
        let at = start + i * SECTOR;
        if content.len() < at + chunk.len() {
            content.resize(at + chunk.len(), 0);
        }
        content[at..at + chunk.len()].copy_from_slice(chunk);
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl IoEngine for FaultEngine {
    fn name(&self) -> &'static str {
        "fault"
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<IoFile>> {
        if self.state.lock().dead {
            return Err(eio());
        }
        let mut file = open_file(path, create)?;
        let mut st = self.state.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.paths.insert(id, path.to_path_buf());
        if !st.files.contains_key(path) {
            let mut durable = Vec::new();
            file.read_to_end(&mut durable)?;
            st.files.insert(
                path.to_path_buf(),
                FileModel {
                    durable,
                    pending: Vec::new(),
                },
            );
        }
        Ok(Arc::new(IoFile::new(file, id)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        if self.state.lock().dead {
            return Err(eio());
        }
        std::fs::remove_file(path)?;
        self.state.lock().files.remove(path);
        Ok(())
    }

    /// Writeback started early promises nothing: the model keeps such writes unsynced.
    fn start_writeback(&self, _file: &IoFile) -> io::Result<()> {
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.state.lock().dead {
            return Err(eio());
        }
        std::fs::File::open(dir)?.sync_all()
    }

    fn submit<'a>(&self, ops: Vec<Op<'a>>) -> Vec<Done<'a>> {
        ops.into_iter()
            .map(|mut op| {
                if let Some(e) = self.check(&op) {
                    return Done { op, result: Err(e) };
                }
                // Nothing counts as cached here: every read takes the verified path, so the
                // power-cut tests check every byte against its checksum.
                if matches!(op, Op::ReadCached { .. }) {
                    return Done { op, result: Ok(0) };
                }
                let result = run_blocking(&mut op);
                if result.is_ok() {
                    self.record(&op);
                }
                Done { op, result }
            })
            .collect()
    }
}
