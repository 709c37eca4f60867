//! Opening a store: rebuild the in-memory maps from RocksDB, replay the journal, sweep
//! unreferenced pages, and discard ephemeral volumes.
//!
//! Layers are built parents first: a layer's tree is its parent's tree (an O(1) clone) with
//! the layer's own leaf records laid over it, so the cost of loading is the number of leaf
//! records, not the number of layers times the map size.

use crate::codec::{self, CheckpointRecord, JournalEntry, LayerRecord, StateRecord, VolumeRecord};
use crate::io::Op;
use crate::ops;
use crate::segment::PAGE_SIZE;
use crate::store::{cf, CheckpointMeta, FrozenLayer, Inner};
use crate::tree::{leaf_index, Tree};
use crate::volume::{apply_changes, Change, HeadMap, VolumeState};
use crate::{Error, Result};
use rocksdb::IteratorMode;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

struct Built {
    tree: Tree,
    own: HashSet<u64>,
    mapped: u64,
    /// This layer or an ancestor has a remote entry in its own leaves (noticed while the
    /// entries are counted anyway): the volume's `maybe_remote` hint.
    remote: bool,
}

fn scan<T>(
    inner: &Inner,
    cf_name: &str,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for item in inner
        .db
        .iterator_cf(cf(&inner.db, cf_name)?, IteratorMode::Start)
    {
        let (k, v) = item?;
        out.push(f(&k, &v)?);
    }
    Ok(out)
}

pub(crate) fn load(
    inner: &Arc<Inner>,
    state: &StateRecord,
    journal: Vec<JournalEntry>,
) -> Result<()> {
    let layers: HashMap<u64, LayerRecord> = scan(inner, codec::CF_LAYERS, |k, v| {
        Ok((codec::decode_u64_key(k)?, LayerRecord::decode(v)?))
    })?
    .into_iter()
    .collect();
    let volumes = scan(inner, codec::CF_VOLUMES, |k, v| {
        let name =
            String::from_utf8(k.to_vec()).map_err(|_| Error::Corrupt("volume name".into()))?;
        Ok((name, VolumeRecord::decode(v)?))
    })?;
    let checkpoints = scan(inner, codec::CF_CHECKPOINTS, |k, v| {
        Ok((
            codec::decode_checkpoint_key(k)?,
            CheckpointRecord::decode(v)?,
        ))
    })?;
    let sizes: HashMap<u64, (u64, u32)> = volumes
        .iter()
        .map(|(_, r)| (r.id, (r.size, r.block_size)))
        .collect();
    let built = build_layers(inner, &layers, &sizes)?;

    let mut cat = inner.catalog.lock();
    cat.next_layer = state
        .next_layer
        .max(layers.keys().max().map_or(1, |m| m + 1));
    cat.next_volume = state
        .next_volume
        .max(volumes.iter().map(|(_, r)| r.id + 1).max().unwrap_or(1));
    let mut built = built;
    for (name, rec) in &volumes {
        let b = built
            .remove(&rec.head)
            .ok_or_else(|| Error::Corrupt(format!("volume {name} has no head layer")))?;
        let parent = layers.get(&rec.head).map_or(0, |l| l.parent);
        let head = HeadMap {
            layer: rec.head,
            parent,
            tree: b.tree,
            own: b.own,
            dirty: HashSet::new(),
            mapped_blocks: b.mapped,
        };
        cat.volumes.insert(
            name.clone(),
            Arc::new(VolumeState::new(rec, name.clone(), head, b.remote)),
        );
    }
    for ((vid, name), rec) in checkpoints {
        cat.checkpoints.insert(
            (vid, name),
            CheckpointMeta {
                layer: rec.layer,
                size: rec.size,
                created_unix: rec.created_unix,
                pins: Default::default(),
            },
        );
    }
    for (id, b) in built {
        let Some(l) = layers.get(&id) else { continue };
        cat.frozen.insert(
            id,
            FrozenLayer {
                parent: l.parent,
                volume: l.volume,
                tree: b.tree,
                own: b.own,
                mapped_blocks: b.mapped,
            },
        );
    }
    drop(cat);

    let replayed = replay(inner, state.committed_seq, journal)?;
    let punched = inner.segments.sweep(&live_ranges(inner))?;
    tracing::info!(replayed, punched_pages = punched, "store loaded");
    inner.commit(Vec::new())?;

    let ephemeral: Vec<String> = inner
        .catalog
        .lock()
        .volumes
        .values()
        .filter(|v| v.ephemeral)
        .map(|v| v.name.clone())
        .collect();
    for name in ephemeral {
        tracing::info!(volume = %name, "discarding ephemeral volume left from a previous run");
        ops::delete_volume(inner, &name, true)?;
    }
    Ok(())
}

