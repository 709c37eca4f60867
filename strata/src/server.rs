//! `strata serve`: owns the store, serves the control API (HTTP/JSON on a unix socket) and
//! the exports. Every handler runs engine calls on the blocking pool; every failure becomes a
//! 4xx/5xx answer with a JSON `{"error": ...}` body — nothing a client sends can take the
//! daemon down.

use crate::remote::{self, Remotes};
use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_block::{BlockOptions, Export};
use strata_engine::{
    CheckpointInfo, Error as EngineError, MapRef, Store, StoreOptions, VolumeInfo, VolumeOptions,
};
use strata_fuse::tree::TreeMount;
use strata_fuse::{FuseExport, FuseOptions};

/// One export per volume: a vhost-user-blk socket or a FUSE mount.
enum Exported {
    Vhost {
        export: Export,
        socket: PathBuf,
        queues: u16,
        read_only: bool,
    },
    Fuse {
        export: FuseExport,
        read_only: bool,
        allow_other: bool,
    },
    /// A tree volume mounted as a directory tree.
    Tree {
        mount: TreeMount,
        read_only: bool,
        allow_other: bool,
    },
}

impl Exported {
    /// The socket or mount point.
    fn path(&self) -> &Path {
        match self {
            Exported::Vhost { socket, .. } => socket,
            Exported::Fuse { export, .. } => export.mountpoint(),
            Exported::Tree { mount, .. } => mount.mountpoint(),
        }
    }

    fn fuse(&self) -> Option<&FuseExport> {
        match self {
            Exported::Fuse { export, .. } => Some(export),
            Exported::Vhost { .. } | Exported::Tree { .. } => None,
        }
    }

    fn view(&self, vol: &str) -> Value {
        match self {
            Exported::Vhost {
                socket,
                queues,
                read_only,
                ..
            } => {
                json!({"volume": vol, "kind": "vhost-user", "socket": socket, "queues": queues, "read_only": read_only})
            }
            Exported::Fuse {
                export,
                read_only,
                allow_other,
            } => {
                json!({"volume": vol, "kind": "fuse", "mountpoint": export.mountpoint(), "read_only": read_only, "allow_other": allow_other})
            }
            Exported::Tree {
                mount,
                read_only,
                allow_other,
            } => {
                json!({"volume": vol, "kind": "tree", "mountpoint": mount.mountpoint(), "read_only": read_only, "allow_other": allow_other, "transport": mount.transport()})
            }
        }
    }

    /// Stops serving at daemon shutdown: a busy FUSE mount is detached lazily.
    fn shutdown(self) {
        match self {
            Exported::Vhost { export, .. } => export.stop(),
            Exported::Fuse { export, .. } => export.detach(),
            Exported::Tree { mount, .. } => mount.detach(),
        }
    }
}

struct App {
    store: Arc<Store>,
    /// Volumes an import job is writing into: not exported until it ends (the export would
    /// not see those writes coming, and a FUSE export's cache would go stale).
    importing: Arc<Mutex<std::collections::HashSet<String>>>,
    exports: Mutex<BTreeMap<String, Exported>>,
    jobs: crate::jobs::Jobs,
    remotes: Arc<Remotes>,
}

/// An API failure: status code and message.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use EngineError::*;
        let code = match &e {
            NoSuchVolume(_) | NoSuchCheckpoint { .. } => StatusCode::NOT_FOUND,
            VolumeExists(_) | CheckpointExists { .. } | VolumeBusy(_) | CheckpointBusy { .. } => {
                StatusCode::CONFLICT
            }
            InvalidName { .. } | InvalidArgument(_) | Misaligned { .. } | OutOfRange { .. } => {
                StatusCode::BAD_REQUEST
            }
            Poisoned | NoSpace => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<EngineError>() {
            Ok(e) => e.into(),
            Err(e) => {
                let msg = format!("{e:#}");
                let code = if msg.contains("no remote named") || msg.contains("has no checkpoint") {
                    StatusCode::NOT_FOUND
                } else if msg.contains("already") || msg.contains("still") {
                    StatusCode::CONFLICT
                } else if msg.contains("does not answer")
                    || msg.contains("uploading")
                    || msg.contains("reading ")
                    || msg.contains("listing ")
                {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::BAD_REQUEST
                };
                ApiError(code, msg)
            }
        }
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult = Result<Json<Value>, ApiError>;

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// Runs an engine call on the blocking pool.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&App) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("worker failed: {e}"),
            )
        })?
}

