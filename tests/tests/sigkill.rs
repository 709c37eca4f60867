#![allow(clippy::unwrap_used, clippy::needless_range_loop)]
//! Scenario: a child process writes, flushes and checkpoints a volume and is killed with
//! SIGKILL at a random moment, several times over on the same store. After each kill the
//! parent reopens the store and checks, from the child's log, that every acknowledged write
//! reads back (or a later write to the same block that was in flight at the kill), and that
//! every acknowledged checkpoint exists. The test fails if the child never flushed.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;
use strata_engine::{Store, StoreOptions};
use strata_tests::{block_content, WRITER_BLOCK, WRITER_BLOCKS};

struct Logged {
    /// Per block: the acknowledged value, then values begun after it.
    allowed: HashMap<u64, Vec<Option<u64>>>,
    checkpoints: Vec<String>,
    flushes: usize,
    acks: usize,
}

fn parse(log: &str) -> Logged {
    let mut l = Logged {
        allowed: HashMap::new(),
        checkpoints: Vec::new(),
        flushes: 0,
        acks: 0,
    };
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["B", b, s] => l
                .allowed
                .entry(b.parse().unwrap())
                .or_insert_with(|| vec![None])
                .push(Some(s.parse().unwrap())),
            ["A", b, s] => {
                l.allowed
                    .insert(b.parse().unwrap(), vec![Some(s.parse().unwrap())]);
                l.acks += 1;
            }
            ["C", name] => l.checkpoints.push(name.to_string()),
            ["F"] => l.flushes += 1,
            _ => {}
        }
    }
    l
}

#[test]
fn sigkill_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let log_path = dir.path().join("log");
    let rounds = 6;
    let mut total = (0, 0, 0);
    for round in 0..rounds {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"))
            .args([
                store_dir.to_str().unwrap(),
                log_path.to_str().unwrap(),
                &(round * 7919 + 1).to_string(),
            ])
            .spawn()
            .unwrap();
        // Let it start (opening the store replays the previous round), then kill it mid-work.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "S")
            .count()
            .eq(&(round as usize + 1))
        {
            assert!(std::time::Instant::now() < deadline, "child never started");
            if let Ok(Some(status)) = child.try_wait() {
                panic!("child exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(150 + 97 * round % 400));
        child.kill().unwrap();
        child.wait().unwrap();

        let logged = parse(&std::fs::read_to_string(&log_path).unwrap());
        let opts = StoreOptions {
            commit_interval: None,
            ..StoreOptions::default()
        };
        let store = Store::open(&store_dir, opts).unwrap();
        let vol = store.open_volume("v").unwrap();
        let mut buf = vec![0u8; WRITER_BLOCK];
        for b in 0..WRITER_BLOCKS {
            vol.read(b * WRITER_BLOCK as u64, &mut buf).unwrap();
            let allowed = logged
                .allowed
                .get(&b)
                .cloned()
                .unwrap_or_else(|| vec![None]);
            let ok = allowed.iter().any(|v| match v {
                None => buf.iter().all(|&x| x == 0),
                Some(s) => buf == block_content(b, *s, WRITER_BLOCK),
            });
            assert!(ok, "round {round}: block {b} lost an acknowledged write");
        }
        let present: Vec<String> = store
            .list_checkpoints("v")
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        for c in &logged.checkpoints {
            assert!(present.contains(c), "round {round}: checkpoint {c} lost");
        }
        assert!(store.scrub().unwrap().problems.is_empty());
        total = (logged.acks, logged.flushes, logged.checkpoints.len());
    }
    println!(
        "sigkill: {rounds} kills; {} acknowledged writes, {} flushes, {} checkpoints verified",
        total.0, total.1, total.2
    );
    assert!(
        total.1 > 0,
        "the child never flushed: the test proves nothing"
    );
    assert!(
        total.0 > 100,
        "too few acknowledged writes to prove anything"
    );
}
