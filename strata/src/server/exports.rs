//! Exports: vhost-user sockets, FUSE image mounts and tree mounts; the list kept in `exports.json` and restored at start.

use super::*;

/// One export per volume: a vhost-user-blk socket or a FUSE mount.
pub(super) enum Exported {
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
    pub(super) fn path(&self) -> &Path {
        match self {
            Exported::Vhost { socket, .. } => socket,
            Exported::Fuse { export, .. } => export.mountpoint(),
            Exported::Tree { mount, .. } => mount.mountpoint(),
        }
    }

    pub(super) fn fuse(&self) -> Option<&FuseExport> {
        match self {
            Exported::Fuse { export, .. } => Some(export),
            Exported::Vhost { .. } | Exported::Tree { .. } => None,
        }
    }

    /// What the API shows: the record, and how a tree is served.
    pub(super) fn view(&self, vol: &str) -> Value {
        let mut v = self.record(vol);
        if let (Exported::Tree { mount, .. }, Some(o)) = (self, v.as_object_mut()) {
            o.insert("transport".into(), json!(mount.transport()));
        }
        v
    }

    /// What `exports.json` keeps: the request that starts it again.
    fn record(&self, vol: &str) -> Value {
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
                json!({"volume": vol, "kind": "tree", "mountpoint": mount.mountpoint(), "read_only": read_only, "allow_other": allow_other})
            }
        }
    }

    /// Stops serving at daemon shutdown: a busy FUSE mount is detached lazily.
    pub(super) fn shutdown(self) {
        match self {
            Exported::Vhost { export, .. } => export.stop(),
            Exported::Fuse { export, .. } => export.detach(),
            Exported::Tree { mount, .. } => mount.detach(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportReq {
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

pub(super) fn one() -> u16 {
    1
}

pub(super) fn absolute(p: Option<PathBuf>, what: &str, kind: &str) -> Result<PathBuf, ApiError> {
    let p = p.ok_or_else(|| bad(format!("a {kind} export needs {what}")))?;
    if !p.is_absolute() {
        return Err(bad(format!("{what} must be an absolute path")));
    }
    Ok(p)
}

pub(super) async fn create_export(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: ExportReq = parse(&body)?;
    let v = blocking(&app, move |a| start_export(a, req)).await?;
    Ok(Json(v))
}

/// Stops every export of `vol` at once (FUSE mounts detached even when busy), and forgets
/// them: for a volume fenced by a failover elsewhere.
pub(super) fn stop_exports_of(a: &App, vol: &str) {
    let mut ex = a.exports.lock();
    if let Some(e) = ex.remove(vol) {
        e.shutdown();
        save_exports(a, &ex);
    }
}

/// Validates and starts an export, and records it so a restarted daemon serves it again.
pub(super) fn start_export(a: &App, req: ExportReq) -> Result<Value, ApiError> {
    if let Some(o) = a.protection.fenced(&req.volume) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "volume {} is fenced: store {} took it over in the remote (generation {}); \
                 `strata volume unprotect` it to use this copy anyway",
                req.volume, o.store, o.generation
            ),
        ));
    }
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
    if a.trees.lock().contains_key(&req.volume) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "volume {} is a containerd snapshot, mounted by the snapshotter",
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
        let io = vol.io().clone();
        let export = Export::start(Arc::new(vol), io, block_size, opts, &socket)
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

pub(super) const EXPORTS_FILE: &str = "exports.json";

/// Records the exports in `STORE/exports.json` (written to a temporary file, synced, renamed)
/// so that the next `strata serve` starts them again. A failure is logged: the exports keep
/// serving, they are just not restored after a restart.
pub(super) fn save_exports(a: &App, ex: &BTreeMap<String, Exported>) {
    let list: Vec<Value> = ex.iter().map(|(vol, e)| e.record(vol)).collect();
    let bytes = Value::Array(list).to_string();
    if let Err(e) = crate::state::write_atomic(a.store.path(), EXPORTS_FILE, bytes.as_bytes()) {
        tracing::error!(error = %e, "recording the exports failed; they will not be restored after a restart");
    }
}

/// Starts the exports a previous daemon recorded. One that cannot start (its volume is gone,
/// its mount point is no longer empty, ...) is logged and dropped from the record.
pub(super) fn restore_exports(a: &App) {
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
pub(super) async fn list_exports(State(app): State<Arc<App>>) -> ApiResult {
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

pub(super) async fn delete_export(
    State(app): State<Arc<App>>,
    UrlPath(vol): UrlPath<String>,
) -> ApiResult {
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
