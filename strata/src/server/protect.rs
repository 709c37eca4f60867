//! Protection policies (docs/design/protection.md): the daemon checkpoints a volume on a
//! schedule, pushes the checkpoint incrementally to a remote, and keeps the remote's
//! protection checkpoints to a retention rule. One round per volume at a time, back-off
//! while the remote fails; policies and the last protected checkpoint of each volume live in
//! `STORE/protection.json` and survive restarts.

use super::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use remote::gc::{protect_ms, PROTECT_PREFIX};
const FILE: &str = "protection.json";
/// The longest the scheduler sleeps (it wakes when the next round is due).
const TICK: Duration = Duration::from_millis(100);
/// Rounds running at once, over all volumes (each is a checkpoint and an upload).
const PARALLEL: usize = 2;
/// The longest back-off after failures (unless the interval is longer).
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct Policy {
    pub remote: String,
    pub every_secs: u64,
    /// Keep this many newest protection checkpoints in the remote.
    pub keep: Option<u32>,
    /// Keep protection checkpoints younger than this in the remote.
    pub keep_for_secs: Option<u64>,
}

/// The newest checkpoint a round pushed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Protected {
    pub checkpoint: String,
    pub at_unix_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    policy: Policy,
    last: Option<Protected>,
    /// Set when a round found that another store took the volume over (a failover): no
    /// more rounds, exports stopped and refused, until `unprotect` or delete.
    #[serde(default)]
    fenced: Option<remote::Owner>,
}

/// A round's finding that another store owns the volume in the remote.
#[derive(Debug)]
struct Fenced(remote::Owner);

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fenced: store {} took this volume over in the remote (generation {}, at unix time {}); \
             this copy is no longer protected and is not exported again. \
             `strata volume unprotect` keeps it as a local volume; `strata volume delete` drops it",
            self.0.store, self.0.generation, self.0.since_unix
        )
    }
}

impl std::error::Error for Fenced {}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileState {
    volumes: BTreeMap<String, Record>,
}

/// What the daemon knows of one protected volume since it started.
#[derive(Debug)]
struct Run {
    next_at: Instant,
    running: bool,
    pushes: u64,
    /// Consecutive failed rounds (the back-off's exponent).
    failures: u32,
    failures_total: u64,
    last_error: Option<String>,
    last_round_secs: Option<f64>,
    /// Retention's last failure (a round that pushed still counts as protected).
    retention_error: Option<String>,
}

impl Run {
    fn new() -> Run {
        Run {
            next_at: Instant::now(),
            running: false,
            pushes: 0,
            failures: 0,
            failures_total: 0,
            last_error: None,
            last_round_secs: None,
            retention_error: None,
        }
    }
}

pub(super) struct Protection {
    dir: PathBuf,
    state: Mutex<(FileState, HashMap<String, Run>)>,
    stop: std::sync::atomic::AtomicBool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Protection {
    /// Loads the policies of `dir/protection.json` (none when it does not exist).
    pub(super) fn open(dir: &Path) -> Result<Protection> {
        let path = dir.join(FILE);
        let st: FileState = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileState::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let runs = st.volumes.keys().map(|v| (v.clone(), Run::new())).collect();
        Ok(Protection {
            dir: dir.to_path_buf(),
            state: Mutex::new((st, runs)),
            stop: Default::default(),
        })
    }

    fn save(&self, st: &FileState) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(st).context("encoding the protection state")?;
        crate::state::write_atomic(&self.dir, FILE, &bytes)
            .with_context(|| format!("writing {}", self.dir.join(FILE).display()))
    }

    /// Sets (or replaces) `vol`'s policy; its first round starts at once.
    pub(super) fn set(&self, vol: &str, policy: Policy) -> Result<()> {
        let mut g = self.state.lock();
        let (st, runs) = &mut *g;
        let last = st.volumes.get(vol).and_then(|r| r.last.clone());
        let old = st.volumes.insert(
            vol.to_string(),
            Record {
                policy,
                last,
                fenced: None,
            },
        );
        if let Err(e) = self.save(st) {
            match old {
                Some(r) => st.volumes.insert(vol.to_string(), r),
                None => st.volumes.remove(vol),
            };
            return Err(e);
        }
        runs.entry(vol.to_string()).or_insert_with(Run::new).next_at = Instant::now();
        Ok(())
    }

    /// Drops `vol`'s policy (a round already running ends on its own). False if it had none.
    pub(super) fn unset(&self, vol: &str) -> Result<bool> {
        let mut g = self.state.lock();
        let (st, runs) = &mut *g;
        let Some(old) = st.volumes.remove(vol) else {
            return Ok(false);
        };
        if let Err(e) = self.save(st) {
            st.volumes.insert(vol.to_string(), old);
            return Err(e);
        }
        runs.remove(vol);
        Ok(true)
    }

