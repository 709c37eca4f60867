//! Remotes: checkpoints shipped to S3-compatible object storage (docs/design/remotes.md).
//!
//! The daemon keeps, in `STORE/remotes.json` (replaced atomically): the configured remotes
//! (endpoint, bucket, region, prefix and where the credentials come from — never the
//! credentials themselves), which local checkpoints each remote holds (checkpoint id →
//! manifest key, the bases of incremental pushes), the push id of each push in progress
//! (so an interrupted push resumes into the same objects), and the volumes being restored
//! from a remote (so hydration resumes after a restart).
//!
//! All object-store IO runs on a small runtime of its own; engine threads (vhost-user
//! workers, FUSE threads, jobs) block on it through [`Remotes::run`].

pub mod gc;
pub mod governor;
pub mod manifest;
pub mod pull;
pub mod push;

use anyhow::{anyhow, bail, Context, Result};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const STATE_FILE: &str = "remotes.json";

/// Where a remote's credentials come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Credentials {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) in the daemon's
    /// environment.
    Env,
    /// A file readable only by its owner with `access_key_id = ...` and
    /// `secret_access_key = ...` lines (the `aws_`-prefixed names of an AWS credentials file
    /// are accepted too).
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Every key lives under this prefix, so a bucket can be shared.
    pub prefix: String,
    pub credentials: Credentials,
}

/// A manifest a local checkpoint is known to equal: its key, and the push id written in it
/// (a manifest under the same key written by anyone else has another push id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    pub key: String,
    pub push_id: String,
}

/// A volume being restored from a remote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restoring {
    pub remote: String,
    /// `VOL@CKPT` in the remote.
    pub source: String,
    /// `creating` until every extent is installed, then `hydrating`.
    pub state: String,
    /// An eager restore takes checkpoint CKPT on the volume once it is fully local; until
    /// then nothing may write to it (no export, import or restore).
    pub eager: bool,
    /// The push id in the source manifest (recorded with the checkpoint an eager restore
    /// takes).
    #[serde(default)]
    pub push_id: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    remotes: BTreeMap<String, RemoteConfig>,
    /// remote → local checkpoint id → the manifest that holds it.
    #[serde(default)]
    pushed: BTreeMap<String, BTreeMap<u64, Pushed>>,
    /// remote → local checkpoint id → push id of a push not finished yet.
    #[serde(default)]
    pending: BTreeMap<String, BTreeMap<u64, String>>,
    #[serde(default)]
    restoring: BTreeMap<String, Restoring>,
    /// This store's identity in `owners/` objects (docs/design/protection.md); made on
    /// first use.
    #[serde(default)]
    store_id: String,
}

/// Bandwidth limits of the daemon's transfers, bytes per second (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rates {
    pub hydrate: Option<u64>,
    pub push: Option<u64>,
    /// Pushes back off while the guests' IO slows down (`--no-push-yield` turns it off).
    pub push_yield: bool,
}

/// `owners/<volume>` in a remote: which store protects the volume. A failover takes it
/// over with the next generation; the store it names is the only one whose protection
/// rounds push the volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Owner {
    pub store: String,
    pub generation: u64,
    pub since_unix: u64,
}

/// A remote pack, as the engine's opaque descriptor names it.
#[derive(Debug, Serialize, Deserialize)]
struct PackDesc {
    remote: String,
    key: String,
}

