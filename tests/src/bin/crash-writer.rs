//! Child process for the SIGKILL test: writes, flushes and checkpoints a volume forever,
//! logging each step to a file before and after it happens, until it is killed.
//!
//! Usage: crash-writer STORE LOG SEED

use std::io::Write;
use strata_engine::{Store, StoreOptions, VolumeOptions};
use strata_tests::{block_content, WRITER_BLOCK, WRITER_BLOCKS};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, store_dir, log_path, seed] = args.as_slice() else {
        return Err("usage: crash-writer STORE LOG SEED".into());
    };
    let mut x: u64 = seed.parse::<u64>()? | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let store = Store::open(store_dir, StoreOptions::default())?;
    if store.volume_info("v").is_err() {
        store.create_volume(
            "v",
            WRITER_BLOCKS * WRITER_BLOCK as u64,
            VolumeOptions::default(),
        )?;
    }
    let vol = store.open_volume("v")?;
    // Unbuffered: every line is a write(2) that survives the kill.
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut line = |s: String| log.write_all(s.as_bytes());
    line("S\n".into())?;
    for i in 0u64.. {
        match next() % 50 {
            0..=1 => {
                vol.flush()?;
                line("F\n".into())?;
            }
            2 => {
                let name = format!("k{seed}-{i}");
                line(format!("c {name}\n"))?;
                store.checkpoint("v", &name)?;
                line(format!("C {name}\n"))?;
            }
            _ => {
                let b = next() % WRITER_BLOCKS;
                let s = next();
                line(format!("B {b} {s}\n"))?;
                vol.write(b * WRITER_BLOCK as u64, &block_content(b, s, WRITER_BLOCK))?;
                line(format!("A {b} {s}\n"))?;
            }
        }
    }
    Ok(())
}
