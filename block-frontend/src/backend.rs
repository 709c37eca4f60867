//! The vhost-user-blk device: features, config space, and one worker thread per queue that
//! drains its queue through `request::handle_chain`.

use crate::config;
use crate::disk::Disk;
use crate::helpers::Helpers;
use crate::request::{handle_chain, Limits, Outcome};
use crate::stats::{op_of, VolumeIo};
use parking_lot::RwLock;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Descriptors per queue the device accepts.
pub const QUEUE_SIZE: usize = 256;
/// Most queues one device offers.
pub const MAX_QUEUES: u16 = 16;

/// How a volume is exported.
#[derive(Clone, Copy, Debug)]
pub struct BlockOptions {
    pub queues: u16,
    pub read_only: bool,
}

struct Shared {
    disk: Arc<dyn Disk>,
    opts: BlockOptions,
    block_size: u32,
    writeback: AtomicBool,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    io: Arc<VolumeIo>,
}

/// The device. Cheap to clone (the vhost-user framework clones it per worker thread).
#[derive(Clone)]
pub struct BlockBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("id", &self.shared.disk.id())
            .field("opts", &self.shared.opts)
            .finish()
    }
}

impl BlockBackend {
    pub fn new(
        disk: Arc<dyn Disk>,
        block_size: u32,
        opts: BlockOptions,
        io: Arc<VolumeIo>,
    ) -> Self {
        let opts = BlockOptions {
            queues: opts.queues.clamp(1, MAX_QUEUES),
            ..opts
        };
        BlockBackend {
            shared: Arc::new(Shared {
                disk,
                opts,
                block_size,
                writeback: AtomicBool::new(true),
                event_idx: AtomicBool::new(false),
                mem: RwLock::new(None),
                io,
            }),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            read_only: self.shared.opts.read_only,
        }
    }

    /// Drains one queue. Requests run on this thread and, when several are waiting, on the
    /// shared helper threads too (completing out of order, as virtio allows); each
    /// completion goes on the used ring as soon as it is done, and the driver is told as soon
    /// as it asks (with `EVENT_IDX`, when its used-event index says so), so that it reaps and
    /// submits more while the rest is served. Returns only once every request it handed to a
    /// helper is back: nothing outlives this call's guest memory or queue state.
    ///
    /// Guest memory is looked up again on every pass: the frontend may add regions while the
    /// queue is being served (libblkio maps its buffers after starting the device), and a
    /// request must be translated with a map that holds its buffers. Each request is served
    /// with the map it was taken from the ring with.
    fn process(&self, vring: &VringRwLock, event_idx: bool) -> io::Result<()> {
        // The queue belongs to this worker thread alone; the lock only fences the control
        // path (vring setup), so holding it across the requests is uncontended.
        let mut state = vring.get_mut();
        let helpers = Helpers::get();
        // Requests handed to helpers at once: enough to keep them busy, few enough that this
        // thread serves its share.
        let max_out = helpers.threads() * 2;
        let (done_tx, done_rx) = mpsc::channel::<(u16, u32, Outcome)>();
        let mut pending = VecDeque::new();
        let mut out = 0usize;
        let result = loop {
            let mem = match self.memory() {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            while let Some(c) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                pending.push_back((c, mem.clone()));
            }
            while pending.len() > 1 && out < max_out {
                let Some((chain, cmem)) = pending.pop_back() else {
                    break;
                };
                self.admit(&chain, &cmem);
                let (disk, limits, mem, tx) = (
                    self.shared.disk.clone(),
                    self.limits(),
                    cmem,
                    done_tx.clone(),
                );
                helpers.run(move || {
                    let start = std::time::Instant::now();
                    let head = chain.head_index();
                    let (len, mut o) = handle_chain(disk.as_ref(), limits, chain, &mem);
                    o.latency = start.elapsed();
                    // The worker waits for every helper's answer; it cannot be gone.
                    let _ = tx.send((head, len, o));
                });
                out += 1;
            }
            let mut finished = Vec::new();
            if let Some((chain, cmem)) = pending.pop_front() {
                self.admit(&chain, &cmem);
                let start = std::time::Instant::now();
                let head = chain.head_index();
                let (len, mut o) =
                    handle_chain(self.shared.disk.as_ref(), self.limits(), chain, &cmem);
                o.latency = start.elapsed();
                finished.push((head, len, o));
            } else if out > 0 {
                // Nothing left to serve here: wait for a helper.
                match done_rx.recv() {
                    Ok(d) => {
                        finished.push(d);
                        out -= 1;
                    }
                    Err(_) => break Err(io::Error::other("block helper lost a request")),
                }
            } else {
                break Ok(());
            }
            while let Ok(d) = done_rx.try_recv() {
                finished.push(d);
                out -= 1;
            }
            if let Err(e) = self.complete(&mut state, &mem, event_idx, &finished) {
                break Err(e);
            }
        };
        // On an error, still wait for what helpers hold (their answers are dropped).
        while out > 0 && done_rx.recv().is_ok() {
            out -= 1;
        }
        result
    }