    /// The store that took `vol` over, when a round found it fenced.
    pub(super) fn fenced(&self, vol: &str) -> Option<remote::Owner> {
        self.state.lock().0.volumes.get(vol)?.fenced.clone()
    }

    /// `vol`'s policy and state for `volume info`; `None` if it is not protected.
    pub(super) fn view(&self, a: &App, vol: &str) -> Option<Value> {
        let (rec, run) = {
            let g = self.state.lock();
            let rec = g.0.volumes.get(vol)?.clone();
            let run = g.1.get(vol).map(|r| {
                json!({"running": r.running, "pushes": r.pushes, "failures": r.failures,
                       "failures_total": r.failures_total, "last_error": r.last_error,
                       "last_round_secs": r.last_round_secs,
                       "retention_error": r.retention_error})
            });
            (rec, run)
        };
        let now = now_ms();
        // What the newest protected checkpoint lacks: the live volume's changes since.
        let behind = rec.last.as_ref().and_then(|l| {
            a.store
                .diff(MapRef::Checkpoint(vol, &l.checkpoint), MapRef::Live(vol))
                .ok()
                .map(|r| r.iter().map(|r| r.len).sum::<u64>())
        });
        let mut v = json!({
            "remote": rec.policy.remote,
            "every_secs": rec.policy.every_secs,
            "keep": rec.policy.keep,
            "keep_for_secs": rec.policy.keep_for_secs,
            "last_checkpoint": rec.last.as_ref().map(|l| &l.checkpoint),
            "last_protected_unix_ms": rec.last.as_ref().map(|l| l.at_unix_ms),
            "rpo_secs": rec.last.as_ref().map(|l| now.saturating_sub(l.at_unix_ms) as f64 / 1000.0),
            "bytes_behind": behind,
            "fenced": rec.fenced,
        });
        if let (Some(Value::Object(r)), Value::Object(m)) = (run, &mut v) {
            m.extend(r);
        }
        Some(v)
    }

    /// Prometheus lines for every protected volume.
    pub(super) fn metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let g = self.state.lock();
        let now = now_ms();
        let _ = writeln!(out, "# TYPE strata_protect_rpo_seconds gauge\n# TYPE strata_protect_pushes_total counter\n# TYPE strata_protect_failures_total counter\n# TYPE strata_protect_failing gauge");
        for (v, rec) in &g.0.volumes {
            if let Some(l) = &rec.last {
                let age = now.saturating_sub(l.at_unix_ms) as f64 / 1000.0;
                let _ = writeln!(out, "strata_protect_rpo_seconds{{volume=\"{v}\"}} {age}");
            }
            if let Some(r) = g.1.get(v) {
                let _ = writeln!(
                    out,
                    "strata_protect_pushes_total{{volume=\"{v}\"}} {}",
                    r.pushes
                );
                let _ = writeln!(
                    out,
                    "strata_protect_failures_total{{volume=\"{v}\"}} {}",
                    r.failures_total
                );
                let _ = writeln!(
                    out,
                    "strata_protect_failing{{volume=\"{v}\"}} {}",
                    u8::from(r.failures > 0)
                );
            }
        }
    }

    /// Stops starting rounds (daemon shutdown).
    pub(super) fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts the scheduler: every [`TICK`], each due volume without a running round gets one,
/// at most [`PARALLEL`] at once.
pub(super) fn start(app: &Arc<App>) -> Result<()> {
    let app = app.clone();
    std::thread::Builder::new()
        .name("protect".into())
        .spawn(move || {
            while !app.protection.stop.load(Ordering::Relaxed) {
                for vol in due(&app.protection) {
                    let a = app.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("protect-{vol}"))
                        .spawn(move || round(&a, &vol));
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "starting a protection round");
                    }
                }
                // Until the next round is due (a round starts on time: the interval
                // bounds how far protection lags), at most a tick.
                let now = Instant::now();
                let wait = next_due(&app.protection)
                    .map_or(TICK, |t| t.saturating_duration_since(now))
                    .clamp(Duration::from_millis(1), TICK);
                std::thread::sleep(wait);
            }
        })
        .context("starting the protection scheduler")?;
    Ok(())
}

/// When the earliest idle volume's next round is due.
fn next_due(p: &Protection) -> Option<Instant> {
    let g = p.state.lock();
    g.0.volumes
        .iter()
        .filter(|(_, rec)| rec.fenced.is_none())
        .filter_map(|(v, _)| g.1.get(v))
        .filter(|r| !r.running)
        .map(|r| r.next_at)
        .min()
}