fn to_json<T: serde::Serialize>(v: T) -> ApiResult {
    serde_json::to_value(v)
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[derive(serde::Serialize)]
struct VolumeView {
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

fn volume_view(v: VolumeInfo, exports: &BTreeMap<String, Exported>) -> VolumeView {
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

#[derive(serde::Serialize)]
struct CheckpointView {
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

async fn list_volumes(State(app): State<Arc<App>>) -> ApiResult {
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
struct CreateReq {
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
}

async fn create_volume(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: CreateReq = parse(&body)?;
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
        let src = src.to_string();
        return blocking(&app, move |a| {
            if req.lazy {
                let (info, _, reserved) =
                    remote::pull::create(&a.remotes, &a.store, &req.name, &src, false)?;
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
        Ok(volume_view(info, &a.exports.lock()))
    })
    .await?;
    to_json(info)
}

async fn volume_info(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> ApiResult {
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
        if let Some(r) = a.remotes.restoring().get(&name) {
            let h = a.remotes.hydrating.lock().get(&name).cloned();
            v["hydration"] = json!({
                "source": r.source, "state": r.state, "running": h.is_some(),
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
struct ResizeReq {
    size: u64,
}

async fn resize_volume(
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

async fn delete_volume(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> ApiResult {
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
        Ok(())
    })
    .await?;
    Ok(Json(json!({"deleted": true})))
}

async fn list_checkpoints(
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
struct CheckpointReq {
    name: String,
}

async fn create_checkpoint(
    State(app): State<Arc<App>>,
    UrlPath(vol): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: CheckpointReq = parse(&body)?;
    let v = blocking(&app, move |a| {
        let ex = a.exports.lock();
        let info = match ex.get(&vol) {
            // Taken with the tree's operations held off: no half-done operation in it.
            Some(Exported::Tree { mount, .. }) => mount
                .checkpoint(|| a.store.checkpoint(&vol, &req.name))
                .map_err(|e| {
                    ApiError(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("syncing the tree: {e:?}"),
                    )
                })??,
            _ => a.store.checkpoint(&vol, &req.name)?,
        };
        if let Some(f) = ex.get(&vol).and_then(Exported::fuse) {
            f.checkpoints_changed(None);
        }
        Ok(CheckpointView::from(info))
    })
    .await?;
    to_json(v)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    #[serde(default)]
    force: bool,
}

async fn restore_checkpoint(
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
        if let Some(Exported::Tree { mount, .. }) = ex.get(&vol) {
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
        drop(ex);
        a.store.restore(&vol, &ck)?;
        remote::pull::ensure_hydrating(&a.remotes, &a.store, &vol);
        Ok(())
    })
    .await?;
    Ok(Json(json!({"restored": true})))
}

async fn delete_checkpoint(
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
struct DiffReq {
    a: String,
    b: String,
}

fn map_ref(s: &str) -> MapRef<'_> {
    match s.split_once('@') {
        Some((v, c)) => MapRef::Checkpoint(v, c),
        None => MapRef::Live(s),
    }
}

async fn diff(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
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
fn tree_diff(a: &App, req: &DiffReq) -> Result<Vec<Value>, ApiError> {
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
            None => match a.exports.lock().get(s) {
                Some(Exported::Tree { mount, .. }) => {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportReq {
    volume: String,
    kind: String,
    /// vhost-user: the socket to listen on.
    socket: Option<PathBuf>,
    /// fuse: the (empty) directory to mount on.
    mountpoint: Option<PathBuf>,
    #[serde(default = "one")]
    queues: u16,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    allow_other: bool,
}

fn one() -> u16 {
    1
}

fn absolute(p: Option<PathBuf>, what: &str, kind: &str) -> Result<PathBuf, ApiError> {
    let p = p.ok_or_else(|| bad(format!("a {kind} export needs {what}")))?;
    if !p.is_absolute() {
        return Err(bad(format!("{what} must be an absolute path")));
    }
    Ok(p)
}

async fn create_export(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: ExportReq = parse(&body)?;
    let v = blocking(&app, move |a| start_export(a, req)).await?;
    Ok(Json(v))
}

/// Validates and starts an export, and records it so a restarted daemon serves it again.
fn start_export(a: &App, req: ExportReq) -> Result<Value, ApiError> {
    let kind = req.kind.clone();
    let (socket, mountpoint) = match kind.as_str() {
        "vhost-user" => {
            if !(1..=strata_block::backend::MAX_QUEUES).contains(&req.queues) {
                return Err(bad(format!(
                    "queues must be 1 to {}",
                    strata_block::backend::MAX_QUEUES
                )));
            }
            if req.mountpoint.is_some() || req.allow_other {
                return Err(bad("mountpoint and allow_other are for fuse exports"));
            }
            (Some(absolute(req.socket.clone(), "socket", &kind)?), None)
        }
        "fuse" | "tree" => {
            if req.socket.is_some() || req.queues != 1 {
                return Err(bad("socket and queues are for vhost-user exports"));
            }
            (
                None,
                Some(absolute(req.mountpoint.clone(), "mountpoint", &kind)?),
            )
        }
        other => {
            return Err(bad(format!(
                "unknown export kind {other:?} (supported: vhost-user, fuse, tree)"
            )))
        }
    };
    let mut ex = a.exports.lock();
    if let Some(why) = a.remotes.write_blocked(&req.volume) {
        return Err(ApiError(StatusCode::CONFLICT, why));
    }
    if a.importing.lock().contains(&req.volume) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "volume {} is being imported into; export it when the import job ends",
                req.volume
            ),
        ));
    }
    if let Some(e) = ex.get(&req.volume) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "volume {} is already exported on {}",
                req.volume,
                e.path().display()
            ),
        ));
    }
    let vol = a.store.open_volume(&req.volume)?;
    if vol.is_tree() != (kind == "tree") {
        return Err(bad(if vol.is_tree() {
            format!(
                "volume {} is a tree; mount it with `strata mount {} DIR`",
                req.volume, req.volume
            )
        } else {
            format!(
                "volume {} is a block volume; export it with `strata export fuse` or `strata export vhost-user`",
                req.volume
            )
        }));
    }
    let exported = if kind == "tree" {
        let mountpoint = mountpoint.ok_or_else(|| bad("a tree mount needs mountpoint"))?;
        let opts = FuseOptions {
            read_only: req.read_only,
            allow_other: req.allow_other,
            ..FuseOptions::default()
        };
        let mount = TreeMount::start(vol, a.store.path(), &mountpoint, &opts)
            .map_err(|e| bad(format!("{e}")))?;
        Exported::Tree {
            mount,
            read_only: req.read_only,
            allow_other: req.allow_other,
        }
    } else if let Some(socket) = socket {
        let block_size = vol.block_size();
        let opts = BlockOptions {
            queues: req.queues,
            read_only: req.read_only,
        };
        let export = Export::start(Arc::new(vol), block_size, opts, &socket)
            .map_err(|e| bad(format!("{e}")))?;
        tracing::info!(volume = %req.volume, socket = %socket.display(), queues = req.queues, "exported");
        Exported::Vhost {
            export,
            socket,
            queues: req.queues,
            read_only: req.read_only,
        }
    } else {
        let mountpoint = mountpoint.ok_or_else(|| bad("a fuse export needs mountpoint"))?;
        let opts = FuseOptions {
            read_only: req.read_only,
            allow_other: req.allow_other,
            ..FuseOptions::default()
        };
        let export = FuseExport::start(Arc::downgrade(&a.store), vol, &mountpoint, &opts)
            .map_err(|e| bad(format!("{e}")))?;
        Exported::Fuse {
            export,
            read_only: req.read_only,
            allow_other: req.allow_other,
        }
    };
    let view = exported.view(&req.volume);
    ex.insert(req.volume.clone(), exported);
    save_exports(a, &ex);
    Ok(view)
}

const EXPORTS_FILE: &str = "exports.json";

/// Records the exports in `STORE/exports.json` (written to a temporary file, synced, renamed)
/// so that the next `strata serve` starts them again. A failure is logged: the exports keep
/// serving, they are just not restored after a restart.
fn save_exports(a: &App, ex: &BTreeMap<String, Exported>) {
    let list: Vec<Value> = ex.iter().map(|(vol, e)| e.view(vol)).collect();
    let bytes = Value::Array(list).to_string();
    if let Err(e) = crate::state::write_atomic(a.store.path(), EXPORTS_FILE, bytes.as_bytes()) {
        tracing::error!(error = %e, "recording the exports failed; they will not be restored after a restart");
    }
}

/// Starts the exports a previous daemon recorded. One that cannot start (its volume is gone,
/// its mount point is no longer empty, ...) is logged and dropped from the record.
fn restore_exports(a: &App) {
    let path = a.store.path().join(EXPORTS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "reading the recorded exports");
            return;
        }
    };
    let list: Vec<Value> = match serde_json::from_str(&text) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "recorded exports are not valid JSON; none restored");
            return;
        }
    };
    for item in list {
        let volume = item["volume"].as_str().unwrap_or("?").to_string();
        let started = serde_json::from_value::<ExportReq>(item)
            .map_err(|e| bad(e.to_string()))
            .and_then(|req| start_export(a, req));
        match started {
            Ok(_) => tracing::info!(volume = %volume, "export restored"),
            Err(ApiError(_, msg)) => {
                tracing::warn!(volume = %volume, error = %msg, "could not restore export; dropped")
            }
        }
    }
    save_exports(a, &a.exports.lock());
}

// The handlers below take the exports lock, which export changes hold across slow work
// (mounting, unmounting, commits): they wait on the blocking pool, not on the runtime's
// worker threads.
async fn list_exports(State(app): State<Arc<App>>) -> ApiResult {
    let v = blocking(&app, |a| {
        let ex = a.exports.lock();
        Ok(ex
            .iter()
            .map(|(vol, e)| e.view(vol))
            .collect::<Vec<Value>>())
    })
    .await?;
    Ok(Json(Value::Array(v)))
}

async fn delete_export(State(app): State<Arc<App>>, UrlPath(vol): UrlPath<String>) -> ApiResult {
    blocking(&app, move |a| {
        let mut ex = a.exports.lock();
        let e = ex.get_mut(&vol).ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("volume {vol} is not exported"),
            )
        })?;
        // A busy FUSE mount refuses and keeps serving.
        match e {
            Exported::Fuse { export, .. } => export
                .stop()
                .map_err(|err| ApiError(StatusCode::CONFLICT, err.to_string()))?,
            Exported::Tree { mount, .. } => mount
                .stop()
                .map_err(|err| ApiError(StatusCode::CONFLICT, err.to_string()))?,
            Exported::Vhost { .. } => {}
        }
        if let Some(e) = ex.remove(&vol) {
            e.shutdown();
        }
        save_exports(a, &ex);
        Ok(())
    })
    .await?;
    Ok(Json(json!({"unexported": true})))
}

