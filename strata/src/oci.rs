//! `strata fs import-oci`: a container image into a tree, one checkpoint per layer.
//!
//! The image is an OCI image layout (a directory, or a tar of one, as `skopeo copy
//! oci-archive:` and `docker save` since 25 write) or a `docker save` archive
//! (`manifest.json`). The manifest's config lists the layers' `diff_ids`; from them come
//! the chain IDs (`chain(0) = diff(0)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`),
//! and layer n becomes checkpoint `layer-` + the first 58 hex digits of chain(n). Before
//! applying anything the import looks for the longest chain prefix some tree already has
//! as a checkpoint and forks from it (O(1)), so images that share lower layers share them
//! in the store; only the rest is applied, each layer checkpointed before the next.
//!
//! Every blob is checked against its digest (the manifest's, for OCI layouts) and every
//! layer's uncompressed stream against its diff ID before its checkpoint is taken. A layer
//! that fails (a bad digest, a truncated or damaged archive, an entry that cannot be
//! applied) leaves nothing behind: the tree goes back to the previous layer's checkpoint,
//! or is deleted when the import created it and no layer of it was finished.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use strata_engine::{Store, VolumeOptions};

/// Metadata files (index, manifests, configs) larger than this are refused.
const MAX_JSON: u64 = 16 << 20;

/// Where the image's files are: a directory, or a tar (its regular files indexed by path).
enum Source {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        files: HashMap<String, (u64, u64)>,
    },
}

fn clean(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .to_string()
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        if path.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let f = File::open(path).with_context(|| format!("{}", path.display()))?;
        let mut files = HashMap::new();
        let mut ar = tar::Archive::new(BufReader::new(f));
        for e in ar
            .entries()
            .with_context(|| format!("{} is not a tar archive", path.display()))?
        {
            let e = e.with_context(|| format!("reading {}", path.display()))?;
            if e.header().entry_type().is_file() {
                let name = clean(&e.path()?.to_string_lossy());
                files.insert(name, (e.raw_file_position(), e.size()));
            }
        }
        if files.is_empty() {
            bail!("{} holds no image (no files)", path.display());
        }
        Ok(Source::Tar {
            path: path.to_path_buf(),
            files,
        })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => d.join(name).is_file(),
            Source::Tar { files, .. } => files.contains_key(name),
        }
    }

    /// A reader over file `name` and its size.
    fn reader(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        match self {
            Source::Dir(d) => {
                let p = d.join(name);
                let f = File::open(&p).with_context(|| format!("image file {name}"))?;
                let len = f.metadata()?.len();
                Ok((Box::new(f), len))
            }
            Source::Tar { path, files } => {
                let &(off, len) = files
                    .get(name)
                    .ok_or_else(|| anyhow!("the image has no file {name}"))?;
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(off))?;
                Ok((Box::new(f.take(len)), len))
            }
        }
    }

    fn json(&self, name: &str) -> Result<Value> {
        let (r, len) = self.reader(name)?;
        if len > MAX_JSON {
            bail!("image file {name} is {len} bytes, too large for metadata");
        }
        let mut buf = Vec::new();
        r.take(MAX_JSON).read_to_end(&mut buf)?;
        serde_json::from_slice(&buf).with_context(|| format!("image file {name} is not JSON"))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    )
}

/// `sha256:HEX` → the blob's path in an OCI layout.
fn blob_path(digest: &str) -> Result<String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| anyhow!("unsupported or malformed digest {digest:?} (sha256 only)"))?;
    Ok(format!("blobs/sha256/{hex}"))
}

/// Reads through `inner`, hashing and counting what passes.
struct Hashing<'a, R> {
    inner: R,
    ctx: ring::digest::Context,
    counter: Option<&'a AtomicU64>,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        if let Some(c) = &self.counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// One layer to apply: where its blob is and what it must hash to.
struct Layer {
    file: String,
    /// The blob's digest, when the manifest gives one (OCI layouts).
    digest: Option<String>,
    diff_id: String,
}

/// What the image is: its layers and a name for it.
struct Image {
    layers: Vec<Layer>,
    name: Option<String>,
}

