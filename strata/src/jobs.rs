//! Long operations the daemon runs in the background — importing and exporting raw (or,
//! through `qemu-img`, qcow2 and other) images — with progress the CLI polls.

use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_engine::{Source, Volume};

const CHUNK: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct Job {
    pub done: AtomicU64,
    pub total: AtomicU64,
    /// `None` while running; then the result or the error.
    pub outcome: Mutex<Option<Result<Value, String>>>,
}

impl Job {
    pub fn view(&self, id: u64) -> Value {
        let (state, result, error) = match &*self.outcome.lock() {
            None => ("running", Value::Null, Value::Null),
            Some(Ok(v)) => ("done", v.clone(), Value::Null),
            Some(Err(e)) => ("failed", Value::Null, json!(e)),
        };
        json!({"id": id, "state": state, "done_bytes": self.done.load(Ordering::Relaxed),
               "total_bytes": self.total.load(Ordering::Relaxed), "result": result, "error": error})
    }
}

#[derive(Debug, Default)]
pub struct Jobs {
    next: AtomicU64,
    all: Mutex<HashMap<u64, Arc<Job>>>,
}

impl Jobs {
    /// Runs `work` on its own thread; returns the job id.
    pub fn spawn(
        &self,
        work: impl FnOnce(&Job) -> Result<Value, String> + Send + 'static,
    ) -> Result<u64, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job::default());
        self.all.lock().insert(id, job.clone());
        std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                let r = work(&job);
                if let Err(e) = &r {
                    tracing::warn!(job = id, error = %e, "job failed");
                }
                *job.outcome.lock() = Some(r);
            })
            .map_err(|e| format!("starting the job: {e}"))?;
        Ok(id)
    }

    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.all.lock().get(&id).cloned()
    }
}

/// True if the file starts with a qcow2 header (or anything `qemu-img` should convert).
fn detect_format(path: &Path) -> Result<String, String> {
    let f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read_at(&mut magic, 0)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2".into()
    } else {
        "raw".into()
    })
}

fn qemu_img(args: &[&str]) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| format!("running qemu-img (install qemu-utils for non-raw images): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Copies an image file into a volume. Zero chunks become write-zeroes (unmapped: the
/// volume stays thin); the volume is flushed at the end.
pub fn import(
    job: &Job,
    vol: &Volume,
    src: &Path,
    format: Option<&str>,
    scratch: &Path,
) -> Result<Value, String> {
    let format = match format {
        Some(f) => f.to_string(),
        None => detect_format(src)?,
    };
    let mut temp = None;
    let raw: PathBuf = if format == "raw" {
        src.to_path_buf()
    } else {
        let t = scratch.join(format!(".import-{}.raw", std::process::id()));
        qemu_img(&[
            "convert",
            "-f",
            &format,
            "-O",
            "raw",
            &src.to_string_lossy(),
            &t.to_string_lossy(),
        ])?;
        temp = Some(t.clone());
        t
    };
    let result = copy_in(job, vol, &raw);
    if let Some(t) = temp {
        let _ = std::fs::remove_file(t);
    }
    result.map(|bytes| json!({"volume": vol.name(), "imported_bytes": bytes, "format": format}))
}

fn copy_in(job: &Job, vol: &Volume, raw: &Path) -> Result<u64, String> {
    let f = File::open(raw).map_err(|e| format!("opening {}: {e}", raw.display()))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len > vol.size() {
        return Err(format!(
            "the image is {len} bytes, larger than volume {} ({} bytes); resize it first",
            vol.name(),
            vol.size()
        ));
    }
    job.total.store(len, Ordering::Relaxed);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = CHUNK.min((len - off) as usize);
        f.read_exact_at(&mut buf[..n], off)
            .map_err(|e| format!("reading the image at {off}: {e}"))?;
        // The last piece is padded to whole sectors.
        let padded = n.next_multiple_of(512);
        buf[n..padded].fill(0);
        let r = if buf[..padded].iter().all(|&b| b == 0) {
            vol.write_zeroes(off, padded as u64)
        } else {
            vol.write(off, &buf[..padded])
        };
        r.map_err(|e| e.to_string())?;
        off += n as u64;
        job.done.store(off, Ordering::Relaxed);
    }
    vol.flush().map_err(|e| e.to_string())?;
    Ok(len)
}

/// Writes a volume or checkpoint to an image file; holes stay holes in a raw image.
pub fn export(job: &Job, src: &Source, dst: &Path, format: &str) -> Result<Value, String> {
    if dst.exists() {
        return Err(format!(
            "{} already exists; refusing to overwrite it",
            dst.display()
        ));
    }
    let raw = if format == "raw" {
        dst.to_path_buf()
    } else {
        dst.with_extension("strata-export.raw")
    };
    let result = copy_out(job, src, &raw);
    let result = result.and_then(|bytes| {
        if format != "raw" {
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                format,
                &raw.to_string_lossy(),
                &dst.to_string_lossy(),
            ])?;
        }
        Ok(json!({"path": dst, "format": format, "size": src.size(), "data_bytes": bytes}))
    });
    if format != "raw" || result.is_err() {
        let _ = std::fs::remove_file(&raw);
    }
    result
}

fn copy_out(job: &Job, src: &Source, raw: &Path) -> Result<u64, String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(raw)
        .map_err(|e| format!("creating {}: {e}", raw.display()))?;
    let size = src.size();
    f.set_len(size)
        .map_err(|e| format!("sizing {}: {e}", raw.display()))?;
    job.total.store(size, Ordering::Relaxed);
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0u64;
    let mut off = 0u64;
    while let Some(start) = src.next_data(off) {
        let start = start - start % 512;
        let n = CHUNK.min((size - start) as usize);
        src.read(start, &mut buf[..n]).map_err(|e| e.to_string())?;
        f.write_all_at(&buf[..n], start)
            .map_err(|e| format!("writing {}: {e}", raw.display()))?;
        data += n as u64;
        off = start + n as u64;
        job.done.store(off, Ordering::Relaxed);
    }
    f.sync_all().map_err(|e| e.to_string())?;
    job.done.store(size, Ordering::Relaxed);
    Ok(data)
}
