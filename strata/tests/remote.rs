#![allow(clippy::unwrap_used)]
//! Remotes against a real S3 server: Garage 2.5.0 on loopback (single node, and a three-node
//! cluster with replication factor 3), driven through the real daemon and CLI.
//!
//! Push, delete the local volume, restore into a fresh store (eager and lazy) and compare
//! every byte; incremental pushes upload only what changed (counted); a daemon killed
//! mid-push leaves nothing visible and the next push resumes; gc keeps what a live push or a
//! checkpoint needs and deletes the rest; lazy hydration survives a SIGKILL; a corrupted
//! object is an error, never data; a pull survives the loss of one of three nodes.

mod common;
use common::Daemon;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::Value;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_tests::garage::{self, Garage};

const MIB: usize = 1 << 20;
const BS: usize = 4096;

/// A raw image of `mib` MiB: deterministic blocks, every 16th block a hole.
fn image(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let mut img = vec![0u8; mib * MIB];
    for (b, chunk) in img.chunks_mut(BS).enumerate() {
        if b % 16 != 5 {
            chunk.copy_from_slice(&strata_tests::block_content(b as u64, seed, BS));
        }
    }
    std::fs::write(path, &img).unwrap();
    img
}

/// Volume `name` on `d`, filled from a fresh `image` written to `env/file`; returns it.
fn volume_from_image(
    env: &Env,
    d: &Daemon,
    name: &str,
    file: &str,
    mib: usize,
    seed: u64,
) -> Vec<u8> {
    let img = image(&env.path(file), mib, seed);
    d.ok(&["volume", "create", name, "--size", &format!("{mib}M")]);
    d.ok(&["import", name, env.path(file).to_str().unwrap()]);
    img
}

/// Exports `vol` of `d` over FUSE at `env/mnt` and opens its image read-write.
fn fuse_image(env: &Env, d: &Daemon, vol: &str) -> std::fs::File {
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    d.ok(&["export", "fuse", vol, "--mountpoint", mnt.to_str().unwrap()]);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join(format!("{vol}.img")))
        .unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    garage: Garage,
    creds: PathBuf,
}

impl Env {
    fn single() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let garage = Garage::single(&dir.path().join("garage"));
        Env::with(dir, garage)
    }

    fn with(dir: tempfile::TempDir, garage: Garage) -> Env {
        let creds = dir.path().join("s3.creds");
        Garage::credentials_file(&creds);
        Env { dir, garage, creds }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A daemon on store `name` with the remote `g` configured.
    fn daemon(&self, name: &str, serve_args: &[&str]) -> Daemon {
        let d = Daemon::start_with(&self.path(name), serve_args);
        let listed = d.ok(&["--json", "remote", "list"]);
        if !listed.contains("\"g\"") {
            let args = self.garage.remote_add_args("g", &self.creds);
            d.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        d
    }

    /// An S3 client of our own, for tampering with objects.
    fn s3(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(self.garage.endpoint())
                .with_bucket_name(garage::BUCKET)
                .with_region(garage::REGION)
                .with_access_key_id(garage::KEY_ID)
                .with_secret_access_key(garage::SECRET)
                .with_allow_http(true)
                .build()
                .unwrap(),
        )
    }
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&d.ok(&a)).unwrap()
}

/// Exports `source` to a raw file and returns its bytes.
fn read_back(d: &Daemon, source: &str, path: &Path) -> Vec<u8> {
    d.ok(&["export-image", source, path.to_str().unwrap()]);
    std::fs::read(path).unwrap()
}

fn same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = (0..a.len())
        .step_by(BS)
        .find(|&i| a[i..i + BS] != b[i..i + BS])
    {
        panic!("{what}: block {} differs", i / BS);
    }
}

/// The JSON body of a raw API response.
fn body(resp: &str) -> Value {
    serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap_or("{}")).unwrap_or(Value::Null)
}

/// The job id a job-starting API call answered with.
fn job_id(resp: &str) -> u64 {
    body(resp)["job"]
        .as_u64()
        .unwrap_or_else(|| panic!("no job in {resp}"))
}

fn job(d: &Daemon, id: u64) -> Value {
    body(&d.http("GET", &format!("/v1/jobs/{id}"), ""))
}

/// One sample of the daemon's /metrics (panics if the series is absent).
fn metric(d: &Daemon, series: &str) -> u64 {
    let text = d.http("GET", "/metrics", "");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("{series} not in /metrics")) as u64
}

/// Waits until `f` holds, up to `secs`.
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `protection` object of `volume info` (null when the volume is not protected).
fn protection(d: &Daemon, vol: &str) -> Value {
    json(d, &["volume", "info", vol])["protection"].clone()
}

