#![allow(clippy::unwrap_used)]
//! Scenario: the CLI contract against a running daemon. Bad input (unknown volumes, bad
//! names and sizes, missing files, malformed API requests) gets one clear line, a non-zero
//! exit, and changes nothing; the daemon keeps serving. Raw and qcow2 images round-trip
//! through `strata import` and `strata export-image` (checked with `qemu-img compare`); a
//! checkpoint exports its own content after the live volume changed; `checkpoint list` draws
//! the history tree.

mod common;
use common::Daemon;
use std::process::Command;

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    (0..len)
        .map(|i| {
            if (i / 65536) % 3 == 1 {
                return 0; // leave holes so the import has zero chunks
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img must be installed (scripts/setup.sh)");
    assert!(st.success(), "qemu-img {args:?}");
}

#[test]
fn bad_input_is_one_clear_line_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("store"));
    d.ok(&["volume", "create", "vm", "--size", "64M"]);
    d.fails(&["volume", "info", "nope"], "no volume named");
    d.fails(
        &["volume", "create", "a/b", "--size", "1G"],
        "invalid volume name",
    );
    d.fails(&["volume", "create", "x", "--size", "12Q"], "invalid size");
    d.fails(&["volume", "create", "x"], "--size is required");
    d.fails(
        &["volume", "create", "vm", "--size", "1G"],
        "already exists",
    );
    d.fails(&["volume", "resize", "vm", "--size", "1M"], "shrinking");
    d.fails(&["checkpoint", "create", "vm"], "VOLUME@CHECKPOINT");
    d.fails(&["checkpoint", "restore", "vm@nope"], "no checkpoint");
    d.fails(
        &["import", "vm", "/nonexistent/image.raw"],
        "not an existing file",
    );
    d.fails(
        &[
            "export",
            "vhost-user",
            "vm",
            "--socket",
            "/nonexistent-dir/x.sock",
        ],
        "does not exist",
    );
    d.fails(
        &[
            "export",
            "vhost-user",
            "vm",
            "--socket",
            "/tmp/x.sock",
            "--queues",
            "99",
        ],
        "queues",
    );
    // Malformed requests straight to the API get 4xx with a JSON error body.
    for (method, path, body, code) in [
        ("POST", "/v1/volumes", "{bad}", "400"),
        ("POST", "/v1/volumes", r#"{"name":"q","size":"big"}"#, "400"),
        (
            "POST",
            "/v1/volumes",
            r#"{"name":"q","size":1024,"surprise":1}"#,
            "400",
        ),
        ("GET", "/v1/nothing", "", "404"),
        ("DELETE", "/v1/exports/vm", "", "404"),
    ] {
        let out = d.http(method, path, body);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {code}")),
            "{method} {path} {body} -> {out}"
        );
        assert!(out.contains("\"error\""), "{out}");
    }
    // Nothing changed, and the daemon still serves.
    let list = d.ok(&["--json", "volume", "list"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["size"], 64 << 20);
}

#[test]
fn images_round_trip_and_checkpoints_export_their_own_content() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("store"));
    let raw = dir.path().join("in.raw");
    std::fs::write(&raw, pattern(8 << 20)).unwrap();
    d.ok(&["volume", "create", "vm", "--size", "8M"]);
    d.ok(&["import", "vm", raw.to_str().unwrap()]);
    let info: serde_json::Value =
        serde_json::from_str(&d.ok(&["--json", "volume", "info", "vm"])).unwrap();
    assert!(
        info["mapped_bytes"].as_u64().unwrap() < 8 << 20,
        "zero chunks stay unmapped: {info}"
    );
    d.ok(&["checkpoint", "create", "vm@imported"]);

    let out = dir.path().join("out.raw");
    d.ok(&["export-image", "vm", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap(),
        "raw round trip"
    );
    d.fails(
        &["export-image", "vm", out.to_str().unwrap()],
        "already exists",
    );

    // qcow2 in, qcow2 out.
    let qin = dir.path().join("in.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qin.to_str().unwrap(),
    ]);
    d.ok(&["volume", "create", "vq", "--size", "8M"]);
    d.ok(&["import", "vq", qin.to_str().unwrap()]);
    let qout = dir.path().join("out.qcow2");
    d.ok(&[
        "export-image",
        "vq",
        qout.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    qemu_img(&[
        "compare",
        "-q",
        qin.to_str().unwrap(),
        qout.to_str().unwrap(),
    ]);

    // Change the live volume; the checkpoint still exports what was imported.
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![0xeeu8; 1 << 20]).unwrap();
    d.ok(&["import", "vm", other.to_str().unwrap()]);
    let ck = dir.path().join("ck.raw");
    d.ok(&["export-image", "vm@imported", ck.to_str().unwrap()]);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "raw",
        raw.to_str().unwrap(),
        ck.to_str().unwrap(),
    ]);
    let live = dir.path().join("live.raw");
    d.ok(&["export-image", "vm", live.to_str().unwrap()]);
    assert_eq!(
        &std::fs::read(&live).unwrap()[..1 << 20],
        &vec![0xeeu8; 1 << 20][..]
    );

    // An image larger than the volume is refused.
    let big = dir.path().join("big.raw");
    std::fs::write(&big, vec![1u8; 9 << 20]).unwrap();
    d.fails(
        &["import", "vm", big.to_str().unwrap()],
        "larger than volume",
    );

    // The history tree.
    d.ok(&["checkpoint", "create", "vm@second"]);
    d.ok(&["checkpoint", "restore", "vm@imported"]);
    d.ok(&["checkpoint", "create", "vm@branch"]);
    let tree = d.ok(&["checkpoint", "list", "vm"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with("imported "), "{tree}");
    let child = |name: &str| {
        lines.iter().any(|l| {
            l.strip_prefix("├─ ")
                .or_else(|| l.strip_prefix("└─ "))
                .is_some_and(|rest| rest.starts_with(name))
        })
    };
    assert!(
        child("second") && child("branch *"),
        "both descend from imported:\n{tree}"
    );
    let diff = d.ok(&["--json", "checkpoint", "diff", "vm@imported", "vm@second"]);
    assert!(diff.contains("\"offset\": 0"), "{diff}");

    // After imports, checkpoints, a restore: maps and page counts agree with the records.
    let check: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "check"])).unwrap();
    assert_eq!(check["clean"], true, "{check}");
    assert!(check["extents"].as_u64().unwrap() > 0, "{check}");
}
