//! vhost-user-blk frontend: serves Strata volumes to hypervisors (QEMU, Cloud Hypervisor,
//! Firecracker) on the rust-vmm vhost-user stack.
//!
//! * `request.rs` — walk one descriptor chain, execute it against a [`Disk`], write the status.
//! * `config.rs` — feature bits and the virtio-blk config space.
//! * `backend.rs` — the vhost-user device: one worker thread per queue.
//! * `helpers.rs` — helper threads shared by all exports, so one queue uses several cores.
//! * `disk.rs` — the [`Disk`] trait and its implementation for engine volumes.
//! * `stats.rs` — IO counters and latency histograms for metrics.
//! * this file — [`Export`]: listen on a socket, serve one hypervisor connection at a time,
//!   listen again after it goes (so a restarted VM reattaches).

pub mod backend;
pub mod config;
pub mod disk;
mod helpers;
pub mod request;
pub mod stats;

pub use backend::{BlockBackend, BlockOptions};
pub use disk::{Disk, DiskError};
pub use stats::{IoStats, VolumeIo};

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// A volume exported on a vhost-user socket. Dropping it (or [`Export::stop`]) disconnects
/// the hypervisor and removes the socket.
pub struct Export {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    shutdown: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    /// The volume's IO statistics and limits (shared with its other exports).
    pub io: Arc<VolumeIo>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("socket path {0} is in use by a listening process")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket directory {0} does not exist")]
    NoSocketDir(PathBuf),
    #[error("listening on {path}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("starting the export thread")]
    Thread(#[source] std::io::Error),
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Export {
    /// Starts serving `disk` on `socket`, counting and limiting its requests with `io`.
    pub fn start(
        disk: Arc<dyn Disk>,
        io: Arc<VolumeIo>,
        block_size: u32,
        opts: BlockOptions,
        socket: &Path,
    ) -> Result<Export, ExportError> {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(ExportError::SocketInUse(socket.to_path_buf()));
        }
        // A stale socket from a crashed daemon is replaced; anything else is left alone.
        if let Ok(md) = std::fs::symlink_metadata(socket) {
            use std::os::unix::fs::FileTypeExt;
            if !md.file_type().is_socket() {
                return Err(ExportError::NotASocket(socket.to_path_buf()));
            }
        }
        if let Some(dir) = socket
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            return Err(ExportError::NoSocketDir(dir.to_path_buf()));
        }
        // Bind now so errors reach the caller and a client may connect as soon as we return.
        let listener = Listener::new(socket, true).map_err(|source| ExportError::Listen {
            path: socket.to_path_buf(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let shutdown = Arc::new(Mutex::new(None));
        let ctx = (
            disk,
            block_size,
            opts,
            io.clone(),
            stop.clone(),
            shutdown.clone(),
            socket.to_path_buf(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("vhost-blk-{}", ctx.0.id()))
            .spawn(move || serve_loop(ctx, listener))
            .map_err(ExportError::Thread)?;
        Ok(Export {
            socket: socket.to_path_buf(),
            stop,
            shutdown,
            thread: Some(thread),
            io,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Disconnects the hypervisor, stops listening and removes the socket.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.shutdown.lock().take() {
            h.shutdown();
        }
        // Wake a thread blocked in accept().
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.halt();
        }
    }
}

type Ctx = (
    Arc<dyn Disk>,
    u32,
    BlockOptions,
    Arc<VolumeIo>,
    Arc<AtomicBool>,
    Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
    PathBuf,
);

fn serve_loop(ctx: Ctx, mut listener: Listener) {
    let (disk, block_size, opts, io, stop, shutdown, socket) = ctx;
    while !stop.load(Ordering::SeqCst) {
        let backend = BlockBackend::new(disk.clone(), block_size, opts, io.clone());
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            match VhostUserDaemon::new(format!("vhost-blk-{}", disk.id()), backend, mem) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = ?e, "creating the vhost-user daemon failed");
                    return;
                }
            };
        if let Err(e) = daemon.start(&mut listener) {
            if !stop.load(Ordering::SeqCst) {
                tracing::warn!(error = ?e, socket = %socket.display(), "vhost-user connection failed to start");
            }
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            // The connection was our own wake-up call from `Export::stop`.
            daemon.request_shutdown();
        } else {
            *shutdown.lock() = daemon.shutdown_handle();
            tracing::info!(volume = disk.id(), socket = %socket.display(), "hypervisor connected");
        }
        if let Err(e) = daemon.wait() {
            tracing::warn!(error = ?e, "vhost-user connection ended with an error");
        }
        shutdown.lock().take();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        if !stop.load(Ordering::SeqCst) {
            tracing::info!(volume = disk.id(), "hypervisor disconnected");
        }
    }
}