/// Hydration progress of one volume, for `volume info`.
#[derive(Debug, Default)]
pub struct Hydration {
    /// Waiting for one of the store's hydration slots (see `pull::SLOTS`).
    pub queued: std::sync::atomic::AtomicBool,
    pub fetched_bytes: std::sync::atomic::AtomicU64,
    pub error: Mutex<Option<String>>,
    pub cancel: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
pub struct Remotes {
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    state: Mutex<State>,
    clients: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    pub hydrating: Mutex<HashMap<String, Arc<Hydration>>>,
    /// Volumes copying in now (at most `pull::SLOTS`), and its wake-up.
    pub hydration_slots: (Mutex<usize>, parking_lot::Condvar),
    /// Per remote: bytes fetched, failed fetches, bytes uploaded (for /metrics).
    pub counters: Mutex<BTreeMap<String, [u64; 3]>>,
    /// Volume names a restore from a remote is creating right now.
    pub creating: Mutex<std::collections::HashSet<String>>,
    /// Set at shutdown: background hydration stops.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Bytes per second one volume's hydration may fetch (`strata serve --hydrate-rate`).
    pub hydrate_rate: Option<u64>,
    /// How fast a push may upload: `strata serve --push-rate`, and the back-off while the
    /// guests' IO slows down (see `governor`).
    pub push: governor::Governor,
}

/// A remote object's key under the remote's prefix.
pub fn key(cfg: &RemoteConfig, rel: &str) -> ObjPath {
    if cfg.prefix.is_empty() {
        ObjPath::from(rel)
    } else {
        ObjPath::from(format!("{}/{rel}", cfg.prefix))
    }
}

pub fn manifest_rel(volume: &str, checkpoint: &str) -> String {
    format!("manifests/{volume}/{checkpoint}.manifest")
}

fn read_credentials(c: &Credentials) -> Result<(String, String, Option<String>)> {
    match c {
        Credentials::Env => {
            let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let id = get("AWS_ACCESS_KEY_ID")
                .context("AWS_ACCESS_KEY_ID is not set in the daemon's environment")?;
            let secret = get("AWS_SECRET_ACCESS_KEY")
                .context("AWS_SECRET_ACCESS_KEY is not set in the daemon's environment")?;
            Ok((id, secret, get("AWS_SESSION_TOKEN")))
        }
        Credentials::File(path) => {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path)
                .with_context(|| format!("credentials file {}", path.display()))?;
            if meta.mode() & 0o077 != 0 {
                bail!(
                    "credentials file {} is readable by group or others (mode {:o}); chmod 600 it",
                    path.display(),
                    meta.mode() & 0o777
                );
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading credentials file {}", path.display()))?;
            let (mut id, mut secret, mut token) = (None, None, None);
            for line in text.lines() {
                let Some((k, v)) = line.split_once('=') else {
                    continue;
                };
                let v = v.trim().to_string();
                match k.trim().trim_start_matches("aws_") {
                    "access_key_id" => id = Some(v),
                    "secret_access_key" => secret = Some(v),
                    "session_token" => token = Some(v),
                    _ => {}
                }
            }
            match (id, secret) {
                (Some(i), Some(s)) => Ok((i, s, token)),
                _ => bail!(
                    "credentials file {} needs access_key_id and secret_access_key lines",
                    path.display()
                ),
            }
        }
    }
}

/// A client for `cfg`. `retries` bounds retries of failed requests (transient errors, a
/// node restarting); the probe of `remote add` uses few so a wrong endpoint fails fast.
fn build_client(cfg: &RemoteConfig, retries: usize) -> Result<Arc<dyn ObjectStore>> {
    let (id, secret, token) = read_credentials(&cfg.credentials)?;
    let mut b = AmazonS3Builder::new()
        .with_endpoint(&cfg.endpoint)
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id(id)
        .with_secret_access_key(secret)
        .with_retry(RetryConfig {
            max_retries: retries,
            retry_timeout: Duration::from_secs(60),
            ..Default::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(120)),
        )
        // After the client options, which would reset it.
        .with_allow_http(cfg.endpoint.starts_with("http://"));
    if let Some(t) = token {
        b = b.with_token(t);
    }
    Ok(Arc::new(b.build().context("configuring the S3 client")?))
}

impl Remotes {
    pub fn open(dir: &Path, rates: Rates) -> Result<Arc<Remotes>> {
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is damaged", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-remote")
            .enable_all()
            .build()
            .context("starting the remote IO runtime")?;
        Ok(Arc::new(Remotes {
            dir: dir.to_path_buf(),
            rt,
            state: Mutex::new(state),
            clients: Mutex::new(HashMap::new()),
            hydrating: Mutex::new(HashMap::new()),
            hydration_slots: Default::default(),
            creating: Default::default(),
            counters: Default::default(),
            stopping: Default::default(),
            hydrate_rate: rates.hydrate,
            push: governor::Governor::new(rates.push, rates.push_yield),
        }))
    }

