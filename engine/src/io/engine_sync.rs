//! Plain `pread`/`pwrite` engine: one blocking syscall per operation.

use super::{open_file, run_blocking, Done, IoEngine, IoFile, Op};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct SyncEngine {
    next_id: AtomicU64,
}

impl SyncEngine {
    pub fn new() -> Self {
        Self::default()
    }
}

impl IoEngine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<IoFile>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(IoFile::new(open_file(path, create)?, id)))
    }

    fn submit<'a>(&self, ops: Vec<Op<'a>>) -> Vec<Done<'a>> {
        ops.into_iter()
            .map(|mut op| {
                let result = run_blocking(&mut op);
                Done { op, result }
            })
            .collect()
    }
}