fn read_image(src: &Source) -> Result<Image> {
    if src.has("index.json") {
        let index = src.json("index.json")?;
        let (manifest, name) = pick_manifest(src, &index, 0)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("the manifest has no config digest"))?;
        let config = verified_json(src, config_digest)?;
        let diff_ids = diff_ids(&config)?;
        let layers = manifest["layers"]
            .as_array()
            .ok_or_else(|| anyhow!("the manifest lists no layers"))?;
        if layers.len() != diff_ids.len() {
            bail!(
                "the manifest lists {} layers but the config {} diff IDs",
                layers.len(),
                diff_ids.len()
            );
        }
        let layers = layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| {
                let d = l["digest"]
                    .as_str()
                    .ok_or_else(|| anyhow!("a layer has no digest"))?;
                Ok(Layer {
                    file: blob_path(d)?,
                    digest: Some(d.to_string()),
                    diff_id,
                })
            })
            .collect::<Result<_>>()?;
        return Ok(Image { layers, name });
    }
    if src.has("manifest.json") {
        let m = src.json("manifest.json")?;
        let first = m
            .as_array()
            .and_then(|a| a.first())
            .ok_or_else(|| anyhow!("manifest.json lists no image"))?;
        let config = src.json(&clean(
            first["Config"]
                .as_str()
                .ok_or_else(|| anyhow!("manifest.json has no Config"))?,
        ))?;
        let diff_ids = diff_ids(&config)?;
        let files: Vec<String> = first["Layers"]
            .as_array()
            .ok_or_else(|| anyhow!("manifest.json has no Layers"))?
            .iter()
            .map(|l| l.as_str().map(clean))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow!("manifest.json has a layer that is not a path"))?;
        if files.len() != diff_ids.len() {
            bail!(
                "manifest.json lists {} layers but the config {} diff IDs",
                files.len(),
                diff_ids.len()
            );
        }
        let name = first["RepoTags"][0].as_str().map(str::to_string);
        let layers = files
            .into_iter()
            .zip(diff_ids)
            .map(|(file, diff_id)| Layer {
                file,
                digest: None,
                diff_id,
            })
            .collect();
        return Ok(Image { layers, name });
    }
    bail!("not an OCI image layout or docker archive (no index.json or manifest.json)")
}

/// The image manifest an index points at: the only one, or linux on this machine's
/// architecture; nested indexes are followed. Also the image's name, if annotated.
fn pick_manifest(src: &Source, index: &Value, depth: u32) -> Result<(Value, Option<String>)> {
    if depth > 4 {
        bail!("image indexes nest too deep");
    }
    let list = index["manifests"]
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("the image index lists no manifests"))?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let chosen = if list.len() == 1 {
        &list[0]
    } else {
        list.iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .ok_or_else(|| anyhow!("the image has no manifest for linux/{arch}"))?
    };
    let name = chosen["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(str::to_string);
    let digest = chosen["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("a manifest entry has no digest"))?;
    let m = verified_json(src, digest)?;
    if m.get("manifests").is_some() {
        let (m, inner) = pick_manifest(src, &m, depth + 1)?;
        return Ok((m, name.or(inner)));
    }
    Ok((m, name))
}

/// A JSON blob of an OCI layout, checked against its digest.
fn verified_json(src: &Source, digest: &str) -> Result<Value> {
    let (r, len) = src.reader(&blob_path(digest)?)?;
    if len > MAX_JSON {
        bail!("blob {digest} is {len} bytes, too large for metadata");
    }
    let mut buf = Vec::new();
    r.take(MAX_JSON).read_to_end(&mut buf)?;
    if sha256(&buf) != digest {
        bail!("blob {digest} does not match its digest (damaged image)");
    }
    serde_json::from_slice(&buf).with_context(|| format!("blob {digest} is not JSON"))
}

fn diff_ids(config: &Value) -> Result<Vec<String>> {
    let ids = config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| anyhow!("the image config has no rootfs.diff_ids"))?;
    ids.iter()
        .map(|d| {
            let d = d
                .as_str()
                .ok_or_else(|| anyhow!("a diff ID is not a string"))?;
            blob_path(d)?;
            Ok(d.to_string())
        })
        .collect()
}

/// chain(0) = diff(0); chain(n) = sha256(chain(n-1) + " " + diff(n)).
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let c = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(c);
    }
    out
}

