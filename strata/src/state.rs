//! Small daemon state files in the store directory (exports.json, remotes.json): replaced
//! atomically, so a crash leaves the old or the new file, never a torn one.

use std::path::Path;

/// Writes `bytes` to `dir/name` through a temporary file, fsync and rename, then syncs `dir`.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
