#![allow(clippy::unwrap_used)]
//! `strata fs import-oci`: images built here (GNU tar layers, gzip and zstd, an OCI image
//! layout written by hand) are imported through the daemon and CLI, and their trees are
//! checked through a mount: whiteouts, opaque directories, hard links, devices, owners,
//! set-id bits, xattrs; layer reuse across images; damaged images leave nothing behind.

mod common;

use common::Daemon;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use strata_tests::image::{blob, image, layer, p, sh};

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// The lower layer: files, a hard link, a symlink, devices, a FIFO, owners, set-id, an
/// xattr, and names the upper layer whites out.
fn stage_base(s: &Path) {
    for d in ["bin", "etc", "opt", "dev", "home/user"] {
        fs::create_dir_all(s.join(d)).unwrap();
    }
    fs::write(s.join("etc/hello"), "one").unwrap();
    fs::hard_link(s.join("etc/hello"), s.join("etc/hello-link")).unwrap();
    fs::write(s.join("etc/gone"), "bye").unwrap();
    fs::write(s.join("opt/old1"), "o1").unwrap();
    fs::write(s.join("opt/old2"), "o2").unwrap();
    fs::write(s.join("bin/su"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("su", s.join("bin/sudo")).unwrap();
    fs::write(s.join("home/user/notes"), "mine").unwrap();
    sh(&format!(
        "chmod 4755 {0}/bin/su && chown -R 1000:1000 {0}/home/user && \
         mknod {0}/dev/null c 1 3 && mkfifo {0}/dev/pipe && \
         setfattr -n user.origin -v base {0}/etc/hello && \
         dd if=/dev/urandom of={0}/bin/big bs=1M count=3 status=none",
        p(s)
    ));
}

/// The upper layer: a changed file, a new one, a whiteout, an opaque directory.
fn stage_upper(s: &Path, extra: &str) {
    fs::create_dir_all(s.join("etc")).unwrap();
    fs::create_dir_all(s.join("opt")).unwrap();
    fs::write(s.join("etc/hello"), "one-v2").unwrap();
    fs::write(s.join("etc/added"), extra).unwrap();
    fs::write(s.join("etc/.wh.gone"), "").unwrap();
    fs::write(s.join("opt/.wh..wh..opq"), "").unwrap();
    fs::write(s.join("opt/new"), "n").unwrap();
}

struct Mount<'a> {
    d: &'a Daemon,
    dir: PathBuf,
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        let _ = self.d.run(&["unmount", p(&self.dir)]);
    }
}

fn mount<'a>(d: &'a Daemon, work: &Path, from: &str, name: &str) -> Mount<'a> {
    d.ok(&["fs", "create", name, "--from", from]);
    let dir = work.join(format!("mnt-{name}"));
    fs::create_dir_all(&dir).unwrap();
    d.ok(&["mount", name, p(&dir)]);
    Mount { d, dir }
}

/// `key=value` from the CLI's output.
fn field(out: &str, key: &str) -> String {
    out.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
        .to_string()
}

