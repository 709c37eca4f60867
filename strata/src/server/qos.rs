//! Per-volume IO limits and quotas (`strata volume set VOL --iops-limit … --quota …`, or at
//! `volume create`): kept in `STORE/qos.json`, applied to the engine's per-volume token
//! buckets and quota (`strata_engine::qos`) that both frontends hold requests to.
//! docs/design/qos.md.

use super::*;
use strata_engine::qos::{Dir, QosLimits};

const FILE: &str = "qos.json";
/// Smallest limits accepted: below them one large request would wait for minutes, and an
/// export's stop with it.
const MIN_IOPS: u64 = 10;
const MIN_BPS: u64 = 1 << 20;
const MAX_BURST_MS: u64 = 60_000;
/// Smallest quota accepted (a filesystem's metadata alone takes more).
const MIN_QUOTA: u64 = 1 << 20;

/// What `PUT /v1/volumes/{name}/qos` takes and `volume info` shows: 0 removes a limit, an
/// absent field keeps the current one.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
    /// Allocated bytes the volume may map ([`strata_engine::qos::Quota`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
}

impl Limits {
    fn of(l: &QosLimits, quota: u64) -> Limits {
        let some = |v: u64| (v != 0).then_some(v);
        Limits {
            read_iops: some(l.read_iops),
            write_iops: some(l.write_iops),
            read_bps: some(l.read_bps),
            write_bps: some(l.write_bps),
            burst_ms: some(l.burst_ms),
            quota: some(quota),
        }
    }

    /// `self` applied over `base`.
    fn over(&self, base: &QosLimits) -> QosLimits {
        QosLimits {
            read_iops: self.read_iops.unwrap_or(base.read_iops),
            write_iops: self.write_iops.unwrap_or(base.write_iops),
            read_bps: self.read_bps.unwrap_or(base.read_bps),
            write_bps: self.write_bps.unwrap_or(base.write_bps),
            burst_ms: self.burst_ms.unwrap_or(base.burst_ms),
        }
    }
}

fn check_quota(quota: u64) -> Result<(), ApiError> {
    if quota != 0 && quota < MIN_QUOTA {
        return Err(bad(
            "a quota must be at least 1M (bytes), or 0 to remove it",
        ));
    }
    Ok(())
}

fn check(l: &QosLimits) -> Result<(), ApiError> {
    for (what, v) in [("read IOPS", l.read_iops), ("write IOPS", l.write_iops)] {
        if v != 0 && v < MIN_IOPS {
            return Err(bad(format!(
                "a {what} limit must be at least {MIN_IOPS} (or 0 to remove it)"
            )));
        }
    }
    for (what, v) in [("read", l.read_bps), ("write", l.write_bps)] {
        if v != 0 && v < MIN_BPS {
            return Err(bad(format!(
                "a {what} bandwidth limit must be at least 1M (bytes per second), or 0 to remove it"
            )));
        }
    }
    if l.burst_ms > MAX_BURST_MS {
        return Err(bad("the burst must be at most 60s"));
    }
    Ok(())
}

/// Checks limits asked for at create time, before anything is created.
pub(super) fn validate(req: &Limits) -> Result<(), ApiError> {
    check(&req.over(&QosLimits::default()))?;
    check_quota(req.quota.unwrap_or(0))
}

/// The limits of every volume that has any, persisted.
#[derive(Debug)]
pub(super) struct QosTable {
    dir: PathBuf,
    limits: Mutex<BTreeMap<String, Limits>>,
}

impl QosTable {
    /// Loads `dir/qos.json` (empty when absent).
    pub(super) fn open(dir: &Path) -> anyhow::Result<QosTable> {
        use anyhow::Context;
        let path = dir.join(FILE);
        let limits = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(QosTable {
            dir: dir.to_path_buf(),
            limits: Mutex::new(limits),
        })
    }

    /// Sets every kept limit on its volume (at daemon start); a volume gone meanwhile is
    /// dropped from the table.
    pub(super) fn apply_all(&self, store: &Store) {
        let mut t = self.limits.lock();
        t.retain(|vol, l| match store.volume_io(vol) {
            Ok(io) => {
                io.qos.set(l.over(&QosLimits::default()));
                io.quota.set(l.quota.unwrap_or(0));
                true
            }
            Err(_) => false,
        });
    }

