//! `strata volume create NAME --from REMOTE:VOL@CKPT [--lazy]`.
//!
//! The manifest is fetched and verified, its packs are registered with the engine, and the
//! new volume's map is pointed at the remote records (one O(extents) pass, no data moved).
//! From then on the volume is usable: a read of a block still remote fetches it (ranged GET,
//! crc-checked) and keeps it, while hydration copies the rest in the background. An eager
//! restore is the same followed by waiting for hydration, and ends by taking checkpoint
//! CKPT on the volume (recorded as pushed, so later pushes are incremental against it).

use super::manifest::Manifest;
use super::push::get_manifest;
use super::{key, manifest_rel, Hydration, Remotes, Restoring};
use crate::jobs::Job;
use anyhow::{anyhow, bail, Context, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use strata_engine::{Error as EngineError, RemoteExtent, Store, VolumeInfo, VolumeOptions};

/// Hydration workers per volume, each taking the next stripe of blocks.
const WORKERS: usize = 4;
/// Blocks per stripe.
const STRIPE: u64 = 1 << 16;
/// Bytes fetched per engine step.
const STEP_BYTES: u64 = 8 << 20;
/// Volumes that copy in at once; others wait for a slot (reads of their remote blocks go on
/// meanwhile). A hundred lazy forks of one golden share what they fetch (the engine's
/// `remote::Kept`), so running all of them at once would only add threads.
pub const SLOTS: usize = 4;

/// One of [`SLOTS`], released when dropped.
struct Slot<'a>(&'a Remotes);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let (n, cv) = &self.0.hydration_slots;
        *n.lock() -= 1;
        cv.notify_one();
    }
}

/// Waits for a hydration slot; `None` once `stop` says so.
fn take_slot<'a>(remotes: &'a Remotes, stop: &dyn Fn() -> bool) -> Option<Slot<'a>> {
    let (n, cv) = &remotes.hydration_slots;
    let mut taken = n.lock();
    while *taken >= SLOTS {
        if stop() {
            return None;
        }
        cv.wait_for(&mut taken, Duration::from_millis(200));
    }
    *taken += 1;
    Some(Slot(remotes))
}

/// `REMOTE:VOL@CKPT` → (remote, vol, ckpt).
pub fn parse_source(s: &str) -> Option<(&str, &str, &str)> {
    let (r, rest) = s.split_once(':')?;
    let (v, c) = rest.split_once('@')?;
    (!r.is_empty() && !v.is_empty() && !c.is_empty()).then_some((r, v, c))
}

/// Fetches the manifest of `vol@ckpt` in `remote`.
pub fn fetch_manifest(remotes: &Remotes, remote: &str, vol: &str, ckpt: &str) -> Result<Manifest> {
    let (cfg, client) = remotes.client(remote)?;
    get_manifest(remotes, &client, key(&cfg, &manifest_rel(vol, ckpt)))?
        .ok_or_else(|| anyhow!("remote {remote:?} has no checkpoint {vol}@{ckpt}"))
}

