//! `strata checkpoint push`: upload a checkpoint as packs plus a manifest, manifest last.
//!
//! Incremental: the nearest ancestor of the checkpoint (through forks) that this remote
//! already holds is the base; blocks whose map entry is unchanged since the base keep the
//! base manifest's extents, blocks still held remotely in this remote (a lazily restored
//! volume) keep their pack, and only the rest is read and uploaded. A push in progress is
//! announced by a lease object (which also lists the existing packs it will reference, so a
//! concurrent `remote gc` keeps them); an interrupted push resumes with the same push id and
//! skips packs already in the bucket.

use super::manifest::{Extent, Header, Manifest, PackRef};
use super::{clean, key, manifest_rel, Remotes};
use crate::jobs::Job;
use anyhow::{anyhow, bail, ensure, Context, Result};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use strata_engine::{Snapshot, Store};

/// Target size of one pack object.
pub const PACK_BYTES: usize = 16 << 20;
/// Pack uploads in flight at once.
const IN_FLIGHT: usize = 4;
/// Largest manifest read: 64 Mi mapped blocks (256 GiB of 4 KiB blocks).
pub const MAX_MANIFEST: u64 = 256 << 20;
/// Bytes of records read per batch.
const READ_BATCH: usize = 4 << 20;

enum Plan {
    Reuse(Extent),
    Upload(strata_engine::BlockRecord),
}

