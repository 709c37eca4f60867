//! containerd's snapshotter, as a proxy plugin on its own socket (docs/design/containerd.md):
//! an active snapshot is a tree volume (an O(1) fork of its parent's checkpoint) mounted
//! read-write; a view is one mounted read-only; a commit is a checkpoint. The snapshots
//! containerd made are recorded in `STORE/containerd/snapshots.json` before it is answered.

use super::*;
use std::collections::HashMap;
use tonic::{Code, Request, Response, Status};

#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
mod api {
    include!(concat!(env!("OUT_DIR"), "/containerd_api.rs"));
}
use api::containerd::services::snapshots::v1 as pb;
use api::containerd::types::Mount;
use pb::snapshots_server::{Snapshots, SnapshotsServer};

const STATE_FILE: &str = "snapshots.json";
/// How long Remove waits for a tree mounted elsewhere to let go of its volume.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The checkpoint that holds a committed snapshot, in the snapshot's own volume.
const COMMITTED: &str = "committed";

#[derive(Clone, Debug, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Active,
    View,
    Committed,
}

#[derive(Clone, Debug, serde::Serialize, Deserialize)]
struct Snap {
    kind: Kind,
    #[serde(default)]
    parent: String,
    volume: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// (seconds, nanoseconds) since the epoch.
    created: (i64, i32),
    updated: (i64, i32),
}

#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct State {
    next: u64,
    snapshots: BTreeMap<String, Snap>,
}

/// The snapshotter: its record; the mounts of active snapshots and views are the daemon's
/// (`App::trees`, by volume), so checkpoint, restore and diff reach them.
pub(super) struct Snapshotter {
    app: Arc<App>,
    dir: PathBuf,
    state: Mutex<State>,
}

fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Snapshotter {
    /// Loads the record and mounts again every active snapshot and view in it.
    pub(super) fn open(app: Arc<App>) -> Result<Arc<Snapshotter>> {
        let dir = app.store.path().join("containerd");
        std::fs::create_dir_all(dir.join("mounts"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let state: State = match std::fs::read(dir.join(STATE_FILE)) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is damaged", dir.join(STATE_FILE).display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).context("reading the snapshotter's record"),
        };
        let s = Arc::new(Snapshotter {
            app,
            dir,
            state: Mutex::new(state),
        });
        let live: Vec<(String, Snap)> = s
            .state
            .lock()
            .snapshots
            .iter()
            .filter(|(_, v)| v.kind != Kind::Committed)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, snap) in live {
            let m = s
                .mount(&snap.volume, snap.kind == Kind::View)
                .map_err(|e| anyhow::anyhow!("remounting snapshot {key}: {}", e.message()))?;
            s.app.trees.lock().insert(snap.volume, m);
        }
        Ok(s)
    }

    fn save(&self, st: &State) -> Result<(), Status> {
        let bytes = serde_json::to_vec(st).map_err(internal)?;
        crate::state::write_atomic(&self.dir, STATE_FILE, &bytes).map_err(internal)
    }

    fn mountpoint(&self, volume: &str) -> PathBuf {
        self.dir.join("mounts").join(volume)
    }

    fn mount(&self, volume: &str, read_only: bool) -> Result<TreeMount, Status> {
        let dir = self.mountpoint(volume);
        std::fs::create_dir_all(&dir).map_err(internal)?;
        let vol = self.app.store.open_volume(volume).map_err(internal)?;
        let opts = FuseOptions {
            read_only,
            // Processes in the container run as any user.
            allow_other: true,
            ..FuseOptions::default()
        };
        TreeMount::start(vol, self.app.store.path(), &dir, &opts).map_err(internal)
    }

    fn mounts_of(&self, snap: &Snap) -> Vec<Mount> {
        let rw = if snap.kind == Kind::View { "ro" } else { "rw" };
        vec![Mount {
            r#type: "bind".into(),
            source: self.mountpoint(&snap.volume).display().to_string(),
            target: String::new(),
            options: vec!["rbind".into(), rw.into()],
        }]
    }

    /// Unmounts a snapshot's tree, if mounted (a busy one stays mounted).
    fn unmount(&self, volume: &str) -> Result<(), Status> {
        let taken = self.app.trees.lock().remove(volume);
        if let Some(mut m) = taken {
            if let Err(e) = m.stop() {
                self.app.trees.lock().insert(volume.to_string(), m);
                return Err(Status::failed_precondition(e.to_string()));
            }
        }
        let _ = std::fs::remove_dir(self.mountpoint(volume));
        Ok(())
    }

    /// Unmounts a snapshot's tree and deletes its volume. A tree that was still mounted
    /// elsewhere when it was unmounted here (containerd committed it while bind-mounted)
    /// lets go of its volume when that mount goes: Remove waits up to [`RELEASE_WAIT`] for
    /// it, then answers FailedPrecondition (containerd's GC tries again later).
    fn drop_volume(&self, volume: &str) -> Result<(), Status> {
        self.unmount(volume)?;
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        loop {
            match self.app.store.delete_volume(volume) {
                Ok(()) | Err(EngineError::NoSuchVolume(_)) => return Ok(()),
                Err(EngineError::VolumeBusy(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e @ EngineError::VolumeBusy(_)) => {
                    return Err(Status::failed_precondition(format!(
                        "{e} (its tree is still mounted somewhere)"
                    )))
                }
                Err(e) => return Err(internal(e)),
            }
        }
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("empty snapshot key"));
        }
        let mut st = self.state.lock();
        if st.snapshots.contains_key(key) {
            return Err(Status::already_exists(format!(
                "snapshot {key} already exists"
            )));
        }
        let base = if parent.is_empty() {
            None
        } else {
            match st.snapshots.get(parent) {
                None => return Err(Status::not_found(format!("parent {parent} not found"))),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(Status::invalid_argument(format!(
                        "parent {parent} is not committed"
                    )))
                }
                Some(p) => Some(p.volume.clone()),
            }
        };
        st.next += 1;
        let volume = format!("ctrd-{}", st.next);
        let store = &self.app.store;
        match &base {
            Some(pv) => store.fork(pv, COMMITTED, &volume, false).map(|_| ()),
            None => store
                .create_volume(
                    &volume,
                    strata_engine::TREE_VOLUME_SIZE,
                    VolumeOptions {
                        tree: true,
                        ..VolumeOptions::default()
                    },
                )
                .map(|_| ()),
        }
        .map_err(internal)?;
        let m = match self.mount(&volume, kind == Kind::View) {
            Ok(m) => m,
            Err(e) => {
                let _ = store.delete_volume(&volume);
                return Err(e);
            }
        };
        let t = now();
        let snap = Snap {
            kind,
            parent: parent.to_string(),
            volume,
            labels: labels.into_iter().filter(|(_, v)| !v.is_empty()).collect(),
            created: t,
            updated: t,
        };
        let mounts = self.mounts_of(&snap);
        self.app.trees.lock().insert(snap.volume.clone(), m);
        st.snapshots.insert(key.to_string(), snap);
        self.save(&st)?;
        Ok(mounts)
    }

    fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<(), Status> {
        let mut st = self.state.lock();
        let snap = match st.snapshots.get(key) {
            None => return Err(Status::not_found(format!("snapshot {key} not found"))),
            Some(s) if s.kind != Kind::Active => {
                return Err(Status::failed_precondition(format!(
                    "snapshot {key} is not active"
                )))
            }
            Some(s) => s.clone(),
        };
        if st.snapshots.contains_key(name) {
            return Err(Status::already_exists(format!(
                "snapshot {name} already exists"
            )));
        }
        // Taken from the live tree with its operations held off (it may still be mounted
        // where containerd put it: the checkpoint holds every write made before).
        {
            let trees = self.app.trees.lock();
            let ck = || self.app.store.checkpoint(&snap.volume, COMMITTED);
            match trees.get(&snap.volume) {
                Some(m) => m
                    .checkpoint(ck)
                    .map_err(|e| Status::internal(format!("syncing the tree: {e:?}")))?,
                None => ck(),
            }
            .map_err(internal)?;
        }
        // The active tree is done with; a file still open in it keeps it mounted until the
        // snapshot is removed or cleaned up.
        if let Err(e) = self.unmount(&snap.volume) {
            tracing::info!(snapshot = name, error = %e.message(), "committed snapshot's tree stays mounted while in use");
        }
        let t = now();
        let committed = Snap {
            kind: Kind::Committed,
            labels: labels.into_iter().filter(|(_, v)| !v.is_empty()).collect(),
            created: t,
            updated: t,
            ..snap
        };
        st.snapshots.remove(key);
        st.snapshots.insert(name.to_string(), committed);
        self.save(&st)
    }

    fn remove(&self, key: &str) -> Result<(), Status> {
        let mut st = self.state.lock();
        let Some(snap) = st.snapshots.get(key).cloned() else {
            return Err(Status::not_found(format!("snapshot {key} not found")));
        };
        if st.snapshots.values().any(|s| s.parent == key) {
            return Err(Status::failed_precondition(format!(
                "cannot remove snapshot {key} with children"
            )));
        }
        self.drop_volume(&snap.volume)?;
        st.snapshots.remove(key);
        self.save(&st)
    }

    fn info(key: &str, s: &Snap) -> pb::Info {
        let ts = |(seconds, nanos): (i64, i32)| prost_types::Timestamp { seconds, nanos };
        pb::Info {
            name: key.to_string(),
            parent: s.parent.clone(),
            kind: match s.kind {
                Kind::View => pb::Kind::View,
                Kind::Active => pb::Kind::Active,
                Kind::Committed => pb::Kind::Committed,
            } as i32,
            created_at: Some(ts(s.created)),
            updated_at: Some(ts(s.updated)),
            labels: s.labels.clone().into_iter().collect(),
        }
    }

    fn update(
        &self,
        info: pb::Info,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<pb::Info, Status> {
        let mut st = self.state.lock();
        let Some(snap) = st.snapshots.get_mut(&info.name) else {
            return Err(Status::not_found(format!(
                "snapshot {} not found",
                info.name
            )));
        };
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            snap.labels = info.labels.into_iter().collect();
        } else {
            for p in &paths {
                if p == "labels" {
                    snap.labels = info.labels.clone().into_iter().collect();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => {
                            snap.labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            snap.labels.remove(k);
                        }
                    }
                } else {
                    return Err(Status::invalid_argument(format!(
                        "cannot update {p} of snapshot {}",
                        info.name
                    )));
                }
            }
        }
        snap.labels.retain(|_, v| !v.is_empty());
        snap.updated = now();
        let out = Self::info(&info.name, snap);
        self.save(&st)?;
        Ok(out)
    }

    fn usage(&self, key: &str) -> Result<pb::UsageResponse, Status> {
        let st = self.state.lock();
        let Some(snap) = st.snapshots.get(key) else {
            return Err(Status::not_found(format!("snapshot {key} not found")));
        };
        let store = &self.app.store;
        // What the snapshot adds to its parent: its mapped bytes less the parent's.
        let committed_bytes = |volume: &str| -> Result<u64, Status> {
            Ok(store
                .list_checkpoints(volume)
                .map_err(internal)?
                .into_iter()
                .find(|c| c.name == COMMITTED)
                .map_or(0, |c| c.mapped_bytes))
        };
        let own = if snap.kind == Kind::Committed {
            committed_bytes(&snap.volume)?
        } else {
            store
                .volume_info(&snap.volume)
                .map_err(internal)?
                .mapped_bytes
        };
        let parent = match st.snapshots.get(&snap.parent) {
            Some(p) if !snap.parent.is_empty() => committed_bytes(&p.volume)?,
            _ => 0,
        };
        let size = own.saturating_sub(parent);
        Ok(pb::UsageResponse {
            size: size as i64,
            inodes: 0,
        })
    }

    /// Deletes `ctrd-*` volumes the record does not name (what a crash between an engine
    /// change and the record left).
    fn cleanup(&self) -> Result<(), Status> {
        let st = self.state.lock();
        // Trees of committed snapshots that were still in use at commit.
        for s in st.snapshots.values().filter(|s| s.kind == Kind::Committed) {
            let _ = self.unmount(&s.volume);
        }
        let known: std::collections::HashSet<&str> =
            st.snapshots.values().map(|s| s.volume.as_str()).collect();
        for v in self.app.store.list_volumes() {
            if v.name.starts_with("ctrd-") && !known.contains(v.name.as_str()) {
                let _ = self.app.store.delete_volume(&v.name);
            }
        }
        Ok(())
    }

    fn list(&self, filters: &[String]) -> Result<Vec<pb::Info>, Status> {
        let filters: Vec<Filter> = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| Filter::parse(f))
            .collect::<Result<_, _>>()
            .map_err(Status::invalid_argument)?;
        let st = self.state.lock();
        Ok(st
            .snapshots
            .iter()
            .map(|(k, s)| Self::info(k, s))
            .filter(|i| filters.is_empty() || filters.iter().any(|f| f.matches(i)))
            .collect())
    }
}

