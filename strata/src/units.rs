//! Sizes with binary suffixes, and the text rendering of API answers.

use anyhow::{bail, Result};
use serde_json::Value;

/// Parses `512`, `4K`, `10G`, `1.5T` (binary multiples; an optional trailing `B`/`iB`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = match num.parse() {
        Ok(n) if n >= 0.0 => n,
        _ => bail!("invalid size {s:?} (examples: 512, 64K, 10G, 1T)"),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 || bytes.fract() != 0.0 {
        bail!("invalid size {s:?}");
    }
    Ok(bytes as u64)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Text output: a line per object, `key: value` pairs, sizes made readable.
pub fn print_human(v: &Value) {
    match v {
        Value::Array(items) if items.is_empty() => println!("(none)"),
        Value::Array(items) => items.iter().for_each(print_human),
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    let is_bytes = k == "size" || k.ends_with("_bytes");
                    match v {
                        Value::Number(n) if is_bytes => format!(
                            "{k}={}",
                            n.as_u64().map(human_bytes).unwrap_or_else(|| n.to_string())
                        ),
                        Value::String(s) => format!("{k}={s}"),
                        Value::Null => format!("{k}=-"),
                        other => format!("{k}={other}"),
                    }
                })
                .collect();
            println!("{}", parts.join("  "));
        }
        Value::Null => {}
        other => println!("{other}"),
    }
}

/// A tree diff, one path per line: `A` added, `D` removed, `M` modified, `m` metadata only,
/// `R` renamed (old -> new).
pub fn print_path_changes(v: &Value) {
    for c in v.as_array().into_iter().flatten() {
        let path = c["path"].as_str().unwrap_or("?");
        let tag = match c["change"].as_str() {
            Some("added") => "A",
            Some("removed") => "D",
            Some("modified") => "M",
            Some("metadata") => "m",
            Some("renamed") => "R",
            _ => "?",
        };
        match c["from"].as_str() {
            Some(from) => println!("{tag} {from} -> {path}"),
            None => println!("{tag} {path}"),
        }
    }
}

/// `checkpoint list` as a tree: each checkpoint under the one it descends from; `*` marks the
/// checkpoint the live volume descends from.
pub fn print_checkpoint_tree(v: &Value) {
    let Some(items) = v.as_array() else {
        return print_human(v);
    };
    if items.is_empty() {
        println!("(no checkpoints)");
        return;
    }
    let key = |c: &Value| {
        format!(
            "{}@{}",
            c["volume"].as_str().unwrap_or(""),
            c["name"].as_str().unwrap_or("")
        )
    };
    let names: Vec<String> = items.iter().map(key).collect();
    let parent_of = |c: &Value| {
        c["parent"]
            .as_str()
            .filter(|p| names.iter().any(|n| n == p))
            .map(str::to_string)
    };
    fn walk(
        items: &[Value],
        names: &[String],
        parent: Option<&str>,
        prefix: &str,
        parent_of: &dyn Fn(&Value) -> Option<String>,
    ) {
        let kids: Vec<usize> = (0..items.len())
            .filter(|&i| parent_of(&items[i]).as_deref() == parent)
            .collect();
        for (k, &i) in kids.iter().enumerate() {
            let c = &items[i];
            let last = k + 1 == kids.len();
            let (branch, cont) = if parent.is_none() {
                ("", "")
            } else if last {
                ("└─ ", "   ")
            } else {
                ("├─ ", "│  ")
            };
            let from = match (parent, c["parent"].as_str()) {
                (None, Some(p)) => format!("  (forked from {p})"),
                _ => String::new(),
            };
            println!(
                "{prefix}{branch}{}{}  mapped {}, exclusive {}{from}",
                c["name"].as_str().unwrap_or("?"),
                if c["is_base"].as_bool() == Some(true) {
                    " *"
                } else {
                    ""
                },
                human_bytes(c["mapped_bytes"].as_u64().unwrap_or(0)),
                human_bytes(c["exclusive_bytes"].as_u64().unwrap_or(0)),
            );
            walk(
                items,
                names,
                Some(&names[i]),
                &format!("{prefix}{cont}"),
                parent_of,
            );
        }
    }
    walk(items, &names, None, "", &parent_of);
    println!("(* = the live volume descends from this checkpoint)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("10g").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        for bad in ["", "x", "-1G", "1.3", "5Q", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
