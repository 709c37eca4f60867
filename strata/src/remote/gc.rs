//! `strata remote gc`: delete packs no manifest references, safe against concurrent pushes.
//!
//! Listing order matters: leases first, then packs, then manifests. A push that finishes
//! after the pack listing has its manifest in the (later) manifest listing; a push running
//! at the lease listing is protected by its lease (its own packs by push id, the existing
//! packs it reuses by the lease's list); a push that starts after the lease listing writes
//! only packs younger than the grace period. Leases older than `LEASE_TTL` are ignored (a
//! crashed push) and deleted.

use super::manifest::Manifest;
use super::{clean, key, Remotes};
use anyhow::{anyhow, Result};
use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// A lease older than this belongs to a push that died.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

async fn list(
    c: &Arc<dyn ObjectStore>,
    prefix: object_store::path::Path,
) -> Result<Vec<ObjectMeta>> {
    c.list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| anyhow!("listing {prefix}: {}", clean(&e)))
}

/// The key relative to the remote's prefix.
fn rel(prefix: &str, p: &object_store::path::Path) -> String {
    let s = p.to_string();
    if prefix.is_empty() {
        s
    } else {
        s.strip_prefix(&format!("{prefix}/"))
            .unwrap_or(&s)
            .to_string()
    }
}

pub fn gc(remotes: &Remotes, remote: &str, grace: Duration, dry_run: bool) -> Result<Value> {
    let (cfg, c) = remotes.client(remote)?;
    let now = super::push::now_unix() as i64;
    remotes.run(async move {
        let mut live_push_ids = HashSet::new();
        let mut protected = HashSet::new();
        let mut expired_leases = Vec::new();
        for l in list(&c, key(&cfg, "leases")).await? {
            let age = now - l.last_modified.timestamp();
            let id = rel(&cfg.prefix, &l.location).trim_start_matches("leases/").to_string();
            if age > LEASE_TTL.as_secs() as i64 {
                expired_leases.push((l.location.clone(), l.last_modified));
                continue;
            }
            live_push_ids.insert(id);
            if let Some(b) = super::get_small(&c, &l.location).await? {
                if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                    for k in v["reused"].as_array().into_iter().flatten() {
                        if let Some(k) = k.as_str() {
                            protected.insert(k.to_string());
                        }
                    }
                }
            }
        }
        let packs = list(&c, key(&cfg, "packs")).await?;
        let mut referenced = HashSet::new();
        let mut manifests = 0usize;
        for m in list(&c, key(&cfg, "manifests")).await? {
            let Some(b) = super::get_small(&c, &m.location).await? else { continue };
            // A manifest that does not decode cannot be trusted to list its packs: stop
            // rather than delete what it might reference.
            let man = Manifest::decode(&b).map_err(|e| anyhow!("manifest {}: {e:#}; gc stopped, nothing deleted (if that checkpoint is not needed, remove it with `strata checkpoint delete --remote`)", m.location))?;
            manifests += 1;
            referenced.extend(man.header.packs.into_iter().map(|p| p.key));
        }
        // Leases again: a push that started or resumed since the first listing protects its
        // packs too.
        for l in list(&c, key(&cfg, "leases")).await? {
            if now - l.last_modified.timestamp() <= LEASE_TTL.as_secs() as i64 {
                live_push_ids.insert(rel(&cfg.prefix, &l.location).trim_start_matches("leases/").to_string());
                if let Some(b) = super::get_small(&c, &l.location).await? {
                    if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                        protected.extend(v["reused"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(String::from)));
                    }
                }
            }
        }
        let (mut deleted, mut deleted_bytes, mut kept) = (0u64, 0u64, 0u64);
        for p in packs {
            let k = rel(&cfg.prefix, &p.location);
            let push_id = k
                .trim_start_matches("packs/")
                .split('-')
                .next()
                .unwrap_or_default()
                .to_string();
            let young = now - p.last_modified.timestamp() < grace.as_secs() as i64;
            if referenced.contains(&k) || protected.contains(&k) || live_push_ids.contains(&push_id) || young {
                kept += 1;
                continue;
            }
            if !dry_run {
                match c.delete(&p.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(anyhow!("deleting {}: {}", p.location, clean(&e))),
                }
            }
            deleted += 1;
            deleted_bytes += p.size;
        }
        if !dry_run {
            for (l, seen) in &expired_leases {
                // A push resumed since the listing rewrote it: not expired any more (compared
                // in whole seconds: HEAD reports no finer).
                if matches!(c.head(l).await, Ok(m) if m.last_modified.timestamp() == seen.timestamp()) {
                    let _ = c.delete(l).await;
                }
            }
        }
        Ok(json!({"manifests": manifests, "packs_kept": kept, "packs_deleted": deleted,
                  "bytes_deleted": deleted_bytes, "expired_leases": expired_leases.len(), "dry_run": dry_run}))
    })?
}

