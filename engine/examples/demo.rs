//! Strata's main job on an embedded store until the daemon lands: create a volume, fill it,
//! checkpoint, change it, fork an ephemeral sandbox from the checkpoint, restore, and print
//! what each step cost.
//!
//! Usage: `cargo run --release -p strata-engine --example demo -- [STORE_DIR]`

use std::time::Instant;
use strata_engine::{MapRef, Store, StoreOptions, VolumeOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./strata-data".into());
    let store = Store::open(&dir, StoreOptions::default())?;
    println!("store {dir} (io engine: {})", store.engine_name());
    let name = format!("demo-{}", std::process::id());
    store.create_volume(&name, 1 << 30, VolumeOptions::default())?;
    let vol = store.open_volume(&name)?;

    let chunk = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    for i in 0..256u64 {
        vol.write(i << 20, &chunk)?;
    }
    vol.flush()?;
    println!("wrote and flushed 256 MiB in {:?}", t.elapsed());

    let t = Instant::now();
    store.checkpoint(&name, "golden")?;
    println!("checkpoint {name}@golden in {:?}", t.elapsed());

    vol.write(0, &[1u8; 4096])?;
    let t = Instant::now();
    let sandbox = format!("{name}-sandbox");
    store.fork(&name, "golden", &sandbox, true)?;
    println!(
        "fork {name}@golden -> {sandbox} (ephemeral) in {:?}",
        t.elapsed()
    );
    {
        let sb = store.open_volume(&sandbox)?;
        sb.write(8192, &[2u8; 4096])?;
    } // last handle closed: the ephemeral sandbox is discarded

    let diff = store.diff(MapRef::Checkpoint(&name, "golden"), MapRef::Live(&name))?;
    println!("diff golden..live: {diff:?}");
    let t = Instant::now();
    store.restore(&name, "golden")?;
    println!("restore {name}@golden in {:?}", t.elapsed());
    let mut b = vec![0u8; 4096];
    vol.read(0, &mut b)?;
    assert!(
        b.iter().all(|&x| x == 0xa5),
        "restore brought back the checkpoint's content"
    );

    for c in store.list_checkpoints(&name)? {
        println!(
            "checkpoint {}@{}: mapped {} B, exclusive {} B",
            c.volume, c.name, c.mapped_bytes, c.exclusive_bytes
        );
    }
    let report = store.scrub()?;
    println!(
        "scrub: {} records, {} bytes, {} problems",
        report.records,
        report.bytes,
        report.problems.len()
    );
    drop(vol);
    store.delete_volume(&name)?;
    println!("stats after cleanup: {:?}", store.stats());
    Ok(())
}