    /// Holds a request to the volume's limits: waits here, on this queue's own thread (never
    /// on a helper other volumes share), until the limits admit it.
    fn admit<T>(&self, chain: &virtio_queue::DescriptorChain<T>, mem: &GuestMemoryMmap)
    where
        T: std::ops::Deref + Clone,
        T::Target: vm_memory::GuestMemory + Sized,
    {
        let io = &self.shared.io;
        if !io.qos.is_limited() {
            return;
        }
        if let Some((kind, bytes)) = crate::request::peek(chain, mem) {
            io.throttle(op_of(kind), bytes);
        }
    }

    /// Puts finished requests on the used ring and notifies the driver if it asks.
    fn complete(
        &self,
        state: &mut vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        mem: &GuestMemoryMmap,
        event_idx: bool,
        finished: &[(u16, u32, Outcome)],
    ) -> io::Result<()> {
        let used_err = |e| io::Error::other(format!("used ring: {e:?}"));
        for (head, len, o) in finished {
            state
                .get_queue_mut()
                .add_used(mem, *head, *len)
                .map_err(used_err)?;
            self.shared
                .io
                .stats
                .record_op(op_of(o.kind), o.bytes, o.status == Some(0), o.latency);
            if !event_idx || state.needs_notification().map_err(used_err)? {
                state.signal_used_queue()?;
            }
        }
        Ok(())
    }

    /// The guest memory map as it is now.
    fn memory(&self) -> io::Result<Arc<GuestMemoryMmap>> {
        let Some(atomic) = self.shared.mem.read().clone() else {
            return Err(io::Error::other("no guest memory mapped"));
        };
        Ok(atomic.memory().into_inner())
    }

    fn serve_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        self.memory()?;
        let event_idx = self.shared.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
            }
            self.process(vring, event_idx)?;
            if !event_idx
                || !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.opts.queues)
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::features(self.shared.opts.read_only, self.shared.opts.queues)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // MQ lets the frontend ask how many queues there are; CONFIGURE_MEM_SLOTS lets it add
        // memory regions one at a time (libblkio requires it).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.shared.mem.write() = Some(mem);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = config::config_space(
            self.shared.disk.size(),
            self.shared.block_size,
            self.shared.opts.queues,
            self.shared.writeback.load(Ordering::Relaxed),
        );
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        c[start..end].to_vec()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (CONFIG_WCE); the cache stays a write-back cache
        // either way (every write survives a crash of this process; flushes make it durable),
        // so the value is only reported back.
        if offset as usize == config::WRITEBACK_OFFSET && buf.len() == 1 {
            self.shared.writeback.store(buf[0] != 0, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::from(io::ErrorKind::InvalidInput))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.opts.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event set"));
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.serve_queue(vring),
            None => Err(io::Error::other(format!(
                "event for unknown queue {device_event}"
            ))),
        }
    }
}
