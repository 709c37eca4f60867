//! Validation of user-chosen names (volumes, checkpoints).

use crate::{Error, Result};

pub const MAX_NAME_LEN: usize = 64;

/// Names are 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`. `@`, `:` and
/// `/` are reserved for references such as `VOL@CKPT` and paths.
pub fn validate(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            what,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 64 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it starts with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn names() {
        for ok in ["a", "vm-1", "golden_2026.11", &"x".repeat(64)] {
            assert!(validate("volume", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a@b",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate("volume", bad).is_err(), "{bad}");
        }
    }
}