/// Builds every layer's tree, parents first.
fn build_layers(
    inner: &Inner,
    layers: &HashMap<u64, LayerRecord>,
    sizes: &HashMap<u64, (u64, u32)>,
) -> Result<HashMap<u64, Built>> {
    let mut own_leaves: HashMap<u64, Vec<(u64, crate::tree::Leaf)>> = HashMap::new();
    for item in inner
        .db
        .iterator_cf(cf(&inner.db, codec::CF_LEAVES)?, IteratorMode::Start)
    {
        let (k, v) = item?;
        let (layer, _object, idx) = codec::decode_leaf_key(&k)?;
        if layers.contains_key(&layer) {
            own_leaves
                .entry(layer)
                .or_default()
                .push((idx, codec::decode_leaf(&v)?));
        }
    }
    let mut kids: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut roots = Vec::new();
    for (id, l) in layers {
        if l.parent == 0 || !layers.contains_key(&l.parent) {
            roots.push(*id);
        } else {
            kids.entry(l.parent).or_default().push(*id);
        }
    }
    let mut built: HashMap<u64, Built> = HashMap::new();
    let mut stack: Vec<u64> = roots;
    let mut visited = 0usize;
    while let Some(id) = stack.pop() {
        visited += 1;
        if visited > layers.len() {
            return Err(Error::Corrupt("layer parents form a cycle".into()));
        }
        let l = layers[&id];
        let (size, bs) = sizes.get(&l.volume).copied().unwrap_or((0, 4096));
        let (mut tree, mut mapped) = match built.get(&l.parent) {
            Some(p) => (p.tree.clone(), p.mapped),
            None => (Tree::default(), 0),
        };
        let mut remote = built.get(&l.parent).is_some_and(|p| p.remote);
        tree.reserve(size.div_ceil(u64::from(bs)));
        let mut own = HashSet::new();
        for (idx, leaf) in own_leaves.remove(&id).unwrap_or_default() {
            for e in leaf.entries() {
                inner.segments.incref(e);
                remote |= e.is_remote();
            }
            let before = tree.leaf(idx).map_or(0, |l| l.len()) as u64;
            mapped = mapped + leaf.len() as u64 - before;
            tree.reserve((idx + 1) << crate::tree::LEVEL_BITS);
            tree.set_leaf(idx, leaf);
            own.insert(idx);
        }
        stack.extend(kids.remove(&id).unwrap_or_default());
        built.insert(
            id,
            Built {
                tree,
                own,
                mapped,
                remote,
            },
        );
    }
    Ok(built)
}

/// Applies journal entries newer than the last commit whose data verifies, a group (the
/// entries of one install) at a time: a group with a missing entry or a record that does not
/// verify is dropped whole, so a multi-block change is never half-replayed.
fn replay(inner: &Inner, committed: u64, journal: Vec<JournalEntry>) -> Result<usize> {
    let mut applied = 0;
    let mut max_seq = committed;
    let journal: Vec<JournalEntry> = journal.into_iter().filter(|j| j.seq > committed).collect();
    let mut i = 0;
    while i < journal.len() {
        let head = journal[i];
        max_seq = max_seq.max(head.seq);
        // Collect the group starting here: index 0, then consecutive seqs and indexes.
        let mut end = i + 1;
        let mut complete = head.index == 0;
        if complete {
            let mut last = head;
            while last.more {
                match journal.get(end) {
                    Some(n) if n.seq == last.seq + 1 && n.index == last.index + 1 => {
                        last = *n;
                        end += 1;
                    }
                    _ => {
                        complete = false;
                        break;
                    }
                }
            }
        }
        let group = &journal[i..end];
        for j in group {
            max_seq = max_seq.max(j.seq);
        }
        i = end;
        if !complete {
            continue;
        }
        let vol = {
            let cat = inner.catalog.lock();
            cat.volumes
                .values()
                .find(|v| v.map.read().layer == head.layer)
                .cloned()
        };
        let Some(vol) = vol else { continue };
        let ok = group.iter().all(|j| {
            j.layer == head.layer
                && j.block < vol.blocks()
                && j.entry
                    .is_none_or(|e| record_verifies(inner, &e, vol.block_size))
        });
        if !ok {
            continue;
        }
        for j in group {
            if let Some(e) = j.entry {
                // The record may sit only in the page cache (a process crash); the commit
                // that ends the open must sync it before its mapping goes to RocksDB.
                if let Some(seg) = inner.segments.get(e.segment) {
                    inner.segments.mark_written(&seg);
                }
                if e.is_remote() {
                    vol.maybe_remote.store(true, Ordering::Relaxed);
                }
            }
            let change = Change {
                block: j.block,
                count: u64::from(j.count.max(1)),
                new: j.entry,
                expect: None,
            };
            let mut map = vol.map.write();
            apply_changes(inner, &mut map, &[change]);
            map.dirty.insert(leaf_index(j.block));
            applied += 1;
        }
    }
    // Sequence numbers keep growing past anything seen, committed or not.
    inner.seq.fetch_max(max_seq, Ordering::Relaxed);
    Ok(applied)
}

fn record_verifies(inner: &Inner, e: &crate::tree::Entry, block_size: u32) -> bool {
    // A remote entry has no local bytes: it is verified when fetched.
    if let Some(x) = e.remote() {
        return inner.remote.has_pack(x.pack) && x.stored_len > 0 && x.stored_len <= block_size;
    }
    let Some(seg) = inner.segments.get(e.segment) else {
        return false;
    };
    if e.stored_len() == 0 || e.stored_len() > block_size {
        return false;
    }
    let op = Op::Read {
        file: seg.file.clone(),
        offset: u64::from(e.page) * PAGE_SIZE as u64,
        buf: vec![0; e.stored_len() as usize],
    };
    let done = inner.segments.engine().run(op);
    done.result.is_ok() && crc32fast::hash(&done.op.into_buf()) == e.crc
}

/// Page ranges referenced by any layer, per segment.
fn live_ranges(inner: &Inner) -> HashMap<u32, Vec<(u32, u32)>> {
    let mut live: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
    for (e, _, _) in ops::all_records(inner) {
        live.entry(e.segment).or_default().push((e.page, e.pages()));
    }
    live
}