/// Creates `name` pointing at the remote checkpoint's records. Returns the volume's info, the
/// manifest's stored bytes, and the name's reservation (hold it while the volume must not be
/// touched: an eager restore holds it until hydration ends).
pub fn create(
    remotes: &Arc<Remotes>,
    store: &Store,
    name: &str,
    source: &str,
    eager: bool,
) -> Result<(VolumeInfo, u64, Reservation)> {
    let (remote, vol, ckpt) =
        parse_source(source).ok_or_else(|| anyhow!("expected REMOTE:VOL@CKPT, got {source:?}"))?;
    strata_engine::validate_name("volume", name)?;
    // The name is ours until the caller drops the reservation: a second restore to it, a
    // plain create, a delete or an export of it is refused meanwhile, and only a volume this
    // call created is ever deleted by it.
    let reserved = Reservation::take(remotes, name)?;
    if store.volume_info(name).is_ok() {
        return Err(EngineError::VolumeExists(name.to_string()).into());
    }
    // `VOL@latest` is a failover: this store takes the volume over in the remote first
    // (fencing the store that protected it: its next round stops), then starts from the
    // newest protection checkpoint.
    let latest;
    let (ckpt, source) = if ckpt == "latest" {
        remotes.take_ownership(remote, vol)?;
        let newest = super::gc::protection_checkpoints(remotes, remote, vol)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("remote {remote:?} has no protection checkpoint of {vol}"))?
            .1;
        latest = (newest.clone(), format!("{remote}:{vol}@{newest}"));
        (latest.0.as_str(), latest.1.as_str())
    } else {
        (ckpt, source)
    };
    let m = fetch_manifest(remotes, remote, vol, ckpt)?;
    let descs: Vec<Vec<u8>> = m
        .header
        .packs
        .iter()
        .map(|p| Remotes::pack_desc(remote, &p.key))
        .collect();
    let refs: Vec<&[u8]> = descs.iter().map(|d| d.as_slice()).collect();
    let ids = store.register_remote_packs(&refs)?;
    let record = |state: &str| Restoring {
        remote: remote.to_string(),
        source: source.to_string(),
        state: state.into(),
        eager,
        push_id: m.header.push_id.clone(),
    };
    store.create_volume(
        name,
        m.header.size,
        VolumeOptions {
            block_size: Some(m.header.block_size),
            lz4: m.header.lz4,
            ephemeral: false,
            // A tree volume is the only kind with this size.
            tree: m.header.size == strata_engine::TREE_VOLUME_SIZE,
        },
    )?;
    // Recorded once the volume is ours; a crash from here until `hydrating` deletes it at
    // the next start (its map may be incomplete).
    let made = remotes
        .set_restoring(name, Some(record("creating")))
        .and_then(|()| {
            let v = store.open_volume(name)?;
            let extents: Vec<(u64, RemoteExtent)> = m
                .extents
                .iter()
                .map(|x| {
                    (
                        x.block,
                        RemoteExtent {
                            pack: ids[x.pack as usize],
                            offset: x.offset,
                            stored_len: x.stored_len,
                            lz4: x.lz4,
                            crc: x.crc,
                        },
                    )
                })
                .collect();
            v.install_remote(&extents)?;
            v.flush()?;
            Ok(store.volume_info(name)?)
        });
    match made {
        Ok(info) => {
            remotes.set_restoring(name, Some(record("hydrating")))?;
            Ok((info, m.stored_bytes(), reserved))
        }
        Err(e) => {
            discard(remotes, store, name);
            Err(e)
        }
    }
}

/// Deletes a volume whose restore failed. Its record is cleared only once it is gone: if the
/// delete fails (the volume is open), the record stays `creating` or `hydrating`, and the
/// next start deletes or finishes it.
pub fn discard(remotes: &Remotes, store: &Store, name: &str) {
    match store.delete_volume(name) {
        Ok(()) | Err(EngineError::NoSuchVolume(_)) => {
            if let Err(e) = remotes.set_restoring(name, None) {
                tracing::error!(volume = name, error = %format!("{e:#}"), "clearing the restore record");
            }
        }
        Err(e) => {
            tracing::warn!(volume = name, error = %e, "could not delete the failed restore; the next start retries")
        }
    }
}

/// A volume name being created from a remote, released on drop.
#[derive(Debug)]
pub struct Reservation(Arc<Remotes>, String);

impl Reservation {
    fn take(remotes: &Arc<Remotes>, name: &str) -> Result<Self> {
        if !remotes.creating.lock().insert(name.to_string()) {
            bail!("volume {name:?} is already being restored from a remote");
        }
        Ok(Reservation(remotes.clone(), name.to_string()))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.creating.lock().remove(&self.1);
    }
}

/// Copies every remote block of `name` in, with [`WORKERS`] threads; then, for an eager
/// restore, takes the source checkpoint on it. Returns whether it completed (`false`: the
/// hydration was cancelled, the volume deleted or the daemon is stopping); a background
/// hydration retries a failing remote until then, a job's fails.
pub fn hydrate(
    remotes: &Arc<Remotes>,
    store: &Arc<Store>,
    name: &str,
    job: Option<&Job>,
) -> Result<bool> {
    let h = Arc::new(Hydration::default());
    remotes.hydrating.lock().insert(name.to_string(), h.clone());
    let r = hydrate_inner(remotes, store, name, job, &h);
    remotes.hydrating.lock().remove(name);
    r
}

