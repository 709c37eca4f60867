//! Store-wide status: scrub, the metadata check, stats and the Prometheus metrics.

use super::*;

pub(super) async fn scrub(State(app): State<Arc<App>>) -> ApiResult {
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

pub(super) async fn check(State(app): State<Arc<App>>) -> ApiResult {
    let r = blocking(&app, |a| Ok(a.store.check()?)).await?;
    let counts: Vec<Value> = r
        .count_mismatches
        .iter()
        .map(|m| json!({"segment": m.segment, "page": m.page, "pages": m.pages, "counted": m.counted, "committed": m.committed}))
        .collect();
    Ok(Json(json!({
        "layers": r.layers, "extents": r.extents, "dirty_chunks": r.dirty_chunks, "clean": r.is_clean(),
        "map_mismatches": r.map_mismatches, "count_mismatches": counts,
    })))
}

pub(super) async fn stats(State(app): State<Arc<App>>) -> ApiResult {
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

pub(super) async fn metrics(State(app): State<Arc<App>>) -> Response {
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

pub(super) fn render_metrics(app: &App) -> String {
    use std::fmt::Write;
    use strata_engine::qos::{LATENCY_BUCKETS_US, OPS};
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
    let (rate, backoffs) = app.remotes.push.status();
    let _ = writeln!(
        out,
        "# TYPE strata_push_rate_bytes gauge\nstrata_push_rate_bytes {rate}\n# TYPE strata_push_backoffs_total counter\nstrata_push_backoffs_total {backoffs}"
    );
    let sharing = app.store.remote_sharing();
    let _ = writeln!(
        out,
        "# TYPE strata_remote_shared_bytes_total counter\nstrata_remote_shared_bytes_total {}\n# TYPE strata_remote_kept_copies gauge\nstrata_remote_kept_copies {}",
        sharing.shared_bytes, sharing.copies
    );
    app.protection.metrics(&mut out);
    // Only volumes being restored: counting remote blocks walks the map.
    let _ = writeln!(out, "# TYPE strata_volume_remote_bytes gauge");
    for v in app.remotes.restoring().keys() {
        if let Ok(info) = app.store.volume_info(v) {
            let n = app.store.remote_blocks(v).unwrap_or(0) * u64::from(info.block_size);
            let _ = writeln!(out, "strata_volume_remote_bytes{{volume=\"{v}\"}} {n}");
        }
    }
    let _ = writeln!(out, "# TYPE strata_io_ops_total counter\n# TYPE strata_io_bytes_total counter\n# TYPE strata_io_errors_total counter\n# TYPE strata_io_latency_seconds histogram");
    let exported: Vec<(String, std::sync::Arc<strata_engine::qos::VolumeIo>)> = app
        .exports
        .lock()
        .iter()
        .filter_map(|(vol, e)| match e {
            Exported::Vhost { export, .. } => Some((vol.clone(), export.io.clone())),
            Exported::Fuse { export, .. } => Some((vol.clone(), export.io().clone())),
            Exported::Tree { .. } => None,
        })
        .collect();
    let _ = writeln!(out, "# TYPE strata_volume_throttled_seconds_total counter\n# TYPE strata_volume_throttled_requests_total counter");
    for (vol, io) in &exported {
        for (d, name) in [
            (strata_engine::qos::Dir::Read, "read"),
            (strata_engine::qos::Dir::Write, "write"),
        ] {
            let (secs, n) = io.qos.throttled(d);
            let _ = writeln!(
                out,
                "strata_volume_throttled_seconds_total{{volume=\"{vol}\",dir=\"{name}\"}} {secs}\nstrata_volume_throttled_requests_total{{volume=\"{vol}\",dir=\"{name}\"}} {n}"
            );
        }
    }
    let _ = writeln!(out, "# TYPE strata_volume_quota_bytes gauge\n# TYPE strata_volume_quota_refused_writes_total counter");
    for (vol, io) in &exported {
        let _ = writeln!(
            out,
            "strata_volume_quota_bytes{{volume=\"{vol}\"}} {}\nstrata_volume_quota_refused_writes_total{{volume=\"{vol}\"}} {}",
            io.quota.bytes(),
            io.quota.refused()
        );
    }
    for (vol, io) in &exported {
        let st = &io.stats;
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