fn remote_checkpoints(d: &Daemon) -> Vec<String> {
    json(d, &["checkpoint", "list", "--remote", "g"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}@{}",
                c["volume"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// An incremental push keeps the base's extents for the blocks the guest left alone, drops
/// the ones it discarded, keeps the base's extent for a block rewritten with the same bytes
/// and uploads exactly the blocks with new bytes; the restored checkpoint is the new image.
/// Written through the FUSE image so that untouched blocks keep their locations (an import
/// rewrites every block).
#[test]
fn an_incremental_push_keeps_untouched_blocks_and_drops_discarded_ones() {
    let env = Env::single();
    let a = env.daemon("a", &[]);
    let old = volume_from_image(&env, &a, "vm", "vm.raw", 16, 4);
    a.ok(&["checkpoint", "create", "vm@c1"]);
    a.ok(&["checkpoint", "push", "vm@c1", "--remote", "g"]);
    let f = fuse_image(&env, &a, "vm");
    let blocks = old.len() / BS;
    let mut img = old.clone();
    // New bytes (into data blocks and into holes), discards, and the same bytes again.
    for i in 0..40 {
        let b = (i * 97 + 3) % blocks;
        let data = strata_tests::block_content(b as u64, 77, BS);
        img[b * BS..(b + 1) * BS].copy_from_slice(&data);
        f.write_all_at(&data, (b * BS) as u64).unwrap();
    }
    for i in 0..30 {
        let b = (i * 89 + 7) % blocks;
        img[b * BS..(b + 1) * BS].fill(0);
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (b * BS) as i64,
                BS as i64,
            )
        };
        assert_eq!(
            r,
            0,
            "punching block {b}: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut same_again = 0;
    for i in 0..20 {
        let b = (i * 53 + 11) % blocks;
        if img[b * BS..(b + 1) * BS] == old[b * BS..(b + 1) * BS] && b % 16 != 5 {
            f.write_all_at(&img[b * BS..(b + 1) * BS], (b * BS) as u64)
                .unwrap();
            same_again += 1;
        }
    }
    f.sync_all().unwrap();
    drop(f);
    a.ok(&["unexport", "vm"]);
    a.ok(&["checkpoint", "create", "vm@c2"]);
    let inc = json(&a, &["checkpoint", "push", "vm@c2", "--remote", "g"]);
    let zero = |v: &[u8], b: usize| v[b * BS..(b + 1) * BS].iter().all(|&x| x == 0);
    let mapped = (0..blocks).filter(|&b| !zero(&img, b)).count();
    let new_bytes = (0..blocks)
        .filter(|&b| !zero(&img, b) && img[b * BS..(b + 1) * BS] != old[b * BS..(b + 1) * BS])
        .count();
    assert!(
        same_again > 10 && new_bytes > 30,
        "{same_again} {new_bytes}"
    );
    assert_eq!(inc["base"], "vm@c1", "{inc}");
    assert_eq!(inc["blocks"], mapped as u64, "{inc}");
    assert_eq!(inc["uploaded_bytes"], (new_bytes * BS) as u64, "{inc}");
    assert_eq!(
        inc["rewritten_unchanged_blocks"], same_again as u64,
        "{inc}"
    );
    // Restored into a fresh store, byte for byte.
    let b = env.daemon("b", &[]);
    b.ok(&["volume", "create", "vm", "--from", "g:vm@c2"]);
    same(
        &read_back(&b, "vm", &env.path("b.raw")),
        &img,
        "restore of vm@c2",
    );
    b.ok(&["volume", "create", "v1", "--from", "g:vm@c1"]);
    same(
        &read_back(&b, "v1", &env.path("b1.raw")),
        &old,
        "restore of vm@c1",
    );
}

#[test]
fn push_restore_incremental_and_gc() {
    let env = Env::single();
    let a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "vm", "vm.raw", 64, 1);
    a.ok(&["checkpoint", "create", "vm@c1"]);
    let full = json(&a, &["checkpoint", "push", "vm@c1", "--remote", "g"]);
    let mapped = (64 * MIB / BS) as u64 * 15 / 16;
    assert_eq!(full["blocks"], mapped);
    assert_eq!(full["uploaded_bytes"], mapped * BS as u64, "{full}");

    // Change 1% of the volume (164 blocks); the next push uploads exactly those.
    let mut img2 = img.clone();
    let changed: Vec<usize> = (0..164).map(|i| i * 97 + 3).collect();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(env.path("vm.raw"))
            .unwrap();
        for &b in &changed {
            let data = strata_tests::block_content(b as u64, 2, BS);
            img2[b * BS..(b + 1) * BS].copy_from_slice(&data);
            f.write_all_at(&data, (b * BS) as u64).unwrap();
        }
    }
    a.ok(&["import", "vm", env.path("vm.raw").to_str().unwrap()]);
    a.ok(&["checkpoint", "create", "vm@c2"]);
    let inc = json(&a, &["checkpoint", "push", "vm@c2"]);
    let changed_mapped = changed.iter().filter(|&&b| b % 16 != 5).count() as u64;
    println!(
        "incremental push: {} of {} bytes uploaded ({:.2}%), base {}",
        inc["uploaded_bytes"],
        mapped * BS as u64,
        inc["uploaded_bytes"].as_f64().unwrap() * 100.0 / (mapped * BS as u64) as f64,
        inc["base"]
    );
    assert_eq!(inc["base"], "vm@c1");
    assert!(
        inc["uploaded_bytes"].as_u64().unwrap() >= changed_mapped * BS as u64
            && inc["uploaded_bytes"].as_u64().unwrap() <= 164 * BS as u64,
        "{inc}"
    );
    // Uploads are counted in /metrics: both pushes' packs plus their manifests.
    let uploaded = metric(&a, "strata_remote_uploaded_bytes_total{remote=\"g\"}");
    let packs = full["uploaded_bytes"].as_u64().unwrap() + inc["uploaded_bytes"].as_u64().unwrap();
    assert!(
        uploaded > packs && uploaded < packs + (1 << 20),
        "{uploaded} vs {packs}"
    );
    // No guest sent a request while they ran: the push governor had nobody to yield to.
    assert_eq!(metric(&a, "strata_push_backoffs_total"), 0);
    metric(&a, "strata_push_rate_bytes");
    // Pushing again is a no-op; pushing a name the remote holds from elsewhere is refused.
    assert_eq!(
        json(&a, &["checkpoint", "push", "vm@c2"])["already_pushed"],
        true
    );
    assert_eq!(remote_checkpoints(&a), vec!["vm@c1", "vm@c2"]);

    // Delete the local volume; restore into a fresh store.
    a.ok(&["volume", "delete", "vm"]);
    let b = env.daemon("b", &[]);
    b.ok(&["volume", "create", "vm", "--from", "g:vm@c2"]);
    same(
        &read_back(&b, "vm", &env.path("b.raw")),
        &img2,
        "eager restore of vm@c2",
    );
    same(
        &read_back(&b, "vm@c2", &env.path("b2.raw")),
        &img2,
        "the restored checkpoint",
    );
    b.ok(&["volume", "create", "old", "--from", "g:vm@c1"]);
    same(
        &read_back(&b, "old", &env.path("b3.raw")),
        &img,
        "eager restore of vm@c1",
    );
    // A push from the restored volume is incremental against what it came from.
    b.ok(&["checkpoint", "create", "vm@c3"]);
    let again = json(&b, &["checkpoint", "push", "vm@c3"]);
    assert_eq!(again["uploaded_bytes"], 0, "{again}");
    assert_eq!(again["base"], "vm@c2");

    // gc: a checkpoint deleted from the remote frees the packs only it referenced.
    let other = volume_from_image(&env, &b, "other", "other.raw", 8, 9);
    b.ok(&["checkpoint", "create", "other@x"]);
    b.ok(&["checkpoint", "push", "other@x"]);
    let dry = json(&b, &["remote", "gc", "g", "--grace", "0s"]);
    assert_eq!(dry["packs_deleted"], 0, "nothing is garbage yet: {dry}");
    b.ok(&["checkpoint", "delete", "--remote", "g", "other@x"]);
    b.fails(
        &["checkpoint", "delete", "--remote", "g", "other@x"],
        "has no checkpoint",
    );
    let young = json(&b, &["remote", "gc", "g"]);
    assert_eq!(
        young["packs_deleted"], 0,
        "the grace period keeps young packs: {young}"
    );
    let gc = json(&b, &["remote", "gc", "g", "--grace", "0s"]);
    assert_eq!(gc["packs_deleted"], 1, "{gc}");
    assert_eq!(
        gc["bytes_deleted"],
        (8 * MIB / BS * 15 / 16 * BS) as u64,
        "{gc}"
    );
    // Everything still listed restores intact after gc.
    assert_eq!(remote_checkpoints(&b), vec!["vm@c1", "vm@c2", "vm@c3"]);
    let c = env.daemon("c", &[]);
    c.ok(&["volume", "create", "vm", "--from", "g:vm@c3"]);
    same(
        &read_back(&c, "vm", &env.path("c.raw")),
        &img2,
        "restore after gc",
    );
    c.ok(&["volume", "create", "v1", "--from", "g:vm@c1"]);
    same(
        &read_back(&c, "v1", &env.path("c1.raw")),
        &img,
        "c1 after gc",
    );
    drop(other);

    // Bad input: clear errors.
    c.fails(
        &["volume", "create", "x", "--from", "g:vm@nope"],
        "has no checkpoint vm@nope",
    );
    c.fails(
        &["volume", "create", "x", "--from", "h:vm@c1"],
        "no remote named",
    );
    c.fails(
        &["volume", "create", "x", "--from", "g:vm"],
        "REMOTE:VOL@CKPT",
    );
    c.fails(
        &["volume", "create", "x", "--lazy", "--size", "1M"],
        "--lazy needs",
    );
    c.fails(&["checkpoint", "push", "vm@nope"], "no checkpoint vm@nope");
    c.fails(
        &[
            "remote",
            "add",
            "g",
            "--endpoint",
            "http://127.0.0.1:1",
            "--bucket",
            "b",
        ],
        "already exists",
    );
    c.fails(
        &[
            "remote",
            "add",
            "h",
            "--endpoint",
            "http://127.0.0.1:1",
            "--bucket",
            "b",
            "--credentials-file",
            env.creds.to_str().unwrap(),
        ],
        "does not answer",
    );
    std::fs::set_permissions(&env.creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    c.fails(
        &[
            "remote",
            "add",
            "h",
            "--endpoint",
            &env.garage.endpoint(),
            "--bucket",
            garage::BUCKET,
            "--credentials-file",
            env.creds.to_str().unwrap(),
        ],
        "readable by group or others",
    );
    std::fs::set_permissions(&env.creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.fails(&["remote", "remove", "h"], "no remote named");
    // Secrets never appear in what the daemon prints or stores.
    let listed = c.ok(&["--json", "remote", "list"]);
    let state = std::fs::read_to_string(env.path("c").join("remotes.json")).unwrap();
    let log = std::fs::read_to_string(env.path("c.log")).unwrap();
    for text in [&listed, &state, &log] {
        assert!(!text.contains(garage::SECRET), "a secret leaked: {text}");
    }
}

#[test]
fn a_push_killed_midway_is_invisible_kept_by_gc_and_resumes() {
    let env = Env::single();
    let mut a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "big", "big.raw", 320, 3);
    a.ok(&["checkpoint", "create", "big@c"]);
    // Start the push through the API, and kill the daemon once some packs are in.
    let id = job_id(&a.http("POST", "/v1/volumes/big/checkpoints/c/push", "{}"));
    wait_until(60, "the first packs", || {
        job(&a, id)["done_bytes"].as_u64().unwrap_or(0) >= 64 * MIB as u64
    });
    a.kill();
    let a = env.daemon("a", &[]);
    assert!(
        remote_checkpoints(&a).is_empty(),
        "an interrupted push is not listed"
    );
    // Its lease keeps its packs from gc, even with no grace period.
    let gc = json(&a, &["remote", "gc", "g", "--grace", "0s"]);
    assert_eq!(gc["packs_deleted"], 0, "{gc}");
    assert!(gc["packs_kept"].as_u64().unwrap() >= 2, "{gc}");
    // The next push resumes: packs already uploaded are found, not sent again.
    let done = json(&a, &["checkpoint", "push", "big@c"]);
    println!("resumed push: {done}");
    assert!(done["resumed_packs"].as_u64().unwrap() >= 2, "{done}");
    assert!(done["uploaded_bytes"].as_u64().unwrap() < 320 * MIB as u64 * 15 / 16);
    assert_eq!(remote_checkpoints(&a), vec!["big@c"]);
    let b = env.daemon("b", &[]);
    b.ok(&["volume", "create", "big", "--from", "g:big@c"]);
    same(
        &read_back(&b, "big", &env.path("b.raw")),
        &img,
        "restore of a resumed push",
    );
}

#[test]
fn lazy_restore_reads_right_data_and_hydration_survives_sigkill() {
    let env = Env::single();
    let a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "vm", "vm.raw", 128, 5);
    a.ok(&["checkpoint", "create", "vm@gold"]);
    a.ok(&["checkpoint", "push", "vm@gold"]);

    // A slow background copy (8 MiB/s) so that the kill lands mid-hydration.
    let mut b = env.daemon("b", &["--hydrate-rate", "8M"]);
    let t = Instant::now();
    b.ok(&["volume", "create", "vm", "--from", "g:vm@gold", "--lazy"]);
    println!("lazy create of 128 MiB: {:?}", t.elapsed());
    let info = json(&b, &["volume", "info", "vm"]);
    assert!(info["remote_bytes"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["hydration"]["state"], "hydrating");
    // Random reads through the engine (the FUSE image) while hydration runs.
    let f = fuse_image(&env, &b, "vm");
    let mut x = 12345u64;
    let mut buf = vec![0u8; 3 * BS];
    for _ in 0..300 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) as usize % (img.len() - buf.len());
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(
            buf == img[off..off + buf.len()],
            "lazy read at {off} returned wrong data"
        );
    }
    // A write during hydration wins over the remote copy.
    let mine = vec![0x5Au8; BS];
    f.write_all_at(&mine, 100 * BS as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mid = json(&b, &["volume", "info", "vm"]);
    assert!(
        mid["remote_bytes"].as_u64().unwrap() > 0,
        "still hydrating before the kill: {mid}"
    );
    assert!(metric(&b, "strata_remote_fetched_bytes_total{remote=\"g\"}") > 0);
    assert!(metric(&b, "strata_volume_remote_bytes{volume=\"vm\"}") > 0);
    b.kill();

    // Restart (no rate limit): hydration resumes by itself and completes.
    let b = env.daemon("b", &[]);
    wait_until(120, "hydration to complete", || {
        let v = json(&b, &["volume", "info", "vm"]);
        v["remote_bytes"] == 0 && v["hydration"].is_null()
    });
    let mut expect = img.clone();
    expect[100 * BS..101 * BS].copy_from_slice(&mine);
    same(
        &read_back(&b, "vm", &env.path("b.raw")),
        &expect,
        "hydrated volume",
    );
    let scrub = json(&b, &["scrub"]);
    assert_eq!(scrub["remote_records"], 0, "{scrub}");
    assert!(scrub["problems"].as_array().unwrap().is_empty(), "{scrub}");
    let check = json(&b, &["check"]);
    assert_eq!(check["clean"], true, "{check}");
}

#[test]
fn corrupted_or_missing_objects_are_errors_not_data() {
    let env = Env::single();
    let a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "vm", "vm.raw", 16, 7);
    a.ok(&["checkpoint", "create", "vm@c"]);
    a.ok(&["checkpoint", "push", "vm@c"]);
    let s3 = env.s3();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let packs: Vec<object_store::path::Path> = rt.block_on(async {
        use futures::TryStreamExt;
        let p = object_store::path::Path::from("strata/packs");
        s3.list(Some(&p))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap()
    });
    assert_eq!(packs.len(), 1);
    // Flip one byte in the middle of the pack.
    let pack = packs[0].clone();
    let mut bytes = rt
        .block_on(async { s3.get(&pack).await.unwrap().bytes().await.unwrap() })
        .to_vec();
    let at = bytes.len() / 2 + 17;
    bytes[at] ^= 0x40;
    rt.block_on(s3.put(&pack, bytes.into())).unwrap();

    // Eager restore: fails naming the object; no volume is left behind.
    let b = env.daemon("b", &[]);
    b.fails(
        &["volume", "create", "vm", "--from", "g:vm@c"],
        "checksum mismatch in remote data",
    );
    // Lazy restore: the volume exists; reading the damaged block is an IO error, the rest
    // reads right.
    b.ok(&["volume", "create", "lazy", "--from", "g:vm@c", "--lazy"]);
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    b.ok(&[
        "export",
        "fuse",
        "lazy",
        "--mountpoint",
        mnt.to_str().unwrap(),
    ]);
    let f = std::fs::File::open(mnt.join("lazy.img")).unwrap();
    // The damaged record is block `bad` of the image (records are packed in block order,
    // holes skipped).
    let bad = (0..img.len() / BS)
        .filter(|b| b % 16 != 5)
        .nth(at / BS)
        .unwrap();
    let mut buf = vec![0u8; BS];
    let err = f.read_exact_at(&mut buf, (bad * BS) as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    f.read_exact_at(&mut buf, ((bad + 1) * BS) as u64).unwrap();
    assert!(buf == img[(bad + 1) * BS..(bad + 2) * BS]);
    drop(f);
    b.ok(&["unexport", "lazy"]);
    // The damaged block can never hydrate: it stays remote, and reads keep failing.
    let info = json(&b, &["volume", "info", "lazy"]);
    assert!(
        info["remote_bytes"].as_u64().unwrap() >= BS as u64,
        "{info}"
    );

    // A damaged manifest, and a missing pack: clear errors.
    let manifest = object_store::path::Path::from("strata/manifests/vm/c.manifest");
    let mut m = rt
        .block_on(async { s3.get(&manifest).await.unwrap().bytes().await.unwrap() })
        .to_vec();
    m[30] ^= 1;
    rt.block_on(s3.put(&manifest, m.into())).unwrap();
    b.fails(
        &["volume", "create", "m", "--from", "g:vm@c"],
        "manifest fails its checksum",
    );
    let listed = json(&b, &["checkpoint", "list", "--remote", "g"]);
    assert!(
        listed[0]["error"].as_str().unwrap().contains("checksum"),
        "{listed}"
    );
    a.ok(&["checkpoint", "delete", "--remote", "g", "vm@c"]);
    a.ok(&["checkpoint", "create", "vm@d"]);
    a.ok(&["checkpoint", "push", "vm@d"]);
    rt.block_on(async {
        use futures::TryStreamExt;
        let p = object_store::path::Path::from("strata/packs");
        let all: Vec<_> = s3
            .list(Some(&p))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap();
        for k in all {
            s3.delete(&k).await.unwrap();
        }
    });
    let (ok, text) = b.run(&["volume", "create", "gone", "--from", "g:vm@d"]);
    assert!(!ok && text.contains("is missing"), "{text}");
}

#[test]
fn pull_from_a_three_node_cluster_survives_losing_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::cluster3(&dir.path().join("garage"));
    let mut env = Env::with(dir, garage);
    let a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "vm", "vm.raw", 96, 11);
    a.ok(&["checkpoint", "create", "vm@c"]);
    a.ok(&["checkpoint", "push", "vm@c"]);
    // A slow pull; stop node 2 once it is under way.
    let b = env.daemon("b", &["--hydrate-rate", "16M"]);
    let id = job_id(&b.http("POST", "/v1/volumes", r#"{"name":"vm","from":"g:vm@c"}"#));
    wait_until(60, "the pull to start", || {
        job(&b, id)["done_bytes"].as_u64().unwrap_or(0) > 8 * MIB as u64
    });
    env.garage.nodes[2].kill();
    // Nothing writes to a volume while it is restored eagerly.
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    b.fails(
        &[
            "export",
            "fuse",
            "vm",
            "--mountpoint",
            mnt.to_str().unwrap(),
        ],
        "is being restored from g:vm@c",
    );
    wait_until(120, "the pull to finish", || {
        job(&b, id)["state"] != "running"
    });
    let j = job(&b, id);
    assert_eq!(j["state"], "done", "{j}");
    same(
        &read_back(&b, "vm", &env.path("b.raw")),
        &img,
        "pull with a node down",
    );
}

#[test]
fn a_checkpoint_replaced_in_the_remote_by_another_store_is_never_a_base() {
    let env = Env::single();
    let a = env.daemon("a", &[]);
    let mut mine = volume_from_image(&env, &a, "vm", "a.raw", 16, 1);
    a.ok(&["checkpoint", "create", "vm@golden"]);
    a.ok(&["checkpoint", "push", "vm@golden"]);
    // Another store replaces vm@golden in the remote with different data.
    let b = env.daemon("b", &[]);
    volume_from_image(&env, &b, "vm", "b.raw", 16, 2);
    b.ok(&["checkpoint", "create", "vm@golden"]);
    b.ok(&["checkpoint", "delete", "--remote", "g", "vm@golden"]);
    b.ok(&["checkpoint", "push", "vm@golden"]);
    // A's vm@golden is no longer what the remote holds under that name.
    a.fails(
        &["checkpoint", "push", "vm@golden"],
        "already holds vm@golden",
    );
    // A pushes a descendant: the remote's vm@golden is not its base, so every block goes up.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(env.path("a.raw"))
        .unwrap();
    let data = strata_tests::block_content(7, 3, BS);
    f.write_all_at(&data, 7 * BS as u64).unwrap();
    mine[7 * BS..8 * BS].copy_from_slice(&data);
    a.ok(&["import", "vm", env.path("a.raw").to_str().unwrap()]);
    a.ok(&["checkpoint", "create", "vm@next"]);
    let next = json(&a, &["checkpoint", "push", "vm@next"]);
    assert!(next["base"].is_null(), "{next}");
    let c = env.daemon("c", &[]);
    c.ok(&["volume", "create", "vm", "--from", "g:vm@next"]);
    same(
        &read_back(&c, "vm", &env.path("c.raw")),
        &mine,
        "vm@next restored",
    );
}

#[test]
fn lz4_volumes_round_trip_and_a_remote_in_use_cannot_be_removed() {
    let env = Env::single();
    let a = env.daemon("a", &[]);
    // Compressible content: every 64 KiB block is a short pattern repeated.
    let mut img = vec![0u8; 32 * MIB];
    for (b, chunk) in img.chunks_mut(64 << 10).enumerate() {
        if b % 5 != 2 {
            let pat = strata_tests::block_content(b as u64, 4, 64);
            for c in chunk.chunks_mut(64) {
                c.copy_from_slice(&pat);
            }
        }
    }
    std::fs::write(env.path("z.raw"), &img).unwrap();
    a.ok(&[
        "volume",
        "create",
        "z",
        "--size",
        "32M",
        "--compress",
        "lz4",
    ]);
    a.ok(&["import", "z", env.path("z.raw").to_str().unwrap()]);
    a.ok(&["checkpoint", "create", "z@c"]);
    let pushed = json(&a, &["checkpoint", "push", "z@c"]);
    // Records travel as stored: compressed.
    assert!(
        pushed["uploaded_bytes"].as_u64().unwrap() < (img.len() / 4) as u64,
        "{pushed}"
    );
    let listed = json(&a, &["checkpoint", "list", "--remote", "g", "z"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // A trickle (1 KiB/s, about three compressed records a second): still hydrating below.
    let b = env.daemon("b", &["--hydrate-rate", "1K"]);
    b.ok(&["volume", "create", "z", "--from", "g:z@c", "--lazy"]);
    let info = json(&b, &["volume", "info", "z"]);
    assert_eq!(info["compress"], "lz4", "{info}");
    assert_eq!(info["block_size"], 64 << 10, "{info}");
    // Still reading from the remote: it cannot be removed.
    b.fails(&["remote", "remove", "g"], "still");
    same(
        &read_back(&b, "z", &env.path("zb.raw")),
        &img,
        "lazy lz4 restore",
    );
    b.ok(&["volume", "delete", "z"]);
    b.ok(&["remote", "remove", "g"]);
    assert_eq!(json(&b, &["remote", "list"]), serde_json::json!([]));
    b.fails(&["checkpoint", "push", "z@c"], "no remote is configured");
}

/// `volume protect`: rounds on schedule (checkpoint + incremental push), retention to the
/// newest 3 in the remote with gc reclaiming the rest, a remote outage visible in `volume
/// info` and metrics while the volume stays writable, catch-up when the remote returns,
/// the policy surviving a daemon restart, and the newest protected checkpoint restoring
/// the data on another store.
#[test]
fn protection_pushes_on_schedule_keeps_three_and_catches_up_after_an_outage() {
    let mut env = Env::single();
    let a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "vm", "vm.raw", 16, 1);
    let info = |d: &Daemon| protection(d, "vm");
    let pushes = |d: &Daemon| info(d)["pushes"].as_u64().unwrap_or(0);

    // Bad input first.
    a.fails(&["volume", "protect", "vm", "--every", "0s"], "at least 1s");
    a.fails(
        &["volume", "protect", "vm", "--every", "1s", "--keep", "0"],
        "at least 1",
    );
    a.fails(
        &["volume", "protect", "vm", "--every", "soon"],
        "invalid duration",
    );
    a.fails(&["volume", "protect", "nope", "--every", "1s"], "nope");
    a.fails(&["volume", "unprotect", "vm"], "not protected");

    a.ok(&["volume", "protect", "vm", "--every", "1s", "--keep", "3"]);
    wait_until(60, "10 protection rounds", || pushes(&a) >= 10);
    let p = info(&a);
    assert_eq!(p["remote"], "g");
    assert_eq!(p["failures"], 0, "{p}");
    assert!(p["rpo_secs"].as_f64().unwrap() < 10.0, "{p}");
    assert_eq!(p["bytes_behind"], 0, "nothing written since: {p}");
    // Retention: the remote keeps the newest 3 (a round may be between push and
    // retention, so at most one more for a moment).
    wait_until(10, "retention to 3", || {
        remote_checkpoints(&a)
            .iter()
            .filter(|c| c.starts_with("vm@protect-"))
            .count()
            == 3
    });
    // Locally only the newest is kept (the next push's base).
    let local = a.ok(&["checkpoint", "list", "vm"]);
    assert!(local.matches("protect-").count() <= 2, "{local}");
    // What the deleted checkpoints alone held is reclaimed: the image is rewritten so
    // that early checkpoints hold blocks no later one has.
    let img2 = image(&env.path("vm2.raw"), 16, 2);
    a.ok(&["import", "vm", env.path("vm2.raw").to_str().unwrap()]);
    let after = pushes(&a);
    // On a timeout, the states seen say whether rounds failed (and why) or were slow.
    let mut seen = Value::Null;
    wait_until(60, "4 rounds after the rewrite", || {
        let p = info(&a);
        let state = serde_json::json!([p["pushes"], p["failures"], p["last_error"]]);
        if state != seen {
            eprintln!("after the rewrite: {p}");
            seen = state;
        }
        p["pushes"].as_u64().unwrap_or(0) >= after + 4
    });
    let gc = json(&a, &["remote", "gc", "g", "--grace", "0s"]);
    assert!(
        gc["bytes_deleted"].as_u64().unwrap_or(0) > 0,
        "gc reclaimed nothing: {gc}"
    );

    // The remote goes down: rounds fail, visibly, and the volume stays writable.
    env.garage.nodes[0].kill();
    wait_until(30, "two failed rounds", || {
        info(&a)["failures"].as_u64() >= Some(2)
    });
    let p = info(&a);
    assert!(p["last_error"].is_string(), "{p}");
    assert_eq!(metric(&a, "strata_protect_failing{volume=\"vm\"}"), 1);
    a.ok(&["import", "vm", env.path("vm.raw").to_str().unwrap()]);
    assert!(
        info(&a)["bytes_behind"].as_u64().unwrap() > 0,
        "the rewrite is not protected yet"
    );
    // Back: protection catches up (the back-off is at most 2^failures intervals).
    env.garage.restart_single();
    wait_until(90, "protection to catch up", || {
        let p = info(&a);
        p["failures"] == 0 && p["bytes_behind"] == 0
    });
    assert_eq!(metric(&a, "strata_protect_failing{volume=\"vm\"}"), 0);

    // The policy survives a restart.
    drop(a);
    let a = env.daemon("a", &[]);
    let p = info(&a);
    assert_eq!(p["every_secs"], 1, "{p}");
    assert_eq!(p["keep"], 3, "{p}");
    let before = pushes(&a);
    wait_until(30, "rounds after the restart", || pushes(&a) > before);

    // Unprotect: no more rounds (one already running may end).
    a.ok(&["volume", "unprotect", "vm"]);
    assert!(info(&a).is_null());
    std::thread::sleep(Duration::from_secs(2));
    // Another store restores the newest protected point: the data written before it.
    let newest = remote_checkpoints(&a)
        .into_iter()
        .filter_map(|c| c.strip_prefix("vm@").map(str::to_string))
        .filter(|c| c.starts_with("protect-"))
        .max()
        .unwrap();
    let b = env.daemon("b", &[]);
    b.ok(&[
        "volume",
        "create",
        "vm",
        "--from",
        &format!("g:vm@{newest}"),
    ]);
    same(
        &read_back(&b, "vm", &env.path("b.raw")),
        &img,
        "protected point",
    );
    drop(img2);

    // Deleting a volume drops its policy.
    a.ok(&["volume", "protect", "vm", "--every", "1h"]);
    wait_until(30, "the first round", || pushes(&a) == 1);
    a.ok(&["volume", "delete", "vm"]);
    a.ok(&["volume", "create", "vm", "--size", "1M"]);
    assert!(
        info(&a).is_null(),
        "a new volume of the same name is not protected"
    );
}

/// Failover: store a protects `vm` every second and exports it; the host is lost (SIGKILL,
/// its store left on disk as a host that comes back would find it); store b fails over
/// lazily from `g:vm@latest` and reads the newest protected data at once; a, restarted,
/// is fenced by the owner record b wrote: its first round stops, the export it restored is
/// stopped and a new one refused, it pushes nothing more, and `volume info` says who took
/// over. `unprotect` lets the user keep a's copy as a local volume.
#[test]
fn failover_from_latest_fences_the_old_store() {
    let env = Env::single();
    let a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "vm", "vm.raw", 8, 3);
    a.ok(&["volume", "protect", "vm", "--every", "1s"]);
    let pushes = |d: &Daemon| protection(d, "vm")["pushes"].as_u64().unwrap_or(0);
    wait_until(30, "two rounds", || pushes(&a) >= 2);
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mp = mnt.to_str().unwrap();
    a.ok(&["export", "fuse", "vm", "--mountpoint", mp]);
    drop(a); // the host is lost

    let b = env.daemon("b", &[]);
    let t = Instant::now();
    b.ok(&["volume", "create", "vm", "--from", "g:vm@latest", "--lazy"]);
    let created = t.elapsed();
    let got = read_back(&b, "vm", &env.path("b.raw"));
    println!("failover: volume create --from g:vm@latest --lazy took {created:?}");
    assert!(created < Duration::from_secs(5), "{created:?}");
    same(&got, &img, "the failed-over volume");
    let protected = || {
        remote_checkpoints(&b)
            .into_iter()
            .filter(|c| c.starts_with("vm@protect-"))
            .count()
    };
    let before = protected();

    // The old host comes back: fenced.
    let a = env.daemon("a", &[]);
    wait_until(30, "the fence", || {
        protection(&a, "vm")["fenced"].is_object()
    });
    let p = protection(&a, "vm");
    assert_eq!(p["fenced"]["generation"], 2, "{p}");
    assert!(p["last_error"].as_str().unwrap().contains("fenced"), "{p}");
    wait_until(10, "the export to stop", || {
        !a.ok(&["export", "list"]).contains(mp)
    });
    a.fails(&["export", "fuse", "vm", "--mountpoint", mp], "fenced");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(protected(), before, "a fenced store pushed");
    assert_eq!(metric(&a, "strata_protect_failing{volume=\"vm\"}"), 1);
    // The user keeps the old copy as a local volume.
    a.ok(&["volume", "unprotect", "vm"]);
    a.ok(&["export", "fuse", "vm", "--mountpoint", mp]);
    a.ok(&["unexport", "vm"]);
}

/// The host-loss drill: a writer writes a block and fsyncs it, over and over, through a
/// FUSE export of a volume protected every 2 s; the store is SIGKILLed and deleted mid-run
/// (the host is lost); another store fails over lazily from `g:vm@latest`. Every write
/// whose fsync returned more than one interval and one round before the loss reads back
/// (that block holds it or a later write of it), and the first read after the failover
/// started completes within a second.
#[test]
fn host_loss_drill_keeps_every_write_older_than_an_interval_and_a_round() {
    use std::io::{Seek, SeekFrom, Write};
    const BLOCKS: u64 = 256;
    let env = Env::single();
    let a = env.daemon("a", &[]);
    a.ok(&["volume", "create", "vm", "--size", "16M"]);
    a.ok(&["volume", "protect", "vm", "--every", "2s"]);
    let mnt = env.path("mnt-a");
    std::fs::create_dir_all(&mnt).unwrap();
    a.ok(&[
        "export",
        "fuse",
        "vm",
        "--mountpoint",
        mnt.to_str().unwrap(),
    ]);
    let content = |seq: u64| seq.to_le_bytes().repeat(BS / 8);

    // The writer: (block, seq, when its fsync returned), until the mount dies.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (img, stop) = (mnt.join("vm.img"), stop.clone());
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&img) else {
                return acked;
            };
            for seq in 1u64.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let block = seq % BLOCKS;
                let ok = f.seek(SeekFrom::Start(block * BS as u64)).is_ok()
                    && f.write_all(&content(seq)).is_ok()
                    && f.sync_all().is_ok();
                if !ok {
                    break;
                }
                acked.push((block, seq, Instant::now()));
                std::thread::sleep(Duration::from_millis(2));
            }
            acked
        })
    };
    // Rounds run meanwhile; the longest one observed bounds the loss.
    let mut longest = 0f64;
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        let p = protection(&a, "vm");
        longest = longest.max(p["last_round_secs"].as_f64().unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(200));
    }
    let p = protection(&a, "vm");
    assert!(p["pushes"].as_u64().unwrap() >= 3, "{p}");
    assert_eq!(p["failures"], 0, "{p}");

    // Host loss: the daemon dies and its store is gone.
    let lost = Instant::now();
    drop(a);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap();
    std::fs::remove_dir_all(env.path("a")).unwrap();
    assert!(
        acked.len() > 500,
        "the writer acknowledged only {}",
        acked.len()
    );

    // Failover on another store; the first read is timed from the start of the failover.
    let b = env.daemon("b", &[]);
    let mnt_b = env.path("mnt-b");
    std::fs::create_dir_all(&mnt_b).unwrap();
    let started = Instant::now();
    b.ok(&["volume", "create", "vm", "--from", "g:vm@latest", "--lazy"]);
    b.ok(&[
        "export",
        "fuse",
        "vm",
        "--mountpoint",
        mnt_b.to_str().unwrap(),
    ]);
    let f = std::fs::File::open(mnt_b.join("vm.img")).unwrap();
    let mut first = vec![0u8; BS];
    f.read_exact_at(&mut first, BS as u64).unwrap();
    let first_io = started.elapsed();

    // One interval and one round, plus 50 ms for the scheduler's and the writer's wake-ups.
    let window = Duration::from_secs_f64(2.0 + longest + 0.05);
    let cutoff = lost - window;
    let (mut checked, mut newest_lost) = (0, 0);
    for block in 0..BLOCKS {
        let writes: Vec<(u64, Instant)> = acked
            .iter()
            .filter(|(b, _, _)| *b == block)
            .map(|(_, s, t)| (*s, *t))
            .collect();
        let mut got = vec![0u8; BS];
        f.read_exact_at(&mut got, block * BS as u64).unwrap();
        if writes.last().is_some_and(|(s, _)| got != content(*s)) {
            newest_lost += 1;
        }
        let Some(&(must, _)) = writes.iter().rev().find(|(_, t)| *t < cutoff) else {
            continue;
        };
        let ok = writes.iter().any(|(s, _)| *s >= must && got == content(*s));
        assert!(
            ok,
            "block {block}: write {must} (fsynced {:?} before the loss) is lost",
            lost - writes.iter().find(|(s, _)| *s == must).unwrap().1
        );
        checked += 1;
    }
    println!(
        "drill: {} writes fsynced, {checked} blocks checked against writes older than {:.2} s \
         (2 s interval + longest round {longest:.2} s + 0.05 s) before the loss; {newest_lost} \
         blocks lack their newest write (fsynced after the last protected point); first read \
         {:?} after the failover started",
        acked.len(),
        window.as_secs_f64(),
        first_io
    );
    assert!(checked > 0, "no write old enough to check");
    assert!(
        first_io < Duration::from_secs(1),
        "first IO after {first_io:?}"
    );
    drop(f);
    b.ok(&["unexport", "vm"]);
}

