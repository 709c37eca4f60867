//! Helper threads shared by every export: a queue's worker hands them requests so that one
//! queue's requests run on more than one core (a 1 MiB read or write is a memory copy, and
//! one thread copies at the speed of one core).
//!
//! The worker never returns from serving a queue while a request it handed out is running
//! (see `backend.rs`), so a helper never outlives the guest memory or the queue state of the
//! requests it runs; it only owns what its closure owns.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting for a helper.
#[derive(Default)]
struct Jobs {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

/// The process-wide helpers.
pub struct Helpers {
    jobs: Arc<Jobs>,
    threads: usize,
}

impl std::fmt::Debug for Helpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helpers")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Helpers {
    /// One helper per core beyond the first (none on one core: the worker does everything).
    pub fn get() -> &'static Helpers {
        static H: OnceLock<Helpers> = OnceLock::new();
        H.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Helpers::start(cores.saturating_sub(1))
        })
    }

    fn start(threads: usize) -> Helpers {
        let jobs = Arc::new(Jobs::default());
        let mut started = 0;
        for i in 0..threads {
            let jobs = jobs.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("blk-helper-{i}"))
                .spawn(move || loop {
                    let job = {
                        let mut q = jobs.queue.lock();
                        loop {
                            if let Some(j) = q.pop_front() {
                                break j;
                            }
                            jobs.ready.wait(&mut q);
                        }
                    };
                    job();
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!(error = %e, "cannot start a block helper thread"),
            }
        }
        Helpers {
            jobs,
            threads: started,
        }
    }

    /// Helper threads running (0: callers run everything themselves).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job` on a helper. Only called when [`Helpers::threads`] is not 0.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        self.jobs.queue.lock().push_back(Box::new(job));
        self.jobs.ready.notify_one();
    }
}