    fn save(&self, t: &BTreeMap<String, Limits>) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec_pretty(t).map_err(|e| internal(e.to_string()))?;
        crate::state::write_atomic(&self.dir, FILE, &bytes)
            .map_err(|e| internal(format!("writing {}: {e:#}", self.dir.join(FILE).display())))
    }

    /// Changes `vol`'s limits by `req` (absent fields kept, 0 removes).
    pub(super) fn set(&self, store: &Store, vol: &str, req: &Limits) -> Result<(), ApiError> {
        let io = store.volume_io(vol)?;
        let new = req.over(&io.qos.limits());
        let quota = req.quota.unwrap_or(io.quota.bytes());
        check(&new)?;
        check_quota(quota)?;
        let mut t = self.limits.lock();
        let old = t.get(vol).copied();
        if new.is_unlimited() && new.burst_ms == 0 && quota == 0 {
            t.remove(vol);
        } else {
            t.insert(vol.to_string(), Limits::of(&new, quota));
        }
        if let Err(e) = self.save(&t) {
            match old {
                Some(o) => t.insert(vol.to_string(), o),
                None => t.remove(vol),
            };
            return Err(e);
        }
        io.qos.set(new);
        io.quota.set(quota);
        Ok(())
    }

    /// Forgets a deleted volume's limits.
    pub(super) fn unset(&self, vol: &str) -> Result<(), ApiError> {
        let mut t = self.limits.lock();
        if t.remove(vol).is_some() {
            self.save(&t)?;
        }
        Ok(())
    }
}

fn internal(msg: String) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, msg)
}

/// `volume info`'s `qos`: the limits, how long requests were held back, the quota and the
/// writes it refused.
pub(super) fn view(store: &Store, vol: &str) -> Option<Value> {
    let io = store.volume_io(vol).ok()?;
    let l = io.qos.limits();
    let (rs, rn) = io.qos.throttled(Dir::Read);
    let (ws, wn) = io.qos.throttled(Dir::Write);
    let (quota, refused) = (io.quota.bytes(), io.quota.refused());
    if l.is_unlimited() && rn == 0 && wn == 0 && quota == 0 && refused == 0 {
        return None;
    }
    Some(json!({
        "quota_bytes": quota, "quota_refused_writes": refused,
        "read_iops": l.read_iops, "write_iops": l.write_iops,
        "read_bps": l.read_bps, "write_bps": l.write_bps,
        "burst_ms": if l.burst_ms == 0 { QosLimits::DEFAULT_BURST_MS } else { l.burst_ms },
        "throttled_read_secs": rs, "throttled_read_requests": rn,
        "throttled_write_secs": ws, "throttled_write_requests": wn,
    }))
}

pub(super) async fn set_qos(
    State(app): State<Arc<App>>,
    UrlPath(vol): UrlPath<String>,
    body: Bytes,
) -> ApiResult {
    let req: Limits = parse(&body)?;
    let v = blocking(&app, move |a| {
        a.qos.set(&a.store, &vol, &req)?;
        Ok(view(&a.store, &vol).unwrap_or(Value::Null))
    })
    .await?;
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_changes_keep_the_other_limits_and_zero_removes() {
        let base = QosLimits {
            read_iops: 100,
            write_bps: 8 << 20,
            ..Default::default()
        };
        let req = Limits {
            write_iops: Some(50),
            read_iops: Some(0),
            ..Default::default()
        };
        let l = req.over(&base);
        assert_eq!((l.read_iops, l.write_iops, l.write_bps), (0, 50, 8 << 20));
        assert_eq!(Limits::of(&l, 0).over(&QosLimits::default()), l);
        assert!(check_quota(4096).is_err());
        assert!(check_quota(0).is_ok() && check_quota(1 << 30).is_ok());
        assert!(check(&QosLimits {
            write_iops: 5,
            ..Default::default()
        })
        .is_err());
        assert!(check(&QosLimits {
            read_bps: 1000,
            ..Default::default()
        })
        .is_err());
        assert!(check(&l).is_ok());
    }
}
