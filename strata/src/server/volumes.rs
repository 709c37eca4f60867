//! Volumes: list, create (empty, from a checkpoint, from a remote), info, resize, delete.

use super::*;

#[derive(serde::Serialize)]
pub(super) struct VolumeView {
    name: String,
    /// "block" (a virtual disk) or "tree" (a sandbox root tree, `strata mount`).
    kind: &'static str,
    size: u64,
    block_size: u32,
    compress: Option<&'static str>,
    ephemeral: bool,
    mapped_bytes: u64,
    checkpoints: usize,
    base: Option<String>,
    created_unix: u64,
    exported: Option<String>,
}

pub(super) fn volume_view(v: VolumeInfo, exports: &BTreeMap<String, Exported>) -> VolumeView {
    VolumeView {
        exported: exports.get(&v.name).map(|e| e.path().display().to_string()),
        kind: if v.tree { "tree" } else { "block" },
        name: v.name,
        size: v.size,
        block_size: v.block_size,
        compress: v.lz4.then_some("lz4"),
        ephemeral: v.ephemeral,
        mapped_bytes: v.mapped_bytes,
        checkpoints: v.checkpoints,
        base: v.base,
        created_unix: v.created_unix,
    }
}

pub(super) async fn list_volumes(State(app): State<Arc<App>>) -> ApiResult {
    let list = blocking(&app, |a| {
        let ex = a.exports.lock();
        Ok(a.store
            .list_volumes()
            .into_iter()
            .map(|v| volume_view(v, &ex))
            .collect::<Vec<_>>())
    })
    .await?;
    to_json(list)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateReq {
    name: String,
    size: Option<u64>,
    compress: Option<String>,
    block_size: Option<u64>,
    from: Option<String>,
    #[serde(default)]
    ephemeral: bool,
    /// With a remote source: usable at once, hydrated in the background.
    #[serde(default)]
    lazy: bool,
    /// A sandbox tree volume (`strata fs create`).
    #[serde(default)]
    tree: bool,
    /// IO limits to start with (see `PUT /v1/volumes/{name}/qos`).
    qos: Option<super::qos::Limits>,
}

pub(super) async fn create_volume(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: CreateReq = parse(&body)?;
    if let Some(q) = &req.qos {
        super::qos::validate(q)?;
    }
    let lz4 = match req.compress.as_deref() {
        None | Some("none") => false,
        Some("lz4") => true,
        Some(other) => return Err(bad(format!("unknown compression {other:?} (use lz4)"))),
    };
    let block_size = req
        .block_size
        .map(|b| u32::try_from(b).map_err(|_| bad("block size too large")))
        .transpose()?;
    if let Some(src) = req.from.as_deref().filter(|f| f.contains(':')) {
        if lz4 || block_size.is_some() || req.size.is_some() || req.ephemeral {
            return Err(bad("a volume restored from a remote keeps the checkpoint's size, block size and compression, and cannot be ephemeral"));
        }
        if req.qos.is_some() && !req.lazy {
            return Err(bad("limits of an eager restore are set with `strata volume set` once it ends (or restore with --lazy)"));
        }
        let src = src.to_string();
        return blocking(&app, move |a| {
            if req.lazy {
                let (info, _, reserved) =
                    remote::pull::create(&a.remotes, &a.store, &req.name, &src, false)?;
                if let Some(q) = &req.qos {
                    a.qos.set(&a.store, &req.name, q)?;
                }
                drop(reserved);
                remote::pull::spawn_hydration(&a.remotes, &a.store, &req.name);
                return to_json(volume_view(info, &a.exports.lock()));
            }
            let (remotes, store, name) = (a.remotes.clone(), a.store.clone(), req.name.clone());
            let id = a
                .jobs
                .spawn(move |job| {
                    let run = || -> anyhow::Result<Value> {
                        // Reserved (no export, delete or other restore of it) until done.
                        let (_, total, _reserved) =
                            remote::pull::create(&remotes, &store, &name, &src, true)?;
                        job.total.store(total, std::sync::atomic::Ordering::Relaxed);
                        match remote::pull::hydrate(&remotes, &store, &name, Some(job)) {
                            Ok(true) => {}
                            Ok(false) => anyhow::bail!("restoring {name} was cancelled (the volume was deleted, or the daemon is stopping; a restarted daemon finishes it)"),
                            Err(e) => {
                                // An eager restore is all or nothing.
                                remote::pull::discard(&remotes, &store, &name);
                                return Err(e);
                            }
                        }
                        Ok(json!({"volume": name, "source": src, "restored_bytes": total}))
                    };
                    run().map_err(|e| format!("{e:#}"))
                })
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            Ok(Json(json!({"job": id})))
        })
        .await;
    }
    if req.lazy {
        return Err(bad("--lazy needs a remote source (--from REMOTE:VOL@CKPT)"));
    }
    if app.remotes.creating.lock().contains(&req.name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("volume {} is being restored from a remote", req.name),
        ));
    }
    if req.tree && (lz4 || block_size.is_some() || req.size.is_some()) {
        return Err(bad(
            "a tree volume has no size, block size or compression to choose",
        ));
    }
    let info = blocking(&app, move |a| {
        let info = match &req.from {
            Some(from) if req.tree => {
                let (v, c) = from
                    .split_once('@')
                    .ok_or_else(|| bad("--from expects TREE@CHECKPOINT"))?;
                if !a.store.volume_info(v)?.tree {
                    return Err(bad(format!(
                        "{v} is a block volume; fork it with `strata volume create --from`"
                    )));
                }
                a.store.fork(v, c, &req.name, req.ephemeral)?
            }
            None if req.tree => a.store.create_volume(
                &req.name,
                strata_engine::TREE_VOLUME_SIZE,
                VolumeOptions {
                    ephemeral: req.ephemeral,
                    tree: true,
                    ..VolumeOptions::default()
                },
            )?,
            Some(from) => {
                let (v, c) = from
                    .split_once('@')
                    .ok_or_else(|| bad("--from expects VOLUME@CHECKPOINT"))?;
                if lz4 || block_size.is_some() {
                    return Err(bad("a fork keeps its source's block size and compression"));
                }
                let info = a.store.fork(v, c, &req.name, req.ephemeral)?;
                remote::pull::ensure_hydrating(&a.remotes, &a.store, &req.name);
                match req.size {
                    Some(s) if s != info.size => a.store.grow_volume(&req.name, s)?,
                    _ => info,
                }
            }
            None => {
                let size = req.size.ok_or_else(|| bad("size is required"))?;
                a.store.create_volume(
                    &req.name,
                    size,
                    VolumeOptions {
                        block_size,
                        lz4,
                        ephemeral: req.ephemeral,
                        tree: false,
                    },
                )?
            }
        };
        if let Some(q) = &req.qos {
            if let Err(e) = a.qos.set(&a.store, &req.name, q) {
                // All or nothing: a volume created without the limits asked for is not kept.
                let _ = a.store.delete_volume(&req.name);
                return Err(e);
            }
        }
        Ok(volume_view(info, &a.exports.lock()))
    })
    .await?;
    to_json(info)
}