    /// This store's id (made and recorded the first time it is asked for).
    pub fn store_id(&self) -> Result<String> {
        let mut st = self.state.lock();
        if st.store_id.is_empty() {
            st.store_id = new_id();
            self.save(&st)?;
        }
        Ok(st.store_id.clone())
    }

    /// The owner record of `vol` in `remote`, if any.
    pub fn owner(&self, remote: &str, vol: &str) -> Result<Option<Owner>> {
        let (cfg, c) = self.client(remote)?;
        let path = key(&cfg, &format!("owners/{vol}"));
        let shown = path.to_string();
        let bytes = self.run(async move { get_small(&c, &path).await })??;
        bytes
            .map(|b| serde_json::from_slice(&b).with_context(|| format!("{shown} is damaged")))
            .transpose()
    }

    /// Makes this store the owner of `vol` in `remote`: the next generation after the
    /// current owner's (a takeover), or 1. Returns the new record.
    pub fn take_ownership(&self, remote: &str, vol: &str) -> Result<Owner> {
        let generation = self.owner(remote, vol)?.map_or(0, |o| o.generation) + 1;
        let owner = Owner {
            store: self.store_id()?,
            generation,
            since_unix: push::now_unix(),
        };
        let (cfg, c) = self.client(remote)?;
        let path = key(&cfg, &format!("owners/{vol}"));
        let body = serde_json::to_vec(&owner)?;
        self.run(async move {
            c.put(&path, body.into())
                .await
                .map_err(|e| anyhow!("writing {path}: {}", clean(&e)))
        })??;
        Ok(owner)
    }