/// Volumes whose round is due, marked running.
fn due(p: &Protection) -> Vec<String> {
    let mut g = p.state.lock();
    let (st, runs) = &mut *g;
    let mut busy = runs.values().filter(|r| r.running).count();
    let now = Instant::now();
    let mut out = Vec::new();
    for (v, rec) in &st.volumes {
        if rec.fenced.is_some() {
            continue;
        }
        let r = runs.entry(v.clone()).or_insert_with(Run::new);
        if busy < PARALLEL && !r.running && r.next_at <= now {
            r.running = true;
            busy += 1;
            out.push(v.clone());
        }
    }
    out
}

/// One round for `vol`: checkpoint, push, record, retention; the next round's time.
fn round(a: &App, vol: &str) {
    let started = Instant::now();
    let policy = match a.protection.state.lock().0.volumes.get(vol) {
        Some(r) => r.policy.clone(),
        None => return,
    };
    let r = protect_once(a, vol, &policy);
    let mut g = a.protection.state.lock();
    let (st, runs) = &mut *g;
    let Some(run) = runs.get_mut(vol) else {
        return; // unprotected meanwhile
    };
    run.running = false;
    run.last_round_secs = Some(started.elapsed().as_secs_f64());
    let every = Duration::from_secs(policy.every_secs.max(1));
    match r {
        Ok((last, retention)) => {
            run.pushes += 1;
            run.failures = 0;
            run.last_error = None;
            run.retention_error = retention;
            run.next_at = started + every;
            if let Some(rec) = st.volumes.get_mut(vol) {
                rec.last = Some(last);
                if let Err(e) = a.protection.save(st) {
                    tracing::warn!(volume = vol, error = %format!("{e:#}"), "recording the protected checkpoint");
                }
            }
        }
        Err(e) if e.downcast_ref::<Fenced>().is_some() => {
            let msg = format!("{e:#}");
            tracing::error!(volume = vol, error = %msg, "protection fenced; stopping the volume's exports");
            run.failures += 1;
            run.failures_total += 1;
            run.last_error = Some(msg);
            if let (Some(rec), Some(f)) = (st.volumes.get_mut(vol), e.downcast_ref::<Fenced>()) {
                rec.fenced = Some(f.0.clone());
                if let Err(e) = a.protection.save(st) {
                    tracing::warn!(volume = vol, error = %format!("{e:#}"), "recording the fence");
                }
            }
            drop(g);
            stop_exports_of(a, vol);
        }
        Err(e) => {
            run.failures += 1;
            run.failures_total += 1;
            let msg = format!("{e:#}");
            tracing::warn!(volume = vol, failures = run.failures, error = %msg, "protection round failed");
            run.last_error = Some(msg);
            let backoff = every
                .saturating_mul(1 << run.failures.min(10))
                .min(MAX_BACKOFF.max(every));
            run.next_at = Instant::now() + backoff;
        }
    }
}

/// Checkpoints and pushes `vol`; returns what was protected and retention's error, if any.
fn protect_once(a: &App, vol: &str, policy: &Policy) -> Result<(Protected, Option<String>)> {
    if let Some(why) = a.remotes.write_blocked(vol) {
        bail!("{why}");
    }
    // Only the owner pushes: a failover elsewhere took the volume over (see Fenced).
    let me = a.remotes.store_id()?;
    match a.remotes.owner(&policy.remote, vol)? {
        Some(o) if o.store != me => return Err(Fenced(o).into()),
        Some(_) => {}
        None => {
            a.remotes.take_ownership(&policy.remote, vol)?;
        }
    }
    let at = now_ms();
    let name = format!("{PROTECT_PREFIX}{at}");
    take_checkpoint(a, vol, &name).map_err(|e| anyhow::anyhow!("checkpoint: {}", e.1))?;
    let pushed = a
        .store
        .open_checkpoint(vol, &name)
        .map_err(anyhow::Error::from)
        .and_then(|snap| {
            // The push yields the CPU to the guests: it reads a frozen checkpoint and holds
            // no lock a guest's request waits for beyond a batch read's reuse guard.
            in_background(&format!("push-{vol}"), || {
                remote::push::push(
                    &a.remotes,
                    &a.store,
                    &crate::jobs::Job::default(),
                    snap,
                    &policy.remote,
                )
            })
        });
    if let Err(e) = pushed {
        // The next round takes a new one; this one is not kept.
        let _ = a.store.delete_checkpoint(vol, &name);
        return Err(e.context(format!("pushing {vol}@{name} to {}", policy.remote)));
    }
    // Locally only the newest is kept: it is the next push's base.
    for e in a.store.checkpoint_entries(vol)? {
        if protect_ms(&e.name).is_some_and(|ms| ms < at) {
            let _ = a.store.delete_checkpoint(vol, &e.name);
        }
    }
    let retention = retain(a, vol, policy, at).err().map(|e| format!("{e:#}"));
    Ok((
        Protected {
            checkpoint: name,
            at_unix_ms: at,
        },
        retention,
    ))
}