/// containerd's filter grammar, as snapshots use it: `sel(,sel)*` where `sel` is a field
/// path (`kind`, `name`, `parent`, `labels.KEY`, a key possibly quoted) with an optional
/// `==`, `!=` or `~=` (a regular expression the field must match somewhere) and value.
#[derive(Debug)]
struct Filter(Vec<Selector>);

#[derive(Debug)]
enum Op {
    Eq(String),
    Ne(String),
    Matches(regex::Regex),
}

/// A field path, and how it is compared (none: the field is present and not empty).
type Selector = (Vec<String>, Option<Op>);

impl Filter {
    fn parse(s: &str) -> Result<Filter, String> {
        let mut sels = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            let mut path = Vec::new();
            loop {
                let (field, after) = if let Some(q) = rest.strip_prefix('"') {
                    let end = q
                        .find('"')
                        .ok_or_else(|| format!("unclosed quote in {s}"))?;
                    (q[..end].to_string(), &q[end + 1..])
                } else {
                    let end = rest
                        .find(|c: char| {
                            !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/')
                        })
                        .unwrap_or(rest.len());
                    (rest[..end].to_string(), &rest[end..])
                };
                if field.is_empty() {
                    return Err(format!("bad field in filter {s}"));
                }
                path.push(field);
                rest = after;
                match rest.strip_prefix('.') {
                    Some(r) => rest = r,
                    None => break,
                }
            }
            let op = if let Some(r) = rest.strip_prefix("==") {
                rest = r;
                Some(0)
            } else if let Some(r) = rest.strip_prefix("!=") {
                rest = r;
                Some(1)
            } else if let Some(r) = rest.strip_prefix("~=") {
                rest = r;
                Some(2)
            } else {
                None
            };
            let value = match op {
                None => None,
                Some(kind) => {
                    let (v, after) = if let Some(q) = rest.strip_prefix('"') {
                        let end = q
                            .find('"')
                            .ok_or_else(|| format!("unclosed quote in {s}"))?;
                        (q[..end].to_string(), &q[end + 1..])
                    } else {
                        let end = rest
                            .find(|c: char| c == ',' || c.is_whitespace())
                            .unwrap_or(rest.len());
                        (rest[..end].to_string(), &rest[end..])
                    };
                    rest = after;
                    Some(match kind {
                        0 => Op::Eq(v),
                        1 => Op::Ne(v),
                        _ => Op::Matches(
                            regex::Regex::new(&v)
                                .map_err(|e| format!("bad regular expression in {s}: {e}"))?,
                        ),
                    })
                }
            };
            sels.push((path, value));
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r.trim_start();
            } else if !rest.is_empty() {
                return Err(format!("unexpected {rest:?} in filter {s}"));
            }
        }
        Ok(Filter(sels))
    }

    fn matches(&self, i: &pb::Info) -> bool {
        self.0.iter().all(|(path, value)| {
            let field: Option<String> = match path.first().map(String::as_str) {
                Some("name") => Some(i.name.clone()),
                Some("parent") => Some(i.parent.clone()),
                Some("kind") => Some(
                    match pb::Kind::try_from(i.kind).unwrap_or(pb::Kind::Unknown) {
                        pb::Kind::View => "view",
                        pb::Kind::Active => "active",
                        pb::Kind::Committed => "committed",
                        pb::Kind::Unknown => "unknown",
                    }
                    .to_string(),
                ),
                Some("labels") => i.labels.get(&path[1..].join(".")).cloned(),
                _ => None,
            };
            match (value, field) {
                (None, f) => f.is_some_and(|f| !f.is_empty()),
                (Some(Op::Eq(v)), f) => f.as_deref() == Some(v.as_str()),
                (Some(Op::Ne(v)), f) => f.as_deref() != Some(v.as_str()),
                (Some(Op::Matches(re)), f) => f.is_some_and(|f| re.is_match(&f)),
            }
        })
    }
}