#[test]
fn images_import_as_layer_checkpoints_shared_between_images() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (base, upper, upper2) = (w.join("s-base"), w.join("s-upper"), w.join("s-upper2"));
    stage_base(&base);
    stage_upper(&upper, "two");
    stage_upper(&upper2, "three");
    let l1 = layer(w, &base, "base", "gzip");
    let l2 = layer(w, &upper, "upper", "zstd");
    let l2b = layer(w, &upper2, "upper2", "");
    let img_a = w.join("img-a");
    image(
        &img_a,
        &[(l1.0.clone(), l1.1.clone(), GZ), (l2.0, l2.1, ZST)],
        "example.org/tools/busybox:1.0",
    );
    let img_b = w.join("img-b");
    image(&img_b, &[(l1.0, l1.1, GZ), (l2b.0, l2b.1, TAR)], "b:1");

    let d = Daemon::start(&w.join("store"));
    // Named from the image's reference.
    let out = d.ok(&["fs", "import-oci", p(&img_a)]);
    assert_eq!(field(&out, "volume"), "busybox-1.0", "{out}");
    assert_eq!(field(&out, "layers"), "2", "{out}");
    assert_eq!(field(&out, "reused_layers"), "0", "{out}");
    let top_a = field(&out, "top");
    let ckpts = d.ok(&["checkpoint", "list", "busybox-1.0"]);
    assert_eq!(ckpts.matches("layer-").count(), 2, "{ckpts}");

    // The top layer seen through a fork of it.
    let m = mount(&d, w, &top_a, "box-a");
    let r = |f: &str| fs::read_to_string(m.dir.join(f)).unwrap();
    assert_eq!(r("etc/hello"), "one-v2");
    assert_eq!(r("etc/added"), "two");
    assert!(!m.dir.join("etc/gone").exists(), "whiteout not applied");
    assert!(
        !m.dir.join("etc/.wh.gone").exists(),
        "whiteout file materialized"
    );
    let mut opt: Vec<_> = fs::read_dir(m.dir.join("opt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opt.sort();
    assert_eq!(opt, ["new"], "opaque directory kept lower entries");
    // Layer 2 replaced etc/hello: the old link keeps the old file, alone.
    assert_eq!(r("etc/hello-link"), "one");
    assert_eq!(
        fs::metadata(m.dir.join("etc/hello-link")).unwrap().nlink(),
        1
    );
    let su = fs::metadata(m.dir.join("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(
        fs::read_link(m.dir.join("bin/sudo")).unwrap(),
        Path::new("su")
    );
    let null = fs::metadata(m.dir.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert!(fs::metadata(m.dir.join("dev/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    let notes = fs::metadata(m.dir.join("home/user/notes")).unwrap();
    assert_eq!((notes.uid(), notes.gid()), (1000, 1000));
    assert_eq!(
        fs::read(m.dir.join("bin/big")).unwrap(),
        fs::read(base.join("bin/big")).unwrap()
    );
    drop(m);

    // The lower layer alone: the hard link shares its inode, the xattr is there.
    let ck1 = ckpts
        .split_whitespace()
        .find(|t| t.contains("layer-"))
        .map(|t| t.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()))
        .unwrap()
        .to_string();
    let m1 = mount(&d, w, &format!("busybox-1.0@{ck1}"), "box-base");
    let (h, hl) = (
        fs::metadata(m1.dir.join("etc/hello")).unwrap(),
        fs::metadata(m1.dir.join("etc/hello-link")).unwrap(),
    );
    // Checkpoints are listed oldest first: this is the lower layer.
    assert!(
        !m1.dir.join("etc/added").exists(),
        "{ck1} is not the lower layer"
    );
    assert_eq!(h.ino(), hl.ino());
    assert_eq!(h.nlink(), 2);
    assert!(m1.dir.join("etc/gone").exists());
    assert_eq!(fs::read_dir(m1.dir.join("opt")).unwrap().count(), 2);
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "user.origin"])
        .arg(m1.dir.join("etc/hello"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "base");
    drop(m1);

    // A second image on the same base layer reuses its checkpoint and applies one layer.
    let out = d.ok(&["fs", "import-oci", p(&img_b), "--tag", "other"]);
    assert_eq!(field(&out, "reused_layers"), "1", "{out}");
    assert_eq!(field(&out, "applied_layers"), "1", "{out}");
    let m = mount(&d, w, &field(&out, "top"), "box-b");
    assert_eq!(
        fs::read_to_string(m.dir.join("etc/added")).unwrap(),
        "three"
    );
    drop(m);

    // The first image again, as a tar of its layout: everything is already there.
    let tarred = w.join("img-a.tar");
    sh(&format!("tar -C {} -cf {} .", p(&img_a), p(&tarred)));
    let out = d.ok(&["fs", "import-oci", p(&tarred), "--tag", "again"]);
    assert_eq!(field(&out, "reused_layers"), "2", "{out}");
    assert_eq!(field(&out, "top"), top_a, "{out}");

    // Bad input: clear errors.
    d.fails(
        &["fs", "import-oci", p(&img_a), "--tag", "other"],
        "already exists",
    );
    d.fails(&["fs", "import-oci", p(&w.join("s-base"))], "no index.json");
}

#[test]
fn a_damaged_layer_leaves_nothing_half_imported() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (base, upper) = (w.join("s-base"), w.join("s-upper"));
    stage_base(&base);
    stage_upper(&upper, "two");
    // Enough content that a cut lands inside the upper layer's entries.
    sh(&format!(
        "dd if=/dev/urandom of={}/etc/zz-big bs=1M count=4 status=none",
        p(&upper)
    ));
    let l1 = layer(w, &base, "base", "gzip");
    let l2 = layer(w, &upper, "upper", "gzip");
    // The upper layer's blob cut in half before the image is made: its digest matches
    // (the manifest names the cut blob), so the cut shows only while it is applied, after
    // its first entries (the whiteout, etc/added, etc/hello) went in.
    let len = fs::metadata(&l2.0).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&l2.0)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let img = w.join("img");
    image(&img, &[(l1.0, l1.1, GZ), (l2.0, l2.1, GZ)], "x:1");

    let d = Daemon::start(&w.join("store"));
    d.fails(
        &["fs", "import-oci", p(&img), "--tag", "bad"],
        "layer 2 of 2",
    );
    // The base layer was finished and stays; the half-applied upper layer is undone.
    let ckpts = d.ok(&["checkpoint", "list", "bad"]);
    assert_eq!(ckpts.matches("layer-").count(), 1, "{ckpts}");
    let dir = w.join("mnt-bad");
    fs::create_dir_all(&dir).unwrap();
    d.ok(&["mount", "bad", p(&dir)]);
    assert_eq!(fs::read_to_string(dir.join("etc/hello")).unwrap(), "one");
    assert!(dir.join("etc/gone").exists());
    assert!(!dir.join("etc/added").exists());
    assert!(!dir.join("etc/zz-big").exists());
    assert!(dir.join("opt/old1").exists());
    d.ok(&["unmount", p(&dir)]);

    // A damaged base layer (a flipped byte the manifest's digest catches before anything
    // is applied): no volume is left at all.
    let img2 = w.join("img2");
    let stage = w.join("s-other");
    fs::create_dir_all(&stage).unwrap();
    fs::write(stage.join("f"), vec![7u8; 1 << 20]).unwrap();
    let l = layer(w, &stage, "other", "zstd");
    image(&img2, &[(l.0.clone(), l.1, ZST)], "y:1");
    let (digest, _) = blob(w, &l.0);
    let f = img2
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&f, bytes).unwrap();
    d.fails(
        &["fs", "import-oci", p(&img2), "--tag", "bad2"],
        "layer 1 of 1",
    );
    d.fails(&["volume", "info", "bad2"], "bad2");
}

/// A `docker save` archive (before Docker 25): `manifest.json` naming a config and layer
/// tars by path, no digests but the config's diff IDs.
#[test]
fn docker_save_archives_import_too() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (base, upper) = (w.join("s-base"), w.join("s-upper"));
    stage_base(&base);
    stage_upper(&upper, "two");
    let l1 = layer(w, &base, "base", "");
    let l2 = layer(w, &upper, "upper", "");
    let arch = w.join("arch");
    fs::create_dir_all(arch.join("l1")).unwrap();
    fs::create_dir_all(arch.join("l2")).unwrap();
    fs::copy(&l1.0, arch.join("l1/layer.tar")).unwrap();
    fs::copy(&l2.0, arch.join("l2/layer.tar")).unwrap();
    let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [l1.1, l2.1]}});
    fs::write(arch.join("cfg.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{"Config": "cfg.json",
        "RepoTags": ["registry.example/team/app:v2"],
        "Layers": ["l1/layer.tar", "l2/layer.tar"]}]);
    fs::write(arch.join("manifest.json"), manifest.to_string()).unwrap();
    let tarred = w.join("app.tar");
    sh(&format!("tar -C {} -cf {} .", p(&arch), p(&tarred)));

    let d = Daemon::start(&w.join("store"));
    let out = d.ok(&["fs", "import-oci", p(&tarred)]);
    assert_eq!(field(&out, "volume"), "app-v2", "{out}");
    assert_eq!(field(&out, "applied_layers"), "2", "{out}");
    let m = mount(&d, w, &field(&out, "top"), "box");
    assert_eq!(
        fs::read_to_string(m.dir.join("etc/hello")).unwrap(),
        "one-v2"
    );
    assert!(!m.dir.join("etc/gone").exists());
    drop(m);

    // A layer whose content does not match the config's diff ID: refused, nothing left.
    let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [l2.1, l1.1]}});
    fs::write(arch.join("cfg.json"), config.to_string()).unwrap();
    d.fails(
        &["fs", "import-oci", p(&arch), "--tag", "swapped"],
        "does not match its diff ID",
    );
    d.fails(&["volume", "info", "swapped"], "swapped");
}
