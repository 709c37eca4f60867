//! Moving data in and out: disk image import and export, directory import into a tree.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImportReq {
    path: PathBuf,
    format: Option<String>,
}

pub(super) async fn import_image(
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
pub(super) struct ImportGuard {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    name: String,
}

impl Drop for ImportGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.name);
    }
}

pub(super) fn register_import(a: &App, name: &str) -> Result<ImportGuard, ApiError> {
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
pub(super) struct TreeImportReq {
    path: PathBuf,
}

/// `strata fs import`: copies a directory into a tree, mounted or not, as a job.
pub(super) async fn import_tree(
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
        let trees = a.trees.lock();
        let handle = match (exports.get(&name), trees.get(&name)) {
            (Some(Exported::Tree { mount, .. }), _) | (None, Some(mount)) => mount.handle(),
            (Some(_), _) => return Err(bad(format!("volume {name} is exported as a disk"))),
            (None, None) => {
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
pub(super) struct ExportImageReq {
    source: String,
    path: PathBuf,
    #[serde(default = "raw")]
    format: String,
}

pub(super) fn raw() -> String {
    "raw".into()
}

pub(super) async fn export_image(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OciImportReq {
    source: PathBuf,
    #[serde(default)]
    tag: Option<String>,
}

/// Imports a container image (OCI layout or docker archive) into a new tree volume, one
/// checkpoint per layer, reusing layers already imported (see `crate::oci`).
pub(super) async fn import_oci(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let req: OciImportReq = parse(&body)?;
    if !req.source.is_absolute() || !req.source.exists() {
        return Err(bad(format!(
            "{} does not exist (give an absolute path to an image directory or tar)",
            req.source.display()
        )));
    }
    let id = blocking(&app, move |a| {
        let plan = crate::oci::prepare(&a.store, &req.source, req.tag.as_deref())
            .map_err(|e| bad(format!("{e:#}")))?;
        // The new volume is not exported (nor imported into) until the job ends.
        let guard = register_import(a, &plan.volume)?;
        let total = plan.total_bytes();
        let store = a.store.clone();
        a.jobs
            .spawn(move |job| {
                job.total.store(total, std::sync::atomic::Ordering::Relaxed);
                let r = plan.run(&store, &job.done);
                drop(guard);
                r.map_err(|e| format!("{e:#}"))
            })
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
    })
    .await?;
    Ok(Json(json!({"job": id})))
}
