//! Checkpoints: list, create, restore, delete, and diffs between versions of a volume.

use super::*;

#[derive(serde::Serialize)]
pub(super) struct CheckpointView {
    volume: String,
    name: String,
    parent: Option<String>,
    is_base: bool,
    size: u64,
    mapped_bytes: u64,
    exclusive_bytes: u64,
    created_unix: u64,
}

impl From<CheckpointInfo> for CheckpointView {
    fn from(c: CheckpointInfo) -> Self {
        CheckpointView {
            volume: c.volume,
            name: c.name,
            parent: c.parent,
            is_base: c.is_base,
            size: c.size,
            mapped_bytes: c.mapped_bytes,
            exclusive_bytes: c.exclusive_bytes,
            created_unix: c.created_unix,
        }
    }
}

pub(super) async fn list_checkpoints(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let v = blocking(&app, move |a| {
        Ok(a.store
            .list_checkpoints(&name)?
            .into_iter()
            .map(CheckpointView::from)
            .collect::<Vec<_>>())
    })
    .await?;
    to_json(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckpointReq {
    name: String,
}

pub(super) async fn create_checkpoint(
    State(app): State<Arc<App>>,
    UrlPath(vol): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: CheckpointReq = parse(&body)?;
    let v = blocking(&app, move |a| {
        take_checkpoint(a, &vol, &req.name).map(CheckpointView::from)
    })
    .await?;
    to_json(v)
}

/// Checkpoints a volume; a mounted tree with its operations held off (no half-done
/// operation in the checkpoint, every write made before it in).
pub(super) fn take_checkpoint(a: &App, vol: &str, name: &str) -> Result<CheckpointInfo, ApiError> {
    let ex = a.exports.lock();
    let trees = a.trees.lock();
    let info = match mounted_tree(&ex, &trees, vol) {
        Some(mount) => mount
            .checkpoint(|| a.store.checkpoint(vol, name))
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("syncing the tree: {e:?}"),
                )
            })??,
        _ => a.store.checkpoint(vol, name)?,
    };
    if let Some(f) = ex.get(vol).and_then(Exported::fuse) {
        f.checkpoints_changed(None);
    }
    Ok(info)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RestoreReq {
    #[serde(default)]
    force: bool,
}

pub(super) async fn restore_checkpoint(
    State(app): State<Arc<App>>,
    UrlPath((vol, ck)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let req: RestoreReq = if body.is_empty() {
        RestoreReq::default()
    } else {
        parse(&body)?
    };
    blocking(&app, move |a| {
        if let Some(why) = a.remotes.write_blocked(&vol) {
            return Err(ApiError(StatusCode::CONFLICT, why));
        }
        let mut ex = a.exports.lock();
        let trees = a.trees.lock();
        if let Some(mount) = mounted_tree(&ex, &trees, &vol) {
            // The mount stays: processes see the restored tree (see docs/fuse.md).
            mount
                .restore(
                    || a.store.diff(MapRef::Live(&vol), MapRef::Checkpoint(&vol, &ck)).ok(),
                    || a.store.restore(&vol, &ck),
                )
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("restoring the mounted tree: {e:?}")))??;
            return Ok(());
        }
        if let Some(Exported::Fuse { export, .. }) = ex.get(&vol) {
            // The mount stays: the kernel drops its cached pages of the image afterwards.
            a.store.restore(&vol, &ck)?;
            export.volume_changed();
            remote::pull::ensure_hydrating(&a.remotes, &a.store, &vol);
            return Ok(());
        }
        if ex.contains_key(&vol) {
            if !req.force {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("volume {vol} is exported; unexport it first, or pass --force to disconnect its hypervisor"),
                ));
            }
            tracing::warn!(volume = %vol, "restore --force: disconnecting the exported volume");
            if let Some(e) = ex.remove(&vol) {
                e.shutdown();
            }
            save_exports(a, &ex);
        }
        drop(trees);
        drop(ex);
        a.store.restore(&vol, &ck)?;
        remote::pull::ensure_hydrating(&a.remotes, &a.store, &vol);
        Ok(())
    })
    .await?;
    Ok(Json(json!({"restored": true})))
}

pub(super) async fn delete_checkpoint(
    State(app): State<Arc<App>>,
    UrlPath((vol, ck)): UrlPath<(String, String)>,
) -> ApiResult {
    blocking(&app, move |a| {
        let ex = a.exports.lock();
        let fuse = ex.get(&vol).and_then(Exported::fuse);
        if let Some(f) = fuse {
            if f.checkpoint_open(&ck) {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "checkpoint {vol}@{ck} is open in the FUSE mount at {}; close it first",
                        f.mountpoint().display()
                    ),
                ));
            }
        }
        a.store.delete_checkpoint(&vol, &ck)?;
        if let Some(f) = fuse {
            f.checkpoints_changed(Some(&ck));
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({"deleted": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiffReq {
    a: String,
    b: String,
}

pub(super) fn map_ref(s: &str) -> MapRef<'_> {
    match s.split_once('@') {
        Some((v, c)) => MapRef::Checkpoint(v, c),
        None => MapRef::Live(s),
    }
}

pub(super) async fn diff(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: DiffReq = parse(&body)?;
    let v = blocking(&app, move |a| {
        let vol = req.a.split('@').next().unwrap_or_default();
        if a.store.volume_info(vol)?.tree {
            return tree_diff(a, &req);
        }
        let ranges = a.store.diff(map_ref(&req.a), map_ref(&req.b))?;
        Ok(ranges
            .iter()
            .map(|r| json!({"offset": r.offset, "len_bytes": r.len}))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(Value::Array(v)))
}

/// `checkpoint diff` on trees: changed paths.
pub(super) fn tree_diff(a: &App, req: &DiffReq) -> Result<Vec<Value>, ApiError> {
    use strata_fuse::tree::diff::{diff, Side};
    for r in [&req.a, &req.b] {
        let vol = r.split('@').next().unwrap_or_default();
        if !a.store.volume_info(vol)?.tree {
            return Err(bad(format!("{r} is not a tree; diff trees with trees")));
        }
    }
    let side = |s: &str| -> Result<Side, ApiError> {
        match s.split_once('@') {
            Some((v, c)) => Ok(Side::Checkpoint(a.store.open_checkpoint(v, c)?)),
            // The mount's own handle when mounted; otherwise a handle of our own (not for an
            // ephemeral tree: dropping it would delete the tree).
            None => match mounted_tree(&a.exports.lock(), &a.trees.lock(), s) {
                Some(mount) => {
                    let vol = mount.volume().map_err(|e| {
                        ApiError(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("syncing the mounted tree: {e:?}"),
                        )
                    })?;
                    Ok(Side::Live(vol.clone()))
                }
                _ if a.store.volume_info(s)?.ephemeral => Err(bad(format!(
                    "{s} is an ephemeral tree that is not mounted; mount it to diff its live state"
                ))),
                _ => Ok(Side::Live(a.store.open_volume(s)?)),
            },
        }
    };
    let (sa, sb) = (side(&req.a)?, side(&req.b)?);
    let ranges = a.store.diff(map_ref(&req.a), map_ref(&req.b))?;
    let changes =
        diff(&sa, &sb, &ranges).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(changes
        .iter()
        .map(|c| json!({"path": c.path, "change": c.change, "from": c.from}))
        .collect())
}
