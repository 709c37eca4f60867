//! Container images built by the tests and benches: GNU tar layers (gzip, zstd or plain)
//! and an OCI image layout written by hand.

#![allow(clippy::unwrap_used)] // Test scaffolding: a failure is a failed test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum is needed");
    let s = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", s.split_whitespace().next().unwrap())
}

/// Writes `bytes` as a blob of the layout; returns its digest and size.
pub fn blob(layout: &Path, file: &Path) -> (String, u64) {
    let d = sha256(file);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(file, dir.join(d.trim_start_matches("sha256:"))).unwrap();
    (d, fs::metadata(file).unwrap().len())
}

/// A layer: the tar of `stage` (numeric owners, xattrs), compressed with `compress`
/// ("gzip", "zstd" or "" for none). Returns (blob file, diff ID).
pub fn layer(work: &Path, stage: &Path, name: &str, compress: &str) -> (PathBuf, String) {
    let tar = work.join(format!("{name}.tar"));
    sh(&format!(
        "tar --xattrs --xattrs-include='*' --numeric-owner --sort=name -C {} -cf {} .",
        p(stage),
        p(&tar)
    ));
    let diff = sha256(&tar);
    let out = match compress {
        "gzip" => {
            sh(&format!("gzip -n -k -f {}", p(&tar)));
            work.join(format!("{name}.tar.gz"))
        }
        "zstd" => {
            sh(&format!("zstd -q -f {} -o {}.zst", p(&tar), p(&tar)));
            work.join(format!("{name}.tar.zst"))
        }
        _ => tar,
    };
    (out, diff)
}

/// An OCI image layout at `layout` with these layers (blob file, diff ID, media type).
pub fn image(layout: &Path, layers: &[(PathBuf, String, &str)], name: &str) {
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.1.as_str()).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cfg_file = layout.join("config.tmp");
    fs::write(&cfg_file, config.to_string()).unwrap();
    let (cfg_digest, cfg_size) = blob(layout, &cfg_file);
    fs::remove_file(&cfg_file).unwrap();
    let mut descs = Vec::new();
    for (file, _, media) in layers {
        let (d, size) = blob(layout, file);
        descs.push(serde_json::json!({"mediaType": media, "digest": d, "size": size}));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": descs,
    });
    let m_file = layout.join("manifest.tmp");
    fs::write(&m_file, manifest.to_string()).unwrap();
    let (m_digest, m_size) = blob(layout, &m_file);
    fs::remove_file(&m_file).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m_digest, "size": m_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": name,
                            "io.containerd.image.name": name}}],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
}