/// The checkpoints a remote holds (its manifests), each checked as it is read.
pub fn list_checkpoints(remotes: &Remotes, remote: &str) -> Result<Value> {
    let (cfg, c) = remotes.client(remote)?;
    let remote = remote.to_string();
    remotes.run(async move {
        let mut out = Vec::new();
        for m in list(&c, key(&cfg, "manifests")).await? {
            let Some(b) = super::get_small(&c, &m.location).await? else { continue };
            match Manifest::decode(&b) {
                Ok(man) => {
                    let h = &man.header;
                    out.push(json!({"remote": remote, "volume": h.volume, "name": h.checkpoint,
                        "size": h.size, "block_size": h.block_size, "stored_bytes": man.stored_bytes(),
                        "blocks": man.extents.len(), "base": h.base, "created_unix": h.created_unix,
                        "packs": h.packs.len()}));
                }
                Err(e) => out.push(json!({"remote": remote, "manifest": m.location.to_string(),
                                          "error": format!("{e:#}")})),
            }
        }
        Ok(Value::Array(out))
    })?
}

/// Deletes a checkpoint from a remote (its manifest); its packs go at the next gc unless
/// another checkpoint references them.
pub fn delete_checkpoint(remotes: &Remotes, remote: &str, vol: &str, ckpt: &str) -> Result<()> {
    let (cfg, c) = remotes.client(remote)?;
    let rel = super::manifest_rel(vol, ckpt);
    let path = key(&cfg, &rel);
    let shown = format!("{vol}@{ckpt}");
    let remote_name = remote.to_string();
    remotes.run(async move {
        match c.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                return Err(anyhow!("remote {remote_name:?} has no checkpoint {shown}"))
            }
            Err(e) => return Err(anyhow!("looking up {path}: {}", clean(&e))),
        }
        c.delete(&path)
            .await
            .map_err(|e| anyhow!("deleting {path}: {}", clean(&e)))
    })??;
    remotes.forget_manifest(remote, &rel)
}

/// The names of `vol`'s checkpoints in a remote (its manifests' keys; nothing downloaded).
pub fn checkpoint_names(remotes: &Remotes, remote: &str, vol: &str) -> Result<Vec<String>> {
    let (cfg, c) = remotes.client(remote)?;
    let dir = key(&cfg, &format!("manifests/{vol}"));
    remotes.run(async move {
        Ok(list(&c, dir)
            .await?
            .into_iter()
            .filter_map(|m| {
                m.location
                    .filename()
                    .and_then(|f| f.strip_suffix(".manifest"))
                    .map(str::to_string)
            })
            .collect())
    })?
}

/// Name prefix of protection checkpoints: `protect-<unix ms>` (docs/design/protection.md).
pub const PROTECT_PREFIX: &str = "protect-";

/// The time in a protection checkpoint's name.
pub fn protect_ms(name: &str) -> Option<u64> {
    name.strip_prefix(PROTECT_PREFIX)?.parse().ok()
}

/// `vol`'s protection checkpoints in a remote, newest first, with their times.
pub fn protection_checkpoints(
    remotes: &Remotes,
    remote: &str,
    vol: &str,
) -> Result<Vec<(u64, String)>> {
    let mut held: Vec<(u64, String)> = checkpoint_names(remotes, remote, vol)?
        .into_iter()
        .filter_map(|n| protect_ms(&n).map(|ms| (ms, n)))
        .collect();
    held.sort_unstable_by(|x, y| y.cmp(x));
    Ok(held)
}
