//! A blocking client for the control API: one HTTP/1.1 request per connection on the
//! daemon's unix socket.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Largest response accepted from the daemon.
const MAX_RESPONSE: u64 = 64 << 20;

#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: PathBuf) -> Self {
        Client { socket }
    }

    /// Sends a request; returns the JSON body of a 2xx answer, or the daemon's error message.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let mut s = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "cannot reach the daemon at {} (is `strata serve` running for this --store?)",
                self.socket.display()
            )
        })?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: strata\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).context("sending the request")?;
        let mut raw = Vec::new();
        s.take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .context("reading the response")?;
        let text = String::from_utf8_lossy(&raw);
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed response from the daemon"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("malformed status line"))?;
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let payload = if chunked {
            dechunk(rest)?
        } else {
            rest.to_string()
        };
        let value: Value = if payload.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&payload).context("daemon sent invalid JSON")?
        };
        if !(200..300).contains(&status) {
            let msg = value
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("request failed");
            bail!("{msg}");
        }
        Ok(value)
    }
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("malformed chunk"))?;
        let n = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).ok_or_else(|| anyhow!("short chunk"))?);
        s = rest.get(n + 2..).ok_or_else(|| anyhow!("short chunk"))?;
    }
}