/// The gRPC face: each call runs on the blocking pool (engine calls and FUSE mounts block).
#[derive(Clone)]
pub(super) struct Service(Arc<Snapshotter>);

impl Service {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let s = self.0.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| Status::new(Code::Internal, e.to_string()))?
    }
}

type ListStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = self
            .run(move |s| s.create(&r.key, &r.parent, r.labels, Kind::Active))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        r: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = self
            .run(move |s| s.create(&r.key, &r.parent, r.labels, Kind::View))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        r: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = r.into_inner().key;
        let mounts = self
            .run(move |s| match s.state.lock().snapshots.get(&key) {
                None => Err(Status::not_found(format!("snapshot {key} not found"))),
                Some(sn) if sn.kind == Kind::Committed => Err(Status::failed_precondition(
                    format!("snapshot {key} is committed: it has no mounts"),
                )),
                Some(sn) => Ok(s.mounts_of(sn)),
            })
            .await?;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run(move |s| s.commit(&r.name, &r.key, r.labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = r.into_inner().key;
        self.run(move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = r.into_inner().key;
        let info = self
            .run(move |s| {
                s.state
                    .lock()
                    .snapshots
                    .get(&key)
                    .map(|sn| Snapshotter::info(&key, sn))
                    .ok_or_else(|| Status::not_found(format!("snapshot {key} not found")))
            })
            .await?;
        Ok(Response::new(pb::StatSnapshotResponse { info: Some(info) }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let info = self.run(move |s| s.update(info, r.update_mask)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let filters = r.into_inner().filters;
        let all = self.run(move |s| s.list(&filters)).await?;
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        r: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = r.into_inner().key;
        Ok(Response::new(self.run(move |s| s.usage(&key)).await?))
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Serves the snapshotter on `socket` until `shutdown` resolves.
pub(super) async fn serve(
    snap: Arc<Snapshotter>,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let _ = std::fs::remove_file(socket);
    let uds = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "containerd snapshotter serving");
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service(snap)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(uds),
            shutdown,
        )
        .await
        .context("serving the containerd snapshotter")
}

impl Snapshotter {
    /// Unmounts every snapshot's tree at daemon shutdown (lazily when busy).
    pub(super) fn shutdown(&self) {
        let all: Vec<TreeMount> = self.app.trees.lock().drain().map(|(_, m)| m).collect();
        for m in all {
            m.detach();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, parent: &str, kind: pb::Kind, labels: &[(&str, &str)]) -> pb::Info {
        pb::Info {
            name: name.into(),
            parent: parent.into(),
            kind: kind as i32,
            created_at: None,
            updated_at: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn matches(filter: &str, i: &pb::Info) -> bool {
        Filter::parse(filter).unwrap().matches(i)
    }

    #[test]
    fn filters_follow_containerds_grammar() {
        let a = info(
            "a-wl",
            "p",
            pb::Kind::Active,
            &[("l", "1"), ("containerd.io/gc.root", "check-walk")],
        );
        let c = info("p", "", pb::Kind::Committed, &[]);
        assert!(matches("name==a-wl", &a) && !matches("name==a-wl", &c));
        assert!(matches("kind==active,labels.l", &a));
        assert!(!matches("kind==active,labels.l==2", &a));
        assert!(matches(r#"labels."containerd.io/gc.root"==check-walk"#, &a));
        assert!(matches(r#"parent!="",labels.l"#, &a));
        assert!(!matches(r#"parent!="""#, &c));
        assert!(matches("parent==p", &a));
        assert!(matches("name~=^a-", &a) && !matches("name~=^a-", &c));
        assert!(!matches("labels.missing", &a));
        assert!(Filter::parse("name~=(").is_err());
        assert!(Filter::parse("name==x junk").is_err());
    }
}