    fn save(&self, st: &State) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(st)?;
        crate::state::write_atomic(&self.dir, STATE_FILE, &bytes)
            .with_context(|| format!("writing {}", self.dir.join(STATE_FILE).display()))
    }

    /// Runs `f` on the remote runtime and waits for it; callable from any thread.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| anyhow!("remote IO task was dropped"))
    }

    /// Starts `f` on the remote runtime without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.rt.spawn(f)
    }

    pub fn config(&self, name: &str) -> Result<RemoteConfig> {
        self.state
            .lock()
            .remotes
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("no remote named {name:?} (see `strata remote list`)"))
    }

    pub fn client(&self, name: &str) -> Result<(RemoteConfig, Arc<dyn ObjectStore>)> {
        let cfg = self.config(name)?;
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(name) {
            return Ok((cfg, c.clone()));
        }
        let c = build_client(&cfg, 8)?;
        clients.insert(name.to_string(), c.clone());
        Ok((cfg, c))
    }

    /// The remote to use when a command names none: the only one configured.
    pub fn default_remote(&self, named: Option<&str>) -> Result<String> {
        if let Some(n) = named {
            return Ok(n.to_string());
        }
        let st = self.state.lock();
        let mut names = st.remotes.keys();
        match (names.next(), names.next()) {
            (Some(n), None) => Ok(n.clone()),
            (None, _) => bail!("no remote is configured (strata remote add)"),
            _ => bail!("several remotes are configured; pass --remote NAME"),
        }
    }

    /// Adds a remote after checking that its bucket answers with these credentials.
    pub fn add(&self, name: &str, cfg: RemoteConfig) -> Result<()> {
        strata_engine::validate_name("remote", name)?;
        if self.state.lock().remotes.contains_key(name) {
            bail!("remote {name:?} already exists");
        }
        let client = build_client(&cfg, 1)?;
        let probe = key(&cfg, "probe-missing-object");
        let c = client.clone();
        match self.run(async move { c.head(&probe).await })? {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => bail!("remote {name:?} does not answer: {}", clean(&e)),
        }
        let mut st = self.state.lock();
        st.remotes.insert(name.to_string(), cfg);
        self.save(&st)?;
        Ok(())
    }

    pub fn list(&self) -> Vec<(String, RemoteConfig)> {
        self.state
            .lock()
            .remotes
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect()
    }

    /// Removes a remote, refused while a volume still reads from it.
    pub fn remove(&self, name: &str, store: &strata_engine::Store) -> Result<()> {
        let mut st = self.state.lock();
        if !st.remotes.contains_key(name) {
            bail!("no remote named {name:?}");
        }
        if let Some((v, _)) = st.restoring.iter().find(|(_, r)| r.remote == name) {
            bail!("volume {v:?} is still being restored from remote {name:?}; wait for hydration to finish or delete the volume");
        }
        for v in store.list_volumes() {
            if self.volume_uses(store, &v.name, name) {
                bail!(
                    "volume {:?} (or one of its checkpoints) still reads blocks from remote {name:?}",
                    v.name
                );
            }
        }
        st.remotes.remove(name);
        st.pushed.remove(name);
        st.pending.remove(name);
        self.save(&st)?;
        self.clients.lock().remove(name);
        Ok(())
    }

    fn volume_uses(&self, store: &strata_engine::Store, vol: &str, remote: &str) -> bool {
        store
            .remote_packs_of(vol)
            .unwrap_or_default()
            .iter()
            .any(|id| {
                store
                    .remote_pack(*id)
                    .and_then(|d| serde_json::from_slice::<PackDesc>(&d).ok())
                    .is_some_and(|d| d.remote == remote)
            })
    }

    pub fn pushed(&self, remote: &str, ckpt_id: u64) -> Option<Pushed> {
        self.state.lock().pushed.get(remote)?.get(&ckpt_id).cloned()
    }

    /// The push id of an unfinished push of `ckpt_id` to `remote`.
    pub fn pending(&self, remote: &str, ckpt_id: u64) -> Option<String> {
        self.state
            .lock()
            .pending
            .get(remote)?
            .get(&ckpt_id)
            .cloned()
    }

    pub fn record_pushed(
        &self,
        remote: &str,
        ckpt_id: u64,
        key: &str,
        push_id: &str,
    ) -> Result<()> {
        let mut st = self.state.lock();
        st.pushed.entry(remote.to_string()).or_default().insert(
            ckpt_id,
            Pushed {
                key: key.to_string(),
                push_id: push_id.to_string(),
            },
        );
        if let Some(p) = st.pending.get_mut(remote) {
            p.remove(&ckpt_id);
        }
        self.save(&st)
    }

    /// Forgets pushed records naming `key` (the remote checkpoint was deleted).
    pub fn forget_manifest(&self, remote: &str, key: &str) -> Result<()> {
        let mut st = self.state.lock();
        if let Some(p) = st.pushed.get_mut(remote) {
            p.retain(|_, p| p.key != key);
        }
        self.save(&st)
    }

    /// The push id for pushing checkpoint `ckpt_id` to `remote`: the interrupted push's, so
    /// its packs are found again (`true`), or a new one (`false`).
    pub fn push_id(&self, remote: &str, ckpt_id: u64) -> Result<(String, bool)> {
        let mut st = self.state.lock();
        if let Some(id) = st.pending.get(remote).and_then(|p| p.get(&ckpt_id)) {
            return Ok((id.clone(), true));
        }
        let id = new_id();
        st.pending
            .entry(remote.to_string())
            .or_default()
            .insert(ckpt_id, id.clone());
        self.save(&st)?;
        Ok((id, false))
    }

    /// Why `vol` may not be written now, if it is being restored eagerly (the checkpoint
    /// taken at the end must equal the remote one).
    pub fn write_blocked(&self, vol: &str) -> Option<String> {
        if let Some(r) = self.state.lock().restoring.get(vol).filter(|r| r.eager) {
            return Some(format!(
                "volume {vol} is being restored from {}; wait for the restore to finish (or restore with --lazy)",
                r.source
            ));
        }
        self.creating.lock().contains(vol).then(|| {
            format!("volume {vol} is being created from a remote; try again when that ends")
        })
    }

    /// Adds to one of a remote's counters (0 fetched bytes, 1 failed fetches, 2 uploaded
    /// bytes).
    pub fn count(&self, remote: &str, which: usize, n: u64) {
        if let Some(c) = self
            .counters
            .lock()
            .entry(remote.to_string())
            .or_default()
            .get_mut(which)
        {
            *c += n;
        }
    }

    pub fn restoring(&self) -> BTreeMap<String, Restoring> {
        self.state.lock().restoring.clone()
    }

    pub fn set_restoring(&self, vol: &str, r: Option<Restoring>) -> Result<()> {
        let mut st = self.state.lock();
        match r {
            Some(r) => st.restoring.insert(vol.to_string(), r),
            None => st.restoring.remove(vol),
        };
        self.save(&st)
    }

    /// The engine descriptor of pack `key` in `remote`.
    pub fn pack_desc(remote: &str, key: &str) -> Vec<u8> {
        serde_json::to_vec(&PackDesc {
            remote: remote.to_string(),
            key: key.to_string(),
        })
        .unwrap_or_default()
    }

    /// The (remote, key) an engine pack descriptor names.
    pub fn parse_desc(desc: &[u8]) -> Option<(String, String)> {
        serde_json::from_slice::<PackDesc>(desc)
            .ok()
            .map(|d| (d.remote, d.key))
    }
}