pub(super) async fn volume_info(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let v = blocking(&app, move |a| {
        let info = a.store.volume_info(&name)?;
        let bs = u64::from(info.block_size);
        let mut v = serde_json::to_value(volume_view(info, &a.exports.lock()))
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        // Walking the map only when it may hold remote entries.
        let remote_blocks = if a.store.may_read_remote(&name)? {
            a.store.remote_blocks(&name)?
        } else {
            0
        };
        v["remote_bytes"] = json!(remote_blocks * bs);
        if let Some(p) = a.protection.view(a, &name) {
            v["protection"] = p;
        }
        if let Some(q) = super::qos::view(&a.store, &name) {
            v["qos"] = q;
        }
        if let Some(r) = a.remotes.restoring().get(&name) {
            let h = a.remotes.hydrating.lock().get(&name).cloned();
            v["hydration"] = json!({
                "source": r.source, "state": r.state, "running": h.is_some(),
                "queued": h.as_ref().is_some_and(|h| h.queued.load(std::sync::atomic::Ordering::Relaxed)),
                "remote_blocks": remote_blocks,
                "fetched_bytes": h.as_ref().map(|h| h.fetched_bytes.load(std::sync::atomic::Ordering::Relaxed)),
                "last_error": h.as_ref().and_then(|h| h.error.lock().clone()),
            });
        }
        Ok(v)
    })
    .await?;
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResizeReq {
    size: u64,
}

pub(super) async fn resize_volume(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: ResizeReq = parse(&body)?;
    let v = blocking(&app, move |a| {
        if let Some(why) = a.remotes.write_blocked(&name) {
            return Err(ApiError(StatusCode::CONFLICT, why));
        }
        let ex = a.exports.lock();
        // A FUSE mount shows the new size at once; a hypervisor cannot be told.
        if matches!(ex.get(&name), Some(Exported::Vhost { .. })) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("volume {name} is exported to a hypervisor; unexport it before resizing"),
            ));
        }
        if a.store.volume_info(&name)?.tree {
            return Err(bad(format!(
                "volume {name} is a tree; it has no size to change"
            )));
        }
        let info = a.store.grow_volume(&name, req.size)?;
        if let Some(f) = ex.get(&name).and_then(Exported::fuse) {
            f.volume_changed();
        }
        Ok(volume_view(info, &ex))
    })
    .await?;
    to_json(v)
}

pub(super) async fn delete_volume(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    blocking(&app, move |a| {
        if a.exports.lock().contains_key(&name) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("volume {name} is exported; unexport it first"),
            ));
        }
        if a.remotes.creating.lock().contains(&name) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("volume {name} is being restored from a remote; wait for that to end"),
            ));
        }
        remote::pull::cancel(&a.remotes, &name);
        if let Err(e) = a.store.delete_volume(&name) {
            // Still there: its hydration goes on.
            if a.remotes.restoring().contains_key(&name) {
                remote::pull::spawn_hydration(&a.remotes, &a.store, &name);
            }
            return Err(e.into());
        }
        if a.remotes.restoring().contains_key(&name) {
            a.remotes.set_restoring(&name, None)?;
        }
        // Its policy goes with it (the remote's checkpoints stay), and its limits.
        a.protection.unset(&name)?;
        a.qos.unset(&name)?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({"deleted": true})))
}