/// `strata serve --push-rate` holds a push to its budget: 40 MiB at 8 MiB/s hands its third
/// 16 MiB pack to the uploads no sooner than 4 s in.
#[test]
fn push_rate_bounds_a_push() {
    let env = Env::single();
    let a = env.daemon("a", &["--push-rate", "8M"]);
    volume_from_image(&env, &a, "vm", "vm.raw", 40, 5);
    a.ok(&["checkpoint", "create", "vm@c1"]);
    let t = Instant::now();
    a.ok(&["checkpoint", "push", "vm@c1"]);
    let took = t.elapsed();
    println!("push of 40 MiB at --push-rate 8M took {took:?}");
    assert!(took >= Duration::from_secs(4), "{took:?}");
}

/// Lazy forks of one remote golden on one store share what they fetch: a golden pushed
/// once, restored lazily on another store, checkpointed and forked 8 times; every fork
/// hydrates in the background. The remote serves the golden's bytes about once (not 9
/// times), the store holds about one copy, a fork's guest write stays its own, and every
/// fork reads the golden's bytes, also after a restart.
#[test]
fn lazy_forks_of_one_remote_golden_fetch_it_once() {
    const FORKS: usize = 8;
    let env = Env::single();
    let a = env.daemon("a", &[]);
    let img = volume_from_image(&env, &a, "golden", "golden.raw", 32, 21);
    a.ok(&["checkpoint", "create", "golden@v1"]);
    let pushed = json(&a, &["checkpoint", "push", "golden@v1", "--remote", "g"]);
    let golden = pushed["uploaded_bytes"].as_u64().unwrap();
    assert!(golden > 28 * MIB as u64, "{pushed}");
    drop(a);

    let mut b = env.daemon("b", &[]);
    b.ok(&[
        "volume",
        "create",
        "golden",
        "--from",
        "g:golden@v1",
        "--lazy",
    ]);
    b.ok(&["checkpoint", "create", "golden@base"]);
    let forks: Vec<String> = (0..FORKS).map(|i| format!("sb{i}")).collect();
    for f in &forks {
        b.ok(&["volume", "create", f, "--from", "golden@base"]);
    }
    let hydrated = |d: &Daemon, v: &str| {
        let i = json(d, &["volume", "info", v]);
        assert!(i["hydration"]["last_error"].is_null(), "{i}");
        i["remote_bytes"] == 0 && i["hydration"].is_null()
    };
    wait_until(120, "every fork to hydrate", || {
        forks
            .iter()
            .chain([&"golden".to_string()])
            .all(|v| hydrated(&b, v))
    });
    let fetched = metric(&b, "strata_remote_fetched_bytes_total{remote=\"g\"}");
    let shared = metric(&b, "strata_remote_shared_bytes_total");
    println!(
        "{FORKS} forks + golden: fetched {fetched} bytes for a golden of {golden} bytes; \
         {shared} bytes installed from shared copies"
    );
    // The golden's records, plus its manifest: about once.
    assert!(fetched >= golden, "{fetched} < {golden}");
    assert!(
        fetched < golden + golden / 10,
        "fetched {fetched}, golden {golden}"
    );
    assert!(shared >= FORKS as u64 * golden, "shared {shared}");
    // One copy on disk, not nine.
    let segs: u64 = std::fs::read_dir(env.path("b").join("data"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("seg"))
        .map(|e| std::os::unix::fs::MetadataExt::blocks(&e.metadata().unwrap()) * 512)
        .sum();
    assert!(
        segs < 2 * golden,
        "segments hold {segs} bytes for a {golden}-byte golden"
    );
    // A fork's own write stays its own; the others keep the golden's bytes.
    let patch = env.path("patch.raw");
    std::fs::write(&patch, vec![0xEE; 4 * MIB]).unwrap();
    b.ok(&["import", "sb0", patch.to_str().unwrap()]);
    let mut want0 = img.clone();
    want0[..4 * MIB].fill(0xEE);
    let back = |d: &Daemon, v: &str, what: &str| {
        let p = env.path(&format!("{v}-{what}.raw"));
        read_back(d, v, &p)
    };
    same(&back(&b, "sb0", "1"), &want0, "sb0");
    for f in &forks[1..] {
        same(&back(&b, f, "1"), &img, f);
    }
    b.terminate();
    let b = env.daemon("b", &[]);
    same(&back(&b, "sb0", "2"), &want0, "sb0 after a restart");
    same(&back(&b, "sb7", "2"), &img, "sb7 after a restart");
    same(&back(&b, "golden", "2"), &img, "golden after a restart");
}
