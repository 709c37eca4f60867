//! Remotes: add, list, remove, garbage-collect, their checkpoints, and pushing to them.

use super::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PushReq {
    remote: Option<String>,
}

pub(super) async fn push_checkpoint(
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
pub(super) struct RemoteReq {
    name: String,
    endpoint: String,
    bucket: String,
    region: Option<String>,
    prefix: Option<String>,
    credentials_file: Option<PathBuf>,
}

pub(super) fn remote_view(name: &str, c: &remote::RemoteConfig) -> Value {
    let creds = match &c.credentials {
        remote::Credentials::Env => json!("env"),
        remote::Credentials::File(p) => json!({"file": p}),
    };
    json!({"name": name, "endpoint": c.endpoint, "bucket": c.bucket, "region": c.region,
           "prefix": c.prefix, "credentials": creds})
}

pub(super) async fn add_remote(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
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

pub(super) async fn list_remotes(State(app): State<Arc<App>>) -> ApiResult {
    let v: Vec<Value> = app
        .remotes
        .list()
        .iter()
        .map(|(n, c)| remote_view(n, c))
        .collect();
    Ok(Json(Value::Array(v)))
}

pub(super) async fn remove_remote(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    blocking(&app, move |a| Ok(a.remotes.remove(&name, &a.store)?)).await?;
    Ok(Json(json!({"removed": true})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct GcReq {
    grace_secs: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

pub(super) async fn gc_remote(
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

pub(super) async fn remote_checkpoints(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let v = blocking(&app, move |a| {
        Ok(remote::gc::list_checkpoints(&a.remotes, &name)?)
    })
    .await?;
    Ok(Json(v))
}

pub(super) async fn delete_remote_checkpoint(
    State(app): State<Arc<App>>,
    UrlPath((name, vol, ck)): UrlPath<(String, String, String)>,
) -> ApiResult {
    blocking(&app, move |a| {
        Ok(remote::gc::delete_checkpoint(&a.remotes, &name, &vol, &ck)?)
    })
    .await?;
    Ok(Json(json!({"deleted": true})))
}
