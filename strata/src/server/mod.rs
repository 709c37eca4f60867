//! `strata serve`: owns the store, serves the control API (HTTP/JSON on a unix socket) and
//! the exports. Every handler runs engine calls on the blocking pool; every failure becomes a
//! 4xx/5xx answer with a JSON `{"error": ...}` body — nothing a client sends can take the
//! daemon down.
//!
//! Layout: this module holds the daemon's state (`App`), the error type and helpers every
//! handler uses, the router (every route in one place) and `serve`; the handlers live in
//! one module per resource: [`volumes`], [`checkpoints`], [`exports`], [`images`] (disk
//! images and directory imports), [`remotes`], [`protect`] (protection policies),
//! [`status`] (scrub, stats, metrics).

use crate::remote::{self, Remotes};
use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
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

mod checkpoints;
mod containerd;
mod exports;
mod images;
mod protect;
mod qos;
mod remotes;
mod status;
mod volumes;

use checkpoints::*;
use exports::*;
use images::*;
use protect::{protect_volume, unprotect_volume};
use qos::set_qos;
use remotes::*;
use status::*;
use volumes::*;

struct App {
    store: Arc<Store>,
    /// Volumes an import job is writing into: not exported until it ends (the export would
    /// not see those writes coming, and a FUSE export's cache would go stale).
    importing: Arc<Mutex<std::collections::HashSet<String>>>,
    exports: Mutex<BTreeMap<String, Exported>>,
    /// Trees the containerd snapshotter mounted (its active snapshots and views), by
    /// volume: checkpoint, restore and diff go through their mounts as for exported trees.
    /// Locked after `exports` when both are.
    trees: Mutex<std::collections::HashMap<String, TreeMount>>,
    jobs: crate::jobs::Jobs,
    remotes: Arc<Remotes>,
    /// Protection policies and their rounds.
    protection: protect::Protection,
    /// Per-volume IO limits.
    qos: qos::QosTable,
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
            QuotaExceeded { .. } => StatusCode::INSUFFICIENT_STORAGE,
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

/// The mount of tree `vol`, if an export or the containerd snapshotter has it mounted.
fn mounted_tree<'a>(
    ex: &'a BTreeMap<String, Exported>,
    trees: &'a std::collections::HashMap<String, TreeMount>,
    vol: &str,
) -> Option<&'a TreeMount> {
    match ex.get(vol) {
        Some(Exported::Tree { mount, .. }) => Some(mount),
        _ => trees.get(vol),
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
        .route("/v1/volumes/{name}/qos", axum::routing::put(set_qos))
        .route(
            "/v1/volumes/{name}/protection",
            axum::routing::put(protect_volume).delete(unprotect_volume),
        )
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
        .route("/v1/oci-import", post(import_oci))
        .route("/v1/export-image", post(export_image))
        .route("/v1/jobs/{id}", get(job_status))
        .route("/v1/scrub", post(scrub))
        .route("/v1/check", post(check))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(app)
}

pub fn serve(
    store_dir: &Path,
    socket: &Path,
    rates: remote::Rates,
    containerd_socket: Option<&Path>,
) -> Result<()> {
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
    let remotes = Remotes::open(store_dir, rates)?;
    let protection = protect::Protection::open(store_dir)?;
    let qos = qos::QosTable::open(store_dir)?;
    qos.apply_all(&store);
    store.set_remote_fetcher(Arc::new(remote::PackFetcher(remotes.clone())));
    let app = Arc::new(App {
        store: Arc::new(store),
        importing: Default::default(),
        exports: Mutex::new(BTreeMap::new()),
        trees: Default::default(),
        jobs: Default::default(),
        remotes,
        protection,
        qos,
    });
    remote::pull::resume(&app.remotes, &app.store);
    restore_exports(&app);
    protect::start(&app)?;
    let snapshotter = match containerd_socket {
        Some(_) => Some(containerd::Snapshotter::open(app.clone())?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        tracing::info!(store = %store_dir.display(), api = %socket.display(), engine = app.store.engine_name(), "strata serving");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let grpc = match (&snapshotter, containerd_socket) {
            (Some(snap), Some(path)) => {
                let (snap, path) = (snap.clone(), path.to_path_buf());
                Some(tokio::spawn(async move {
                    containerd::serve(snap, &path, async {
                        let _ = stopped.await;
                    })
                    .await
                }))
            }
            _ => None,
        };
        let served = axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the API");
        let _ = stop.send(());
        if let Some(g) = grpc {
            g.await.context("the snapshotter task")??;
        }
        served
    })?;
    if let Some(s) = &snapshotter {
        s.shutdown();
    }
    tracing::info!("shutting down: stopping exports, committing the store");
    app.protection.shutdown();
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