/// The checkpoint name of a layer chain: `layer-` and 58 hex digits (names are ≤ 64).
pub fn checkpoint_name(chain_id: &str) -> String {
    let hex = chain_id.strip_prefix("sha256:").unwrap_or(chain_id);
    format!("layer-{}", &hex[..58.min(hex.len())])
}

/// A volume name from an image reference: `docker.io/library/busybox:1.36` → `busybox-1.36`.
fn volume_name(reference: &str) -> Option<String> {
    let last = reference.rsplit('/').next()?;
    let n: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let n = n.trim_start_matches(['.', '-']);
    (!n.is_empty()).then(|| n.chars().take(64).collect())
}

/// What the daemon must hold for an import: the target volume's name, to refuse mounting
/// it meanwhile. `prepare` reads and checks the image's metadata; `run` applies it.
pub struct Plan {
    src: Source,
    image: Image,
    chain: Vec<String>,
    /// The longest chain prefix already imported: (layers, volume, checkpoint).
    prefix: Option<(usize, String, String)>,
    pub volume: String,
}

pub fn prepare(store: &Store, source: &Path, tag: Option<&str>) -> Result<Plan> {
    let src = Source::open(source)?;
    let image = read_image(&src)?;
    if image.layers.is_empty() {
        bail!("the image has no layers");
    }
    let ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain = chain_ids(&ids);
    let volume = match tag {
        Some(t) => t.to_string(),
        None => image
            .name
            .as_deref()
            .and_then(volume_name)
            .unwrap_or_else(|| {
                let top = chain.last().map_or("", |c| c.trim_start_matches("sha256:"));
                format!("image-{}", &top[..12.min(top.len())])
            }),
    };
    strata_engine::validate_name("volume", &volume)?;
    if store.volume_info(&volume).is_ok() {
        bail!("volume {volume} already exists; choose another name with --tag");
    }
    let prefix = find_prefix(store, &chain);
    Ok(Plan {
        src,
        image,
        chain,
        prefix,
        volume,
    })
}

/// Where the longest already-imported prefix of the chain is: (layers, volume, checkpoint).
fn find_prefix(store: &Store, chain: &[String]) -> Option<(usize, String, String)> {
    let mut have: HashMap<String, String> = HashMap::new();
    for v in store.list_volumes().into_iter().filter(|v| v.tree) {
        for c in store.list_checkpoints(&v.name).unwrap_or_default() {
            have.entry(c.name).or_insert_with(|| v.name.clone());
        }
    }
    (0..chain.len()).rev().find_map(|i| {
        let name = checkpoint_name(&chain[i]);
        have.get(&name).map(|v| (i + 1, v.clone(), name))
    })
}