async fn scrub(State(app): State<Arc<App>>) -> ApiResult {
    let r = blocking(&app, |a| Ok(a.store.scrub()?)).await?;
    let problems: Vec<Value> = r
        .problems
        .iter()
        .map(|p| json!({"location": p.location, "offset": p.offset, "segment": p.segment, "detail": p.detail}))
        .collect();
    Ok(Json(
        json!({"records": r.records, "checked_bytes": r.bytes, "remote_records": r.remote_records, "problems": problems}),
    ))
}

async fn stats(State(app): State<Arc<App>>) -> ApiResult {
    let v = blocking(&app, |a| {
        let s = a.store.stats();
        Ok(json!({
            "volumes": s.volumes, "checkpoints": s.checkpoints, "live_bytes": s.live_bytes,
            "segment_files": s.segment_files, "io_engine": s.io_engine, "exports": a.exports.lock().len(),
        }))
    })
    .await?;
    Ok(Json(v))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = match blocking(&app, |a| Ok(render_metrics(a))).await {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

fn render_metrics(app: &App) -> String {
    use std::fmt::Write;
    use strata_block::stats::{LATENCY_BUCKETS_US, OPS};
    let mut out = String::new();
    let s = app.store.stats();
    let _ = writeln!(
        out,
        "# TYPE strata_live_bytes gauge\nstrata_live_bytes {}",
        s.live_bytes
    );
    let _ = writeln!(
        out,
        "# TYPE strata_checkpoints gauge\nstrata_checkpoints {}",
        s.checkpoints
    );
    let _ = writeln!(out, "# TYPE strata_volume_size_bytes gauge\n# TYPE strata_volume_mapped_bytes gauge\n# TYPE strata_volume_checkpoints gauge");
    for v in app.store.list_volumes() {
        let _ = writeln!(
            out,
            "strata_volume_size_bytes{{volume=\"{}\"}} {}",
            v.name, v.size
        );
        let _ = writeln!(
            out,
            "strata_volume_mapped_bytes{{volume=\"{}\"}} {}",
            v.name, v.mapped_bytes
        );
        let _ = writeln!(
            out,
            "strata_volume_checkpoints{{volume=\"{}\"}} {}",
            v.name, v.checkpoints
        );
    }
    let _ = writeln!(out, "# TYPE strata_remote_fetched_bytes_total counter\n# TYPE strata_remote_fetch_errors_total counter\n# TYPE strata_remote_uploaded_bytes_total counter");
    for (r, c) in app.remotes.counters.lock().iter() {
        let _ = writeln!(
            out,
            "strata_remote_fetched_bytes_total{{remote=\"{r}\"}} {}",
            c[0]
        );
        let _ = writeln!(
            out,
            "strata_remote_fetch_errors_total{{remote=\"{r}\"}} {}",
            c[1]
        );
        let _ = writeln!(
            out,
            "strata_remote_uploaded_bytes_total{{remote=\"{r}\"}} {}",
            c[2]
        );
    }
    // Only volumes being restored: counting remote blocks walks the map.
    let _ = writeln!(out, "# TYPE strata_volume_remote_bytes gauge");
    for v in app.remotes.restoring().keys() {
        if let Ok(info) = app.store.volume_info(v) {
            let n = app.store.remote_blocks(v).unwrap_or(0) * u64::from(info.block_size);
            let _ = writeln!(out, "strata_volume_remote_bytes{{volume=\"{v}\"}} {n}");
        }
    }
    let _ = writeln!(out, "# TYPE strata_io_ops_total counter\n# TYPE strata_io_bytes_total counter\n# TYPE strata_io_errors_total counter\n# TYPE strata_io_latency_seconds histogram");
    for (vol, e) in app.exports.lock().iter() {
        let st: &strata_block::IoStats = match e {
            Exported::Vhost { export, .. } => &export.stats,
            Exported::Fuse { export, .. } => export.stats(),
            Exported::Tree { .. } => continue,
        };
        for (i, op) in OPS.iter().enumerate() {
            let l = format!("volume=\"{vol}\",op=\"{op}\"");
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let _ = writeln!(out, "strata_io_ops_total{{{l}}} {}", load(&st.ops[i]));
            let _ = writeln!(out, "strata_io_bytes_total{{{l}}} {}", load(&st.bytes[i]));
            let _ = writeln!(out, "strata_io_errors_total{{{l}}} {}", load(&st.errors[i]));
            let mut cum = 0;
            for (b, le) in LATENCY_BUCKETS_US.iter().enumerate() {
                cum += load(&st.latency[i][b]);
                let _ = writeln!(
                    out,
                    "strata_io_latency_seconds_bucket{{{l},le=\"{}\"}} {cum}",
                    *le as f64 / 1e6
                );
            }
            cum += load(&st.latency[i][LATENCY_BUCKETS_US.len()]);
            let _ = writeln!(
                out,
                "strata_io_latency_seconds_bucket{{{l},le=\"+Inf\"}} {cum}"
            );
            let _ = writeln!(
                out,
                "strata_io_latency_seconds_sum{{{l}}} {}",
                load(&st.latency_sum_us[i]) as f64 / 1e6
            );
            let _ = writeln!(out, "strata_io_latency_seconds_count{{{l}}} {cum}");
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportReq {
    path: PathBuf,
    format: Option<String>,
}

async fn import_image(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: ImportReq = parse(&body)?;
    if !req.path.is_absolute() || !req.path.is_file() {
        return Err(bad(format!(
            "{} is not an existing file (give an absolute path)",
            req.path.display()
        )));
    }
    let id = blocking(&app, move |a| {
        // Held until the import is registered, so no export starts in between.
        let exports = a.exports.lock();
        if exports.contains_key(&name) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("volume {name} is exported; unexport it before importing into it"),
            ));
        }
        if let Some(why) = a.remotes.write_blocked(&name) {
            return Err(ApiError(StatusCode::CONFLICT, why));
        }
        if a.store.volume_info(&name)?.tree {
            return Err(bad(format!(
                "volume {name} is a tree: copy files into it through `strata mount`"
            )));
        }
        let vol = a.store.open_volume(&name)?;
        let scratch = a.store.path().to_path_buf();
        let guard = register_import(a, &name)?;
        let spawned = a.jobs.spawn(move |job| {
            let r = crate::jobs::import(job, &vol, &req.path, req.format.as_deref(), &scratch);
            drop(guard);
            r
        });
        drop(exports);
        spawned.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
    })
    .await?;
    Ok(Json(json!({"job": id})))
}

/// An import registered in `App::importing`: no export or mount of the volume starts and no
/// second import runs until it is dropped.
struct ImportGuard {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    name: String,
}

impl Drop for ImportGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.name);
    }
}