/// A block while a push is planned: its content is the base's (the base manifest's extent:
/// unchanged since the base, or rewritten with the same bytes), or listed with its record.
enum Item {
    Kept(Extent),
    Listed(u64, strata_engine::BlockRecord),
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The extents (sorted by block) whose block lies outside every run of `runs` (sorted, not
/// overlapping `(first block, blocks)`).
fn outside_runs(extents: &[Extent], runs: &[(u64, u64)]) -> Vec<Extent> {
    let mut ri = 0;
    let mut out = Vec::with_capacity(extents.len());
    for x in extents {
        while ri < runs.len() && runs[ri].0 + runs[ri].1 <= x.block {
            ri += 1;
        }
        if !(ri < runs.len() && runs[ri].0 <= x.block) {
            out.push(*x);
        }
    }
    out
}

/// Gets and decodes a manifest; `Ok(None)` when it does not exist.
pub fn get_manifest(
    remotes: &Remotes,
    client: &Arc<dyn ObjectStore>,
    path: object_store::path::Path,
) -> Result<Option<Manifest>> {
    let c = client.clone();
    let shown = path.to_string();
    match remotes.run(async move { super::get_small(&c, &path).await })?? {
        Some(b) => Manifest::decode(&b)
            .with_context(|| format!("manifest {shown}"))
            .map(Some),
        None => Ok(None),
    }
}

/// Size of an object, `None` when it does not exist.
fn object_len(
    remotes: &Remotes,
    client: &Arc<dyn ObjectStore>,
    path: object_store::path::Path,
) -> Result<Option<u64>> {
    let c = client.clone();
    let shown = path.to_string();
    match remotes.run(async move { c.head(&path).await })? {
        Ok(m) => Ok(Some(m.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => bail!("looking up {shown}: {}", clean(&e)),
    }
}

pub fn push(
    remotes: &Arc<Remotes>,
    store: &Store,
    job: &Job,
    snap: Snapshot,
    remote: &str,
) -> Result<Value> {
    let started = std::time::Instant::now();
    let (cfg, client) = remotes.client(remote)?;
    let (vol, ckpt) = snap
        .name()
        .split_once('@')
        .map(|(v, c)| (v.to_string(), c.to_string()))
        .ok_or_else(|| anyhow!("not a checkpoint: {}", snap.name()))?;
    let mrel = manifest_rel(&vol, &ckpt);
    // Whether the remote already holds it, asked while the base is looked up.
    let exists = {
        let (c, path) = (client.clone(), key(&cfg, &mrel));
        remotes.spawn(async move { c.head(&path).await })
    };

    // The base: the nearest ancestor this remote holds, whose manifest is still there.
    let mut base: Option<(Snapshot, Manifest, String)> = None;
    for a in snap.ancestors() {
        let Some(p) = remotes.pushed(remote, a) else {
            continue;
        };
        let Ok(bsnap) = store.open_checkpoint_id(a) else {
            continue;
        };
        let got = match get_manifest(remotes, &client, key(&cfg, &p.key)) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(manifest = %p.key, error = %format!("{e:#}"), "base manifest unreadable; not using it as a base");
                continue;
            }
        };
        match got {
            // Only the very manifest recorded (same push id): one deleted and pushed again
            // under that key, by another store, holds other data.
            Some(m)
                if m.header.push_id == p.push_id && m.header.block_size == snap.block_size() =>
            {
                base = Some((bsnap, m, p.key));
                break;
            }
            Some(m) if m.header.push_id != p.push_id => remotes.forget_manifest(remote, &p.key)?,
            Some(_) => continue,
            None => remotes.forget_manifest(remote, &p.key)?,
        }
    }
    match remotes.run(exists)? {
        Ok(Ok(_)) => {
            // Ours if its push id is the one recorded for this checkpoint, or the one of our
            // unfinished push (a crash after the manifest was written).
            let ours = [
                remotes.pushed(remote, snap.id()).map(|p| p.push_id),
                remotes.pending(remote, snap.id()),
            ];
            if let Some(m) = get_manifest(remotes, &client, key(&cfg, &mrel))? {
                if ours.iter().flatten().any(|id| *id == m.header.push_id) {
                    remotes.record_pushed(remote, snap.id(), &mrel, &m.header.push_id)?;
                    return Ok(
                        json!({"manifest": mrel, "already_pushed": true, "uploaded_bytes": 0}),
                    );
                }
            }
            bail!("remote {remote:?} already holds {vol}@{ckpt} (from another store, or from a checkpoint since deleted and retaken); delete it there first");
        }
        Ok(Err(object_store::Error::NotFound { .. })) => {}
        Ok(Err(e)) => bail!("looking up {mrel}: {}", clean(&e)),
        Err(e) => bail!("looking up {mrel}: {e}"),
    }
    let based_at = started.elapsed();
    let (push_id, resuming) = remotes.push_id(remote, snap.id())?;

    // Plan every mapped block: reuse an extent already in the remote, or upload.
    let mut packs: Vec<PackRef> = Vec::new();
    let mut pack_idx: HashMap<String, u32> = HashMap::new();
    let mut add_pack = |packs: &mut Vec<PackRef>, key: &str, len: u64| -> u32 {
        *pack_idx.entry(key.to_string()).or_insert_with(|| {
            packs.push(PackRef {
                key: key.to_string(),
                len,
            });
            (packs.len() - 1) as u32
        })
    };
    // With a base, only the blocks changed since it are listed (their records read): the
    // base manifest's extents outside the changed runs are the unchanged blocks, so a round
    // of a protected volume costs what changed, not the whole map. Without one, every mapped
    // block is listed.
    let listing = || format!("listing the records of {}", snap.name());
    let mut unchanged: Vec<Extent> = Vec::new();
    let mut records = Vec::new();
    if let Some((bsnap, m, _)) = &base {
        let runs = snap.changed_runs_since(bsnap);
        records = snap.records_in(&runs).with_context(listing)?;
        unchanged = outside_runs(&m.extents, &runs);
        let (listed, mapped) = (
            (unchanged.len() + records.len()) as u64,
            snap.mapped_blocks(),
        );
        if listed != mapped {
            // The base manifest does not list what the base checkpoint maps (it should, by
            // construction): not trusted, the push is a full one.
            tracing::warn!(checkpoint = %snap.name(), base = %m.header.checkpoint, listed,
                           mapped, "the base manifest does not match its checkpoint; pushing in full");
            base = None;
            unchanged.clear();
        }
    }
    if base.is_none() {
        records = snap.records().with_context(listing)?;
    }
    let base_packs: &[PackRef] = base.as_ref().map_or(&[], |(_, m, _)| &m.header.packs);
    // The pack index (in this push's manifest) of each base pack, once looked up.
    let mut base_idx: Vec<Option<u32>> = vec![None; base_packs.len()];
    let mut remote_idx: HashMap<u32, Option<u32>> = HashMap::new();
    let mut plan = Vec::with_capacity(records.len() + unchanged.len());
    let mut upload_bytes = 0u64;
    let mut rewritten_same = 0u64;
    // The unchanged blocks and the listed ones, merged in block order.
    let mut items = Vec::with_capacity(records.len() + unchanged.len());
    let mut kept = unchanged.into_iter().peekable();
    for (blk, e) in records {
        items.extend(std::iter::from_fn(|| kept.next_if(|x| x.block < blk)).map(Item::Kept));
        items.push(Item::Listed(blk, e));
    }
    items.extend(kept.map(Item::Kept));
    // A changed block rewritten with the bytes it had in the base (a block copied again, an
    // image imported again) keeps the base's extent too.
    let mut same_as_base = |blk: u64, e: &strata_engine::BlockRecord| -> Result<Option<Extent>> {
        let Some((bsnap, m, _)) = &base else {
            return Ok(None);
        };
        let Ok(i) = m.extents.binary_search_by_key(&blk, |x| x.block) else {
            return Ok(None);
        };
        // The manifest holds the crc32 of the base's stored bytes: no read of the base's
        // checksum table unless they may be the same.
        let x = &m.extents[i];
        if x.crc != e.crc || x.stored_len != e.stored_len() || x.lz4 != e.is_lz4() {
            return Ok(None);
        }
        Ok(match bsnap.record(blk)? {
            Some(be)
                if be.crc == e.crc
                    && be.len_flags == e.len_flags
                    && !be.is_remote()
                    && !e.is_remote() =>
            {
                let eq = store.read_record(&be)? == store.read_record(e)?;
                rewritten_same += u64::from(eq);
                eq.then_some(m.extents[i])
            }
            _ => None,
        })
    };
    for item in items {
        let item = match item {
            Item::Listed(blk, e) => match same_as_base(blk, &e)? {
                Some(x) => Item::Kept(x),
                None => Item::Listed(blk, e),
            },
            kept => kept,
        };
        let (blk, e) = match item {
            Item::Kept(x) => {
                // Looked up once per base pack, not once per block.
                let idx = match base_idx[x.pack as usize] {
                    Some(i) => i,
                    None => {
                        let p = &base_packs[x.pack as usize];
                        let i = add_pack(&mut packs, &p.key, p.len);
                        base_idx[x.pack as usize] = Some(i);
                        i
                    }
                };
                plan.push((x.block, Plan::Reuse(Extent { pack: idx, ..x })));
                continue;
            }
            Item::Listed(blk, e) => (blk, e),
        };
        if let Some(x) = e.remote() {
            // Still remote in this very remote: keep pointing at its pack (its index in this
            // manifest, looked up once per pack).
            let found = match remote_idx.get(&x.pack) {
                Some(f) => *f,
                None => {
                    let f = match store
                        .remote_pack(x.pack)
                        .and_then(|d| Remotes::parse_desc(&d))
                    {
                        Some((r, k)) if r == remote => object_len(remotes, &client, key(&cfg, &k))?
                            .map(|len| add_pack(&mut packs, &k, len)),
                        _ => None,
                    };
                    remote_idx.insert(x.pack, f);
                    f
                }
            };
            if let Some(idx) = found {
                plan.push((
                    blk,
                    Plan::Reuse(Extent {
                        block: blk,
                        pack: idx,
                        offset: x.offset,
                        stored_len: x.stored_len,
                        crc: x.crc,
                        lz4: x.lz4,
                    }),
                ));
                continue;
            }
        }
        upload_bytes += u64::from(e.stored_len());
        plan.push((blk, Plan::Upload(e)));
    }
    job.total.store(upload_bytes, Ordering::Relaxed);
    let planned_at = started.elapsed();

    // The lease: announces the push and the existing packs it references.
    let lease_path = key(&cfg, &format!("leases/{push_id}"));
    let lease = json!({"started_unix": now_unix(), "checkpoint": snap.name(),
                       "reused": packs.iter().map(|p| p.key.clone()).collect::<Vec<_>>()});
    // Written while the first packs upload; waited for before the manifest.
    let lease_put = {
        let (c, path, body) = (client.clone(), lease_path.clone(), lease.to_string());
        remotes.spawn(async move { c.put(&path, PutPayload::from(body.into_bytes())).await })
    };

    // Upload the rest into packs, a few in flight.
    let mut extents = Vec::with_capacity(plan.len());
    type Upload = tokio::task::JoinHandle<Result<(String, u64)>>;
    let mut inflight: std::collections::VecDeque<Upload> = Default::default();
    let mut buf: Vec<u8> = Vec::with_capacity(PACK_BYTES + (1 << 20));
    let (mut uploaded, mut skipped, mut pack_no) = (0u64, 0u64, 0u32);
    // Each batch of records is read no sooner than the push's rate allows (`--push-rate`,
    // and backing off while the guests' IO slows down: `governor`), so a push leaves the
    // guests their CPU and bandwidth.
    let mut pacer = super::governor::Pacer::new(&remotes.push);
    let load = || super::governor::Load::now(store.io_load());
    let mut finish = |buf: Vec<u8>,
                      packs: &mut Vec<PackRef>,
                      inflight: &mut std::collections::VecDeque<_>,
                      pack_no: &mut u32|
     -> Result<u32> {
        // The name carries the content's crc32: a resumed push whose plan came out
        // differently never mistakes an earlier pack for this one.
        let k = format!(
            "packs/{push_id}-{:06}-{:08x}.pack",
            *pack_no,
            crc32fast::hash(&buf)
        );
        *pack_no += 1;
        let len = buf.len() as u64;
        let idx = add_pack(packs, &k, len);
        let path = key(&cfg, &k);
        let c = client.clone();
        inflight.push_back(remotes.spawn(async move {
            // A resumed push finds its earlier packs (same name: same content).
            if resuming {
                if let Ok(m) = c.head(&path).await {
                    if m.size == len {
                        return Ok((k, 0));
                    }
                }
            }
            c.put(&path, PutPayload::from(buf))
                .await
                .map_err(|e| anyhow!("uploading {path}: {}", clean(&e)))?;
            Ok((k, len))
        }));
        Ok(idx)
    };
    let wait_one = |inflight: &mut std::collections::VecDeque<Upload>,
                    uploaded: &mut u64,
                    skipped: &mut u64|
     -> Result<()> {
        if let Some(h) = inflight.pop_front() {
            let (_, n) = remotes
                .run(h)?
                .map_err(|e| anyhow!("pack upload task: {e}"))??;
            if n == 0 {
                *skipped += 1;
            }
            *uploaded += n;
        }
        Ok(())
    };
    // Extents of the pack being filled, completed with its index when it is sent.
    let mut open: Vec<Extent> = Vec::new();
    let mut done_bytes = 0u64;
    // Records to upload are read in batches (adjacent records in one IO, straight into the
    // pack), verified against their crc32 as they are read.
    let mut batch: Vec<(u64, strata_engine::BlockRecord)> = Vec::new();
    let mut batch_bytes = 0usize;
    let last = plan.len();
    for (i, (blk, p)) in plan.into_iter().enumerate() {
        match p {
            Plan::Reuse(x) => extents.push(x),
            Plan::Upload(e) => {
                batch_bytes += e.stored_len() as usize;
                batch.push((blk, e));
            }
        }
        if batch.is_empty() || (batch_bytes < READ_BATCH && i + 1 < last) {
            continue;
        }
        {
            pacer.pace(batch_bytes, &load, &remotes.stopping);
            let entries: Vec<_> = batch.iter().map(|(_, e)| *e).collect();
            let start = buf.len();
            store
                .read_records(&entries, &mut buf)
                .with_context(|| format!("reading {} to push it", snap.name()))?;
            let mut at = start;
            for (b, e) in batch.drain(..) {
                open.push(Extent {
                    block: b,
                    pack: u32::MAX,
                    offset: at as u32,
                    stored_len: e.stored_len(),
                    crc: e.crc,
                    lz4: e.is_lz4(),
                });
                at += e.stored_len() as usize;
            }
            done_bytes += batch_bytes as u64;
            batch_bytes = 0;
            {
                if buf.len() >= remotes.push.pack_bytes(PACK_BYTES) {
                    while inflight.len() >= IN_FLIGHT {
                        wait_one(&mut inflight, &mut uploaded, &mut skipped)?;
                        job.done.store(uploaded.min(done_bytes), Ordering::Relaxed);
                    }
                    let full =
                        std::mem::replace(&mut buf, Vec::with_capacity(PACK_BYTES + (1 << 20)));
                    let idx = finish(full, &mut packs, &mut inflight, &mut pack_no)?;
                    extents.extend(open.drain(..).map(|x| Extent { pack: idx, ..x }));
                }
            }
        }
    }
    if !buf.is_empty() {
        let idx = finish(buf, &mut packs, &mut inflight, &mut pack_no)?;
        extents.extend(open.drain(..).map(|x| Extent { pack: idx, ..x }));
    }
    while !inflight.is_empty() {
        wait_one(&mut inflight, &mut uploaded, &mut skipped)?;
        job.done.store(uploaded, Ordering::Relaxed);
    }
    let uploaded_at = started.elapsed();
    extents.sort_unstable_by_key(|x| x.block);

    // The commit point: the manifest, once every pack it names is in the bucket.
    let manifest = Manifest {
        header: Header {
            volume: vol.clone(),
            checkpoint: ckpt.clone(),
            size: snap.size(),
            block_size: snap.block_size(),
            lz4: snap.lz4(),
            created_unix: now_unix(),
            base: base
                .as_ref()
                .map(|(_, m, _)| format!("{}@{}", m.header.volume, m.header.checkpoint)),
            push_id: push_id.clone(),
            packs,
        },
        extents,
    };
    let bytes = manifest.encode()?;
    let encoded_at = started.elapsed();
    let manifest_bytes = bytes.len() as u64;
    ensure!(
        manifest_bytes <= MAX_MANIFEST,
        "the manifest of {} would be {manifest_bytes} bytes, over the {MAX_MANIFEST}-byte limit restores accept",
        snap.name()
    );
    // The lease first, then a check that every pack the manifest names is there, its own
    // included (a push outliving its lease, a base pack a gc took meanwhile): a manifest
    // never names a missing pack.
    match remotes.run(lease_put)? {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => bail!("uploading the push lease: {}", clean(&e)),
        Err(e) => bail!("uploading the push lease: {e}"),
    }
    let check: Vec<(object_store::path::Path, u64)> = manifest
        .header
        .packs
        .iter()
        .map(|p| (key(&cfg, &p.key), p.len))
        .collect();
    let c = client.clone();
    let missing = remotes.run(async move {
        let heads = futures::future::join_all(check.iter().map(|(p, _)| c.head(p))).await;
        check
            .iter()
            .zip(heads)
            .find(|((_, len), h)| !matches!(h, Ok(m) if m.size == *len))
            .map(|((p, _), h)| match h {
                Err(e) => format!("{p}: {}", clean(&e)),
                Ok(m) => format!("{p} is {} bytes", m.size),
            })
    })?;
    if let Some(m) = missing {
        bail!("a pack this checkpoint needs is no longer in the remote ({m}); push again");
    }
    put(remotes, &client, key(&cfg, &mrel), bytes)?;
    let put_at = started.elapsed();
    remotes.record_pushed(remote, snap.id(), &mrel, &push_id)?;
    // The lease has done its job; its deletion is not waited for (gc ignores it once it
    // expires if it fails).
    let c = client.clone();
    remotes.spawn(async move {
        if let Err(e) = c.delete(&lease_path).await {
            tracing::warn!(error = %clean(&e), "deleting the push lease failed");
        }
    });
    remotes.count(remote, 2, uploaded + manifest_bytes);
    let secs = started.elapsed().as_secs_f64();
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1000.0).round();
    let phases = json!({"base": ms(based_at), "plan": ms(planned_at - based_at), "upload": ms(uploaded_at - planned_at),
                        "encode": ms(encoded_at - uploaded_at), "manifest_put": ms(put_at - encoded_at),
                        "record": ms(started.elapsed() - put_at)});
    tracing::info!(checkpoint = %snap.name(), remote, uploaded, secs, "pushed");
    Ok(json!({
        "manifest": mrel,
        "base": manifest.header.base,
        "blocks": manifest.extents.len(),
        "uploaded_bytes": uploaded,
        "uploaded_packs": pack_no as u64 - skipped,
        "resumed_packs": skipped,
        "rewritten_unchanged_blocks": rewritten_same,
        "manifest_bytes": manifest_bytes,
        "stored_bytes": manifest.stored_bytes(),
        "seconds": secs,
        "phases_ms": phases,
    }))
}

pub fn put(
    remotes: &Remotes,
    client: &Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    bytes: Vec<u8>,
) -> Result<()> {
    let c = client.clone();
    let shown = path.to_string();
    remotes
        .run(async move { c.put(&path, PutPayload::from(bytes)).await })?
        .map_err(|e| anyhow!("uploading {shown}: {}", clean(&e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(block: u64) -> Extent {
        Extent {
            block,
            pack: 0,
            offset: 0,
            stored_len: 4096,
            crc: block as u32,
            lz4: false,
        }
    }

    #[test]
    fn outside_runs_keeps_exactly_the_blocks_no_run_covers() {
        let extents: Vec<Extent> = [0, 1, 2, 5, 6, 9, 10, 11, 20, 30].map(ext).to_vec();
        let blocks = |v: Vec<Extent>| v.iter().map(|x| x.block).collect::<Vec<_>>();
        // Runs starting before, between and after extents; one covering none; touching ends.
        let runs = [(1, 2), (4, 2), (7, 2), (11, 5), (25, 1)];
        assert_eq!(
            blocks(outside_runs(&extents, &runs)),
            vec![0, 6, 9, 10, 20, 30]
        );
        assert_eq!(blocks(outside_runs(&extents, &[])), blocks(extents.clone()));
        assert!(outside_runs(&extents, &[(0, 31)]).is_empty());
        assert!(outside_runs(&[], &runs).is_empty());
    }
}