fn hydrate_inner(
    remotes: &Arc<Remotes>,
    store: &Arc<Store>,
    name: &str,
    job: Option<&Job>,
    h: &Arc<Hydration>,
) -> Result<bool> {
    let stop = || remotes.stopping.load(Ordering::Relaxed) || h.cancel.load(Ordering::Relaxed);
    h.queued.store(true, Ordering::Relaxed);
    let slot = take_slot(remotes, &stop);
    h.queued.store(false, Ordering::Relaxed);
    let Some(_slot) = slot else {
        return Ok(false);
    };
    let started = std::time::Instant::now();
    // Under a rate limit, steps of at most a second's worth, so the rate holds from the start.
    let step_bytes = remotes
        .hydrate_rate
        .filter(|r| *r > 0)
        .map_or(STEP_BYTES, |r| r.min(STEP_BYTES));
    // Holds hydration to `--hydrate-rate`, so copying in leaves the guest its bandwidth.
    let pace = || {
        if let Some(rate) = remotes.hydrate_rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(
                h.fetched_bytes.load(Ordering::Relaxed) as f64 / rate as f64,
            );
            let elapsed = started.elapsed();
            if due > elapsed && !stop() {
                std::thread::sleep((due - elapsed).min(Duration::from_secs(1)));
            }
        }
    };
    loop {
        let blocks = {
            let info = match store.volume_info(name) {
                Ok(i) => i,
                Err(EngineError::NoSuchVolume(_)) => {
                    remotes.set_restoring(name, None)?;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            };
            info.size.div_ceil(u64::from(info.block_size))
        };
        // The next stripe to take: stripes start at mapped blocks, so a sparse volume (a
        // tree's is 2^62 bytes) costs its mapped stripes, not its size.
        let next = parking_lot::Mutex::new(0u64);
        let failed = parking_lot::Mutex::new(None::<String>);
        let claim = || -> Result<Option<u64>, String> {
            let mut at = next.lock();
            if *at >= blocks {
                return Ok(None);
            }
            match store
                .next_mapped_block(name, *at)
                .map_err(|e| e.to_string())?
            {
                Some(b) if b < blocks => {
                    *at = b.saturating_add(STRIPE);
                    Ok(Some(b))
                }
                _ => {
                    *at = blocks;
                    Ok(None)
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 0..WORKERS {
                s.spawn(|| {
                    while !stop() {
                        let first = match claim() {
                            Ok(Some(f)) => f,
                            Ok(None) => return,
                            Err(e) => {
                                *failed.lock() = Some(e);
                                return;
                            }
                        };
                        let mut from = Some(first);
                        while let Some(f) = from {
                            if stop() {
                                return;
                            }
                            // No handle: hydration neither keeps the volume busy nor
                            // ends an ephemeral one.
                            let step = store.hydrate_step(name, f, first + STRIPE, step_bytes);
                            match step {
                                Ok((n, bytes)) => {
                                    from = n;
                                    h.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
                                    if let Some(j) = job {
                                        j.done.fetch_add(bytes, Ordering::Relaxed);
                                    }
                                    pace();
                                }
                                Err(e) => {
                                    *failed.lock() = Some(e.to_string());
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        if stop() {
            return Ok(false);
        }
        if let Some(e) = failed.into_inner() {
            if store.volume_info(name).is_err() {
                remotes.set_restoring(name, None)?;
                return Ok(false);
            }
            tracing::warn!(volume = name, error = %e, "hydration failed; retrying");
            *h.error.lock() = Some(e.clone());
            if job.is_some() {
                bail!("hydrating {name}: {e}");
            }
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        *h.error.lock() = None;
        if store.remote_blocks(name)? == 0 {
            break;
        }
    }
    let Some(r) = remotes.restoring().get(name).cloned() else {
        return Ok(false);
    };
    if r.eager {
        if let Some((remote, vol, ckpt)) = parse_source(&r.source) {
            // Nothing could write to the volume while it was restored eagerly, so it equals
            // the remote checkpoint: take it locally, and record it as held by the remote so
            // that later pushes of this volume are incremental against it.
            match store.checkpoint(name, ckpt) {
                Ok(c) => {
                    if let Some(e) = store
                        .checkpoint_entries(name)?
                        .into_iter()
                        .find(|e| e.name == c.name)
                    {
                        remotes.record_pushed(
                            remote,
                            e.id,
                            &manifest_rel(vol, ckpt),
                            &r.push_id,
                        )?;
                    }
                }
                // Someone named a checkpoint so meanwhile: its content is not known to
                // match, so it is not recorded.
                Err(EngineError::CheckpointExists { .. }) => {
                    tracing::warn!(
                        volume = name,
                        checkpoint = ckpt,
                        "a checkpoint of that name exists; not taking the restored one"
                    );
                }
                Err(e) => return Err(e).context("taking the restored checkpoint"),
            }
        }
    }
    remotes.set_restoring(name, None)?;
    tracing::info!(volume = name, source = %r.source, "hydration complete");
    Ok(true)
}

/// Starts background hydration of `name` on its own thread.
pub fn spawn_hydration(remotes: &Arc<Remotes>, store: &Arc<Store>, name: &str) {
    let (remotes, store, name) = (remotes.clone(), store.clone(), name.to_string());
    let spawned = std::thread::Builder::new()
        .name(format!("hydrate-{name}"))
        .spawn(move || {
            if let Err(e) = hydrate(&remotes, &store, &name, None) {
                tracing::error!(volume = %name, error = %format!("{e:#}"), "hydration stopped");
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting hydration");
    }
}

/// At daemon start: drops volumes whose creation from a remote was interrupted (their map
/// is incomplete) and resumes hydration of the others.
pub fn resume(remotes: &Arc<Remotes>, store: &Arc<Store>) {
    for (name, r) in remotes.restoring() {
        if r.state == "creating" {
            tracing::warn!(volume = %name, source = %r.source, "restore from remote was interrupted before the volume was complete; deleting it");
            let _ = store.delete_volume(&name);
            let _ = remotes.set_restoring(&name, None);
        } else {
            tracing::info!(volume = %name, source = %r.source, "resuming hydration");
            spawn_hydration(remotes, store, &name);
        }
    }
}

/// After a restore or a fork: a checkpoint taken while its volume was still hydrating holds
/// remote entries, and so does a volume restored to it or forked from it. Hydrate those too.
pub fn ensure_hydrating(remotes: &Arc<Remotes>, store: &Arc<Store>, name: &str) {
    // O(1) here (restore and fork stay O(1)): the hydration thread walks the map, and
    // ends at once, clearing the record, if nothing is remote.
    if !store.may_read_remote(name).unwrap_or(false)
        || remotes.restoring().contains_key(name)
        || remotes.hydrating.lock().contains_key(name)
    {
        return;
    }
    let r = Restoring {
        // Which remote is not known without walking the map; `remote remove` walks it.
        remote: String::new(),
        source: format!("{name} (restored or forked from a checkpoint with remote blocks)"),
        state: "hydrating".into(),
        eager: false,
        push_id: String::new(),
    };
    if let Err(e) = remotes.set_restoring(name, Some(r)) {
        tracing::error!(volume = name, error = %format!("{e:#}"), "recording hydration");
        return;
    }
    spawn_hydration(remotes, store, name);
}

/// Stops the hydration of `name` (before deleting the volume) and waits for it to let go.
pub fn cancel(remotes: &Remotes, name: &str) {
    let h = remotes.hydrating.lock().get(name).cloned();
    if let Some(h) = h {
        h.cancel.store(true, Ordering::Relaxed);
        for _ in 0..3000 {
            if !remotes.hydrating.lock().contains_key(name) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
