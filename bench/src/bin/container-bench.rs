//! container-bench: containers on Strata's containerd snapshotter against containerd's
//! default overlayfs snapshotter, one containerd (Debian's 1.6 with runc), one image:
//! unpack time, `ctr run --rm` start-to-exit latency, and many containers started from the
//! image at once (total time, bytes stored per container).
//!
//! `container-bench [--runs N] [--containers M] [--files F] [--dir DIR]`: the image is a
//! static busybox plus a layer of F files of 4 KiB (default 2,000); N runs per latency
//! (default 10), M containers (default 100).

use std::path::{Path, PathBuf};
use std::time::Instant;
use strata_bench::{flag_values, strata_serve_with, R};
use strata_tests::containerd::Containerd;
use strata_tests::image::{image, layer, p, sh};

const IMAGE: &str = "docker.io/strata/bench:1";

fn build_image(dir: &Path, files: usize) -> R<PathBuf> {
    let base = dir.join("s-base");
    std::fs::create_dir_all(base.join("bin"))?;
    let busybox = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v busybox"])
            .output()?
            .stdout,
    )?;
    if busybox.trim().is_empty() {
        return Err("busybox-static is missing (scripts/setup.sh)".into());
    }
    std::fs::copy(busybox.trim(), base.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", base.join("bin/sh"))?;
    let upper = dir.join("s-upper");
    for i in 0..files {
        let d = upper.join(format!("srv/d{}", i / 100));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(format!("f{i}")), vec![(i % 251) as u8; 4096])?;
    }
    let l1 = layer(dir, &base, "base", "gzip");
    let l2 = layer(dir, &upper, "upper", "gzip");
    let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
    let layout = dir.join("layout");
    image(&layout, &[(l1.0, l1.1, gz), (l2.0, l2.1, gz)], IMAGE);
    let tar = dir.join("image.tar");
    sh(&format!("tar -C {} -cf {} .", p(&layout), p(&tar)));
    Ok(tar)
}

/// Bytes allocated on disk under `path` (not apparent sizes: stores keep sparse files),
/// not crossing into mounts (the trees the snapshotter mounts under its store).
fn du(path: &Path) -> R<u64> {
    let out = std::process::Command::new("du")
        .args(["-s", "-x", "-B1", p(path)])
        .output()?;
    let s = String::from_utf8(out.stdout)?;
    Ok(s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    unpack_s: f64,
    run_ms: f64,
    many_s: f64,
    bytes_per: f64,
}

fn measure(c: &Containerd, sn: &str, tar: &Path, runs: usize, many: usize, space: &Path) -> R<Row> {
    let t = Instant::now();
    c.ok(&["images", "import", "--snapshotter", sn, p(tar)]);
    let unpack_s = t.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for i in 0..runs {
        let id = format!("{sn}-r{i}");
        let t = Instant::now();
        c.ok(&[
            "run",
            "--snapshotter",
            sn,
            "--rm",
            IMAGE,
            &id,
            "/bin/busybox",
            "true",
        ]);
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let before = du(space)?;
    let t = Instant::now();
    for i in 0..many {
        let id = format!("{sn}-m{i}");
        c.ok(&[
            "run",
            "-d",
            "--snapshotter",
            sn,
            IMAGE,
            &id,
            "/bin/busybox",
            "sleep",
            "3600",
        ]);
    }
    let many_s = t.elapsed().as_secs_f64();
    let bytes_per = du(space)?.saturating_sub(before) as f64 / many.max(1) as f64;
    for i in 0..many {
        let id = format!("{sn}-m{i}");
        c.ok(&["task", "delete", "--force", &id]);
        c.ok(&["containers", "rm", &id]);
    }
    Ok(Row {
        unpack_s,
        run_ms: median(&mut lat),
        many_s,
        bytes_per,
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("container-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> R<()> {
    let (mut runs, mut many, mut files) = (10usize, 100usize, 2000usize);
    let mut dir = PathBuf::from("/var/tmp/strata-container-bench");
    for (k, v) in flag_values()? {
        match k.as_str() {
            "--runs" => runs = v.parse()?,
            "--containers" => many = v.parse()?,
            "--files" => files = v.parse()?,
            "--dir" => dir = PathBuf::from(v),
            _ => return Err(format!("unknown flag {k}").into()),
        }
    }
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let _ = std::process::Command::new("umount")
        .args(["-R", "-l", p(&dir)])
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tar = build_image(&dir, files)?;
    let snap_sock = dir.join("snap.sock");
    let (_daemon, store) = strata_serve_with(&dir, &["--containerd-socket", p(&snap_sock)])?;
    let c = Containerd::start(&dir, &snap_sock);
    println!(
        "image: busybox + {files} files of 4 KiB in a second layer; {runs} runs per latency, \
         {many} containers"
    );
    let overlay = measure(
        &c,
        "overlayfs",
        &tar,
        runs,
        many,
        &c.root.join("io.containerd.snapshotter.v1.overlayfs"),
    )?;
    let strata = measure(&c, "strata", &tar, runs, many, &store)?;
    println!(
        "\n{:42} {:>12} {:>12} {:>14}",
        "", "overlayfs", "strata", "strata vs ovl"
    );
    let row = |name: &str, o: f64, s: f64, lower_better: bool| {
        let ratio = if lower_better { o / s } else { s / o };
        println!("{name:42} {o:>12.2} {s:>12.2} {ratio:>13.2}x");
    };
    row(
        "unpack (ctr images import), s",
        overlay.unpack_s,
        strata.unpack_s,
        true,
    );
    row(
        "ctr run --rm start-to-exit, ms (median)",
        overlay.run_ms,
        strata.run_ms,
        true,
    );
    row(
        &format!("{many} containers started, s"),
        overlay.many_s,
        strata.many_s,
        true,
    );
    row(
        "bytes stored per running container",
        overlay.bytes_per,
        strata.bytes_per,
        true,
    );
    Ok(())
}