fn register_import(a: &App, name: &str) -> Result<ImportGuard, ApiError> {
    if !a.importing.lock().insert(name.to_string()) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("volume {name} is already being imported into"),
        ));
    }
    Ok(ImportGuard {
        set: a.importing.clone(),
        name: name.to_string(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeImportReq {
    path: PathBuf,
}

/// `strata fs import`: copies a directory into a tree, mounted or not, as a job.
async fn import_tree(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: TreeImportReq = parse(&body)?;
    if !req.path.is_absolute() || !req.path.is_dir() {
        return Err(bad(format!(
            "{} is not an existing directory (give an absolute path)",
            req.path.display()
        )));
    }
    let id = blocking(&app, move |a| {
        // Held until the import is registered, so no mount starts in between.
        let exports = a.exports.lock();
        if !a.store.volume_info(&name)?.tree {
            return Err(bad(format!(
                "volume {name} is a block volume; import disk images with `strata import`"
            )));
        }
        // Registered first: no second import opens the same unmounted tree.
        let guard = register_import(a, &name)?;
        let total = strata_fuse::tree::import::total_bytes(&req.path).map_err(bad)?;
        let handle = match exports.get(&name) {
            Some(Exported::Tree { mount, .. }) => mount.handle(),
            Some(_) => return Err(bad(format!("volume {name} is exported as a disk"))),
            None => {
                if a.store.volume_info(&name)?.ephemeral {
                    // Our handle would be its last one: dropping it would delete the tree.
                    return Err(bad(format!(
                        "{name} is an ephemeral tree that is not mounted; mount it, then import"
                    )));
                }
                let vol = a.store.open_volume(&name)?;
                strata_fuse::tree::TreeHandle::open(vol, a.store.path()).map_err(bad)?
            }
        };
        let (src, vol) = (req.path.clone(), name.clone());
        let spawned = a.jobs.spawn(move |job| {
            job.total.store(total, std::sync::atomic::Ordering::Relaxed);
            let r = handle.import(&src, &job.done);
            // The handle (and, for an unmounted tree, its volume) goes before the tree can
            // be mounted again.
            drop(handle);
            drop(guard);
            let s = r?;
            Ok(
                json!({"volume": vol, "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks,
                      "special": s.special, "hard_links": s.hard_links, "copied_bytes": s.bytes}),
            )
        });
        drop(exports);
        spawned.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
    })
    .await?;
    Ok(Json(json!({"job": id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportImageReq {
    source: String,
    path: PathBuf,
    #[serde(default = "raw")]
    format: String,
}

fn raw() -> String {
    "raw".into()
}

async fn export_image(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: ExportImageReq = parse(&body)?;
    if !req.path.is_absolute() {
        return Err(bad("the image path must be absolute"));
    }
    let id = blocking(&app, move |a| {
        let vol = req.source.split('@').next().unwrap_or_default();
        if a.store.volume_info(vol)?.tree {
            return Err(bad(format!(
                "{vol} is a tree, not a disk image: mount it (or a fork of the checkpoint) and copy files out"
            )));
        }
        let src = match req.source.split_once('@') {
            Some((v, c)) => strata_engine::Source::Checkpoint(a.store.open_checkpoint(v, c)?),
            None => strata_engine::Source::Live(a.store.open_volume(&req.source)?),
        };
        a.jobs
            .spawn(move |job| crate::jobs::export(job, &src, &req.path, &req.format))
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
    })
    .await?;
    Ok(Json(json!({"job": id})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PushReq {
    remote: Option<String>,
}

async fn push_checkpoint(
    State(app): State<Arc<App>>,
    UrlPath((vol, ck)): UrlPath<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let req: PushReq = if body.is_empty() {
        PushReq::default()
    } else {
        parse(&body)?
    };
    let id = blocking(&app, move |a| {
        let remote = a.remotes.default_remote(req.remote.as_deref())?;
        a.remotes.config(&remote)?;
        let snap = a.store.open_checkpoint(&vol, &ck)?;
        let (remotes, store) = (a.remotes.clone(), a.store.clone());
        a.jobs
            .spawn(move |job| {
                remote::push::push(&remotes, &store, job, snap, &remote)
                    .map_err(|e| format!("{e:#}"))
            })
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
    })
    .await?;
    Ok(Json(json!({"job": id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoteReq {
    name: String,
    endpoint: String,
    bucket: String,
    region: Option<String>,
    prefix: Option<String>,
    credentials_file: Option<PathBuf>,
}

fn remote_view(name: &str, c: &remote::RemoteConfig) -> Value {
    let creds = match &c.credentials {
        remote::Credentials::Env => json!("env"),
        remote::Credentials::File(p) => json!({"file": p}),
    };
    json!({"name": name, "endpoint": c.endpoint, "bucket": c.bucket, "region": c.region,
           "prefix": c.prefix, "credentials": creds})
}

async fn add_remote(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: RemoteReq = parse(&body)?;
    if !(req.endpoint.starts_with("http://") || req.endpoint.starts_with("https://")) {
        return Err(bad("--endpoint must be an http:// or https:// URL"));
    }
    if let Some(f) = &req.credentials_file {
        if !f.is_absolute() {
            return Err(bad("the credentials file path must be absolute"));
        }
    }
    let v = blocking(&app, move |a| {
        let cfg = remote::RemoteConfig {
            endpoint: req.endpoint.trim_end_matches('/').to_string(),
            bucket: req.bucket,
            region: req.region.unwrap_or_else(|| "us-east-1".into()),
            prefix: req
                .prefix
                .unwrap_or_else(|| "strata".into())
                .trim_matches('/')
                .to_string(),
            credentials: match req.credentials_file {
                Some(f) => remote::Credentials::File(f),
                None => remote::Credentials::Env,
            },
        };
        a.remotes.add(&req.name, cfg.clone())?;
        Ok(remote_view(&req.name, &cfg))
    })
    .await?;
    Ok(Json(v))
}

async fn list_remotes(State(app): State<Arc<App>>) -> ApiResult {
    let v: Vec<Value> = app
        .remotes
        .list()
        .iter()
        .map(|(n, c)| remote_view(n, c))
        .collect();
    Ok(Json(Value::Array(v)))
}

async fn remove_remote(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> ApiResult {
    blocking(&app, move |a| Ok(a.remotes.remove(&name, &a.store)?)).await?;
    Ok(Json(json!({"removed": true})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GcReq {
    grace_secs: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

async fn gc_remote(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: GcReq = if body.is_empty() {
        GcReq::default()
    } else {
        parse(&body)?
    };
    let grace = std::time::Duration::from_secs(req.grace_secs.unwrap_or(3600));
    let v = blocking(&app, move |a| {
        Ok(remote::gc::gc(&a.remotes, &name, grace, req.dry_run)?)
    })
    .await?;
    Ok(Json(v))
}

async fn remote_checkpoints(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let v = blocking(&app, move |a| {
        Ok(remote::gc::list_checkpoints(&a.remotes, &name)?)
    })
    .await?;
    Ok(Json(v))
}

async fn delete_remote_checkpoint(
    State(app): State<Arc<App>>,
    UrlPath((name, vol, ck)): UrlPath<(String, String, String)>,
) -> ApiResult {
    blocking(&app, move |a| {
        Ok(remote::gc::delete_checkpoint(&a.remotes, &name, &vol, &ck)?)
    })
    .await?;
    Ok(Json(json!({"deleted": true})))
}

async fn job_status(State(app): State<Arc<App>>, UrlPath(id): UrlPath<u64>) -> ApiResult {
    let job = app
        .jobs
        .get(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    Ok(Json(job.view(id)))
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such API endpoint".into())
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(volume_info).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route(
            "/v1/volumes/{name}/checkpoints",
            get(list_checkpoints).post(create_checkpoint),
        )
        .route(
            "/v1/volumes/{name}/checkpoints/{ck}",
            delete(delete_checkpoint),
        )
        .route(
            "/v1/volumes/{name}/checkpoints/{ck}/restore",
            post(restore_checkpoint),
        )
        .route(
            "/v1/volumes/{name}/checkpoints/{ck}/push",
            post(push_checkpoint),
        )
        .route("/v1/remotes", get(list_remotes).post(add_remote))
        .route("/v1/remotes/{name}", delete(remove_remote))
        .route("/v1/remotes/{name}/gc", post(gc_remote))
        .route("/v1/remotes/{name}/checkpoints", get(remote_checkpoints))
        .route(
            "/v1/remotes/{name}/checkpoints/{vol}/{ck}",
            delete(delete_remote_checkpoint),
        )
        .route("/v1/diff", post(diff))
        .route("/v1/exports", get(list_exports).post(create_export))
        .route("/v1/exports/{volume}", delete(delete_export))
        .route("/v1/volumes/{name}/import", post(import_image))
        .route("/v1/volumes/{name}/fs-import", post(import_tree))
        .route("/v1/export-image", post(export_image))
        .route("/v1/jobs/{id}", get(job_status))
        .route("/v1/scrub", post(scrub))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(app)
}

pub fn serve(store_dir: &Path, socket: &Path, hydrate_rate: Option<u64>) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!("a daemon is already serving {}", socket.display());
    }
    let store = Store::open(store_dir, StoreOptions::default())
        .with_context(|| format!("opening store {}", store_dir.display()))?;
    // A daemon that crashed left its FUSE mounts dead (ENOTCONN): clear them.
    strata_fuse::clean_dead_mounts();
    let _ = std::fs::remove_file(socket);
    let remotes = Remotes::open(store_dir, hydrate_rate)?;
    store.set_remote_fetcher(Arc::new(remote::PackFetcher(remotes.clone())));
    let app = Arc::new(App {
        store: Arc::new(store),
        importing: Default::default(),
        exports: Mutex::new(BTreeMap::new()),
        jobs: Default::default(),
        remotes,
    });
    remote::pull::resume(&app.remotes, &app.store);
    restore_exports(&app);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        tracing::info!(store = %store_dir.display(), api = %socket.display(), engine = app.store.engine_name(), "strata serving");
        axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the API")
    })?;
    tracing::info!("shutting down: stopping exports, committing the store");
    app.remotes
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let exports = std::mem::take(&mut *app.exports.lock());
    for (_, e) in exports {
        e.shutdown();
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