/// The nice value a push runs at: the lowest, so that the scheduler hands a guest's
/// request thread (FUSE, vhost-user) a CPU the push is using as soon as it wakes, while a
/// host whose CPUs the guests keep busy still gives the push a share (unlike `SCHED_IDLE`)
/// and protection progresses.
const BACKGROUND_NICE: libc::c_int = 19;

/// Runs `f` on a thread of its own at [`BACKGROUND_NICE`] and waits for it. A thread of its
/// own because an unprivileged daemon cannot raise a thread's priority back: the round's
/// other steps (the checkpoint, the deletions), which hold engine locks guests' requests
/// wait for, keep the normal priority.
fn in_background<T: Send>(what: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name(what.chars().take(15).collect())
            .spawn_scoped(s, || {
                // SAFETY: a plain syscall on the calling thread (`PRIO_PROCESS` with a
                // thread id sets that thread's nice value on Linux); no memory is passed.
                let r = unsafe {
                    libc::setpriority(
                        libc::PRIO_PROCESS,
                        libc::gettid() as libc::id_t,
                        BACKGROUND_NICE,
                    )
                };
                if r != 0 {
                    tracing::debug!(error = %std::io::Error::last_os_error(), "lowering a push's priority");
                }
                f()
            })
            .context("starting a push thread")?;
        h.join()
            .map_err(|_| anyhow::anyhow!("the push thread panicked"))?
    })
}

/// Deletes the remote's protection checkpoints of `vol` the policy no longer keeps: past
/// the `keep` newest, or older than `keep_for`; never the newest (taken at `newest_ms`).
fn retain(a: &App, vol: &str, policy: &Policy, newest_ms: u64) -> Result<()> {
    if policy.keep.is_none() && policy.keep_for_secs.is_none() {
        return Ok(());
    }
    let held = remote::gc::protection_checkpoints(&a.remotes, &policy.remote, vol)?;
    for (i, (ms, name)) in held.iter().enumerate() {
        if *ms >= newest_ms {
            continue;
        }
        let beyond = policy.keep.is_some_and(|k| i >= k as usize);
        let expired = policy
            .keep_for_secs
            .is_some_and(|s| newest_ms.saturating_sub(*ms) > s.saturating_mul(1000));
        if beyond || expired {
            remote::gc::delete_checkpoint(&a.remotes, &policy.remote, vol, name)?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProtectReq {
    remote: Option<String>,
    every_secs: u64,
    keep: Option<u32>,
    keep_for_secs: Option<u64>,
}

pub(super) async fn protect_volume(
    State(app): State<Arc<App>>,
    UrlPath(vol): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: ProtectReq = parse(&body)?;
    let v = blocking(&app, move |a| {
        a.store.volume_info(&vol)?;
        if req.every_secs == 0 {
            return Err(bad("the interval must be at least 1s"));
        }
        if req.keep == Some(0) {
            return Err(bad("--keep must be at least 1 (the newest is always kept)"));
        }
        if req.keep_for_secs == Some(0) {
            return Err(bad("--keep-for must be more than 0s"));
        }
        let remote = a.remotes.default_remote(req.remote.as_deref())?;
        a.remotes.config(&remote)?;
        a.protection.set(
            &vol,
            Policy {
                remote,
                every_secs: req.every_secs,
                keep: req.keep,
                keep_for_secs: req.keep_for_secs,
            },
        )?;
        Ok(a.protection.view(a, &vol))
    })
    .await?;
    Ok(Json(v.unwrap_or(Value::Null)))
}

pub(super) async fn unprotect_volume(
    State(app): State<Arc<App>>,
    UrlPath(vol): UrlPath<String>,
) -> ApiResult {
    let v = blocking(&app, move |a| {
        if !a.protection.unset(&vol)? {
            a.store.volume_info(&vol)?;
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("volume {vol} is not protected"),
            ));
        }
        Ok(json!({"unprotected": vol}))
    })
    .await?;
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_carry_their_time() {
        assert_eq!(protect_ms("protect-1765000000123"), Some(1765000000123));
        assert_eq!(protect_ms("protect-x"), None);
        assert_eq!(protect_ms("golden"), None);
    }
}