impl Plan {
    fn reused(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.0)
    }

    /// Blob bytes to read (the progress total): the layers not already imported.
    pub fn total_bytes(&self) -> u64 {
        self.image.layers[self.reused()..]
            .iter()
            .filter_map(|l| self.src.reader(&l.file).ok().map(|(_, n)| n))
            .sum()
    }

    /// Imports the image into tree volume `self.volume`; returns the result to report.
    /// `done` counts layer blob bytes read.
    pub fn run(self, store: &Store, done: &AtomicU64) -> Result<Value> {
        let n = self.image.layers.len();
        let reused = self.reused();
        match &self.prefix {
            Some((_, vol, ckpt)) => {
                store.fork(vol, ckpt, &self.volume, false)?;
            }
            None => {
                store.create_volume(
                    &self.volume,
                    strata_engine::TREE_VOLUME_SIZE,
                    VolumeOptions {
                        tree: true,
                        ..VolumeOptions::default()
                    },
                )?;
            }
        }
        let mut last: Option<String> = None;
        let mut files = 0;
        let mut bytes = 0;
        for i in reused..n {
            let name = checkpoint_name(&self.chain[i]);
            match self.apply(store, i, done) {
                Ok(s) => {
                    files += s.files;
                    bytes += s.bytes;
                }
                Err(e) => {
                    self.undo(store, last.as_deref());
                    return Err(e.context(format!("layer {} of {n}", i + 1)));
                }
            }
            if let Err(e) = store.checkpoint(&self.volume, &name) {
                self.undo(store, last.as_deref());
                return Err(
                    anyhow::Error::from(e).context(format!("checkpoint of layer {}", i + 1))
                );
            }
            last = Some(name);
        }
        // The top layer's checkpoint: in this volume, or where the whole image already was.
        let top = match (&self.prefix, last) {
            (_, Some(ck)) => format!("{}@{ck}", self.volume),
            (Some((_, vol, ck)), None) => format!("{vol}@{ck}"),
            // Not reached: an image has a layer, so one was applied or all were found.
            (None, None) => String::new(),
        };
        Ok(serde_json::json!({
            "volume": self.volume,
            "layers": n,
            "reused_layers": reused,
            "applied_layers": n - reused,
            "top": top,
            "files": files,
            "bytes": bytes,
        }))
    }

    fn apply(
        &self,
        store: &Store,
        i: usize,
        done: &AtomicU64,
    ) -> Result<strata_fuse::tree::layer::LayerStats> {
        let layer = &self.image.layers[i];
        let hashing = |r, counter| Hashing {
            inner: r,
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            counter,
        };
        // The blob first (a read of the compressed bytes, cheap next to applying them):
        // nothing of a blob that does not match its digest is applied.
        if let Some(want) = &layer.digest {
            let mut blob = hashing(self.src.reader(&layer.file)?.0, None);
            std::io::copy(&mut blob, &mut std::io::sink()).context("reading the layer")?;
            let got = format!("sha256:{}", hex(blob.ctx.finish().as_ref()));
            if &got != want {
                bail!("its blob does not match its digest {want} (got {got}): damaged image");
            }
        }
        let mut buffered = BufReader::with_capacity(
            1 << 20,
            hashing(self.src.reader(&layer.file)?.0, Some(done)),
        );
        let magic = buffered.fill_buf()?.get(..4).map(<[u8]>::to_vec);
        let decoded: Box<dyn Read + '_> = match magic.as_deref() {
            Some([0x1f, 0x8b, _, _]) => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
            Some([0x28, 0xb5, 0x2f, 0xfd]) => {
                Box::new(zstd::stream::read::Decoder::with_buffer(buffered).context("zstd stream")?)
            }
            _ => Box::new(buffered),
        };
        let mut diff = Hashing {
            inner: decoded,
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            counter: None,
        };
        let handle =
            strata_fuse::tree::TreeHandle::open(store.open_volume(&self.volume)?, store.path())
                .map_err(|e| anyhow!(e))?;
        let written = AtomicU64::new(0);
        let stats = handle
            .apply_layer(&mut diff, &written)
            .map_err(|e| anyhow!(e))?;
        drop(handle);
        // What follows the tar's end (padding) counts for the diff ID too.
        std::io::copy(&mut diff, &mut std::io::sink()).context("reading the layer")?;
        let got = format!("sha256:{}", hex(diff.ctx.finish().as_ref()));
        if got != layer.diff_id {
            bail!(
                "its content does not match its diff ID {} (got {got}): damaged or truncated",
                layer.diff_id
            );
        }
        Ok(stats)
    }

    /// Takes the volume back to the last finished layer, or deletes it when none was.
    fn undo(&self, store: &Store, last: Option<&str>) {
        let r = match last {
            Some(ck) => store.restore(&self.volume, ck),
            None => store.delete_volume(&self.volume),
        };
        if let Err(e) = r {
            tracing::error!(volume = %self.volume, error = %e, "undoing a failed image import");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let d = [
            "sha256:".to_string() + &"a".repeat(64),
            "sha256:".to_string() + &"b".repeat(64),
        ];
        let c = chain_ids(&d);
        assert_eq!(c[0], d[0]);
        assert_eq!(c[1], sha256(format!("{} {}", d[0], d[1]).as_bytes()));
        assert_eq!(checkpoint_name(&c[0]).len(), 64);
    }

    #[test]
    fn volume_names_from_references() {
        assert_eq!(
            volume_name("docker.io/library/busybox:1.36").as_deref(),
            Some("busybox-1.36")
        );
        assert_eq!(volume_name("..//").as_deref(), None);
    }

    #[test]
    fn malformed_digests_are_refused() {
        assert!(blob_path("md5:abc").is_err());
        assert!(blob_path("sha256:../../etc/passwd").is_err());
        assert!(blob_path(&("sha256:".to_string() + &"0".repeat(64))).is_ok());
    }
}