/// Reads a small object (a manifest or a lease) whole; `None` when it does not exist. An
/// object over [`push::MAX_MANIFEST`] is refused before its body is read: whoever can write
/// the bucket must not make the daemon allocate whatever they like.
pub async fn get_small(c: &Arc<dyn ObjectStore>, p: &ObjPath) -> Result<Option<Vec<u8>>> {
    match c.get(p).await {
        Ok(g) if g.meta.size > push::MAX_MANIFEST => bail!(
            "{p} is {} bytes, over the {}-byte limit",
            g.meta.size,
            push::MAX_MANIFEST
        ),
        Ok(g) => Ok(Some(
            g.bytes()
                .await
                .map_err(|e| anyhow!("reading {p}: {}", clean(&e)))?
                .to_vec(),
        )),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => bail!("reading {p}: {}", clean(&e)),
    }
}

/// A fresh random id (push ids): 16 hex digits from the OS's random source.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An object-store error as a one-line message (object_store's messages name the URL and
/// the status; they never carry credentials).
pub fn clean(e: &object_store::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        let m = x.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = x.source();
    }
    s.replace('\n', " ")
}

/// The engine's view of remote packs: fetches byte ranges through the configured clients.
#[derive(Debug)]
pub struct PackFetcher(pub Arc<Remotes>);

impl strata_engine::RemoteFetcher for PackFetcher {
    fn fetch(&self, pack: &[u8], offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let (remote, k) = Remotes::parse_desc(pack)
            .ok_or_else(|| "unreadable remote pack descriptor".to_string())?;
        let (cfg, client) = self.0.client(&remote).map_err(|e| format!("{e:#}"))?;
        let path = key(&cfg, &k);
        let shown = format!("remote {remote:?} object {k}");
        let r = self
            .0
            .run(async move { client.get_range(&path, offset..offset + len).await })
            .map_err(|e| format!("{e:#}"))?;
        match r {
            Ok(b) => {
                self.0.count(&remote, 0, b.len() as u64);
                Ok(b.to_vec())
            }
            Err(e) => {
                self.0.count(&remote, 1, 1);
                match e {
                    object_store::Error::NotFound { .. } => Err(format!("{shown} is missing")),
                    e => Err(format!("{shown}: {}", clean(&e))),
                }
            }
        }
    }
}
