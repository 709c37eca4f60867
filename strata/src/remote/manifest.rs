//! The manifest of a pushed checkpoint: self-contained (restoring needs this object and the
//! packs it names, never another manifest) and checksummed end to end.
//!
//! ```text
//! "STRATAMF" | format u32 LE | body length u64 LE | body | crc32 u32 LE of everything before
//! body = header length u32 | header JSON | n u64 | 5 run-length coded columns | n × crc32 u32
//! column = runs u64 | runs × (value u64, count u64)   (counts sum to n)
//! columns: block delta (from the previous extent's block; the first from 0) | pack index |
//!   offset delta (from where the previous record ends when it is in the same pack, else
//!   from 0; wrapping u32) | stored_len | flags (1 = lz4)
//! ```
//!
//! Predicted from the previous extent and run-length coded, everything but the checksums
//! costs almost nothing: about 4 bytes per mapped block. All integers little-endian.
//!
//! Extents are sorted by block, one per mapped block; `crc32` is the engine's checksum of the
//! record's stored bytes, so a fetched block is verified with no extra hashing.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"STRATAMF";
const FORMAT: u32 = 1;
/// Bound on a manifest body (about 250 million mapped blocks).
const MAX_BODY: usize = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    pub key: String,
    pub len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub volume: String,
    pub checkpoint: String,
    pub size: u64,
    pub block_size: u32,
    pub lz4: bool,
    pub created_unix: u64,
    /// The remote checkpoint this push was diffed against (`VOL@CKPT`), if any.
    pub base: Option<String>,
    pub push_id: String,
    pub packs: Vec<PackRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub block: u64,
    pub pack: u32,
    pub offset: u32,
    pub stored_len: u32,
    pub crc: u32,
    pub lz4: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub header: Header,
    pub extents: Vec<Extent>,
}

impl Manifest {
    pub fn stored_bytes(&self) -> u64 {
        self.extents.iter().map(|e| u64::from(e.stored_len)).sum()
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec(&self.header)?;
        let x = &self.extents;
        let mut body = Vec::with_capacity(64 + header.len() + x.len() * 5);
        body.extend_from_slice(&u32::try_from(header.len())?.to_le_bytes());
        body.extend_from_slice(&header);
        body.extend_from_slice(&(x.len() as u64).to_le_bytes());
        // Column by column, each predicted from the previous extent and run-length coded:
        // everything but the checksums costs almost nothing.
        let prev = |i: usize| i.checked_sub(1).map(|p| &x[p]);
        rle(
            &mut body,
            x.iter()
                .enumerate()
                .map(|(i, e)| e.block.wrapping_sub(prev(i).map_or(0, |p| p.block))),
        );
        rle(&mut body, x.iter().map(|e| u64::from(e.pack)));
        rle(
            &mut body,
            x.iter().enumerate().map(|(i, e)| {
                let expect = prev(i).map_or(0, |p| predicted_offset(p, e));
                u64::from(e.offset.wrapping_sub(expect))
            }),
        );
        rle(&mut body, x.iter().map(|e| u64::from(e.stored_len)));
        rle(&mut body, x.iter().map(|e| u64::from(e.lz4)));
        for e in x {
            body.extend_from_slice(&e.crc.to_le_bytes());
        }
        ensure!(
            body.len() <= MAX_BODY,
            "manifest too large ({} bytes)",
            body.len()
        );
        let mut out = Vec::with_capacity(body.len() + 24);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes and validates a manifest: checksum, format, and every extent against the
    /// geometry and the packs (so a damaged or hostile object is an error, never a bad map).
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        ensure!(bytes.len() >= 24, "manifest is truncated");
        let (all, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes(crc.try_into()?);
        ensure!(crc32fast::hash(all) == crc, "manifest fails its checksum");
        ensure!(&all[..8] == MAGIC, "not a Strata manifest");
        let format = u32::from_le_bytes(all[8..12].try_into()?);
        ensure!(
            format == FORMAT,
            "manifest format {format} is not supported"
        );
        let len = u64::from_le_bytes(all[12..20].try_into()?);
        let body = &all[20..];
        ensure!(body.len() as u64 == len, "manifest body length mismatch");
        ensure!(body.len() <= MAX_BODY, "manifest body too large");
        let mut r = Cursor(body);
        let hlen = r.u32()? as usize;
        let header: Header = serde_json::from_slice(r.take(hlen)?).context("manifest header")?;
        let n = usize::try_from(r.u64()?)?;
        // Every extent has a 4-byte checksum in the body: bounds n before allocating.
        ensure!(n <= body.len() / 4, "manifest extent count is impossible");
        // Columns stay run-length coded (the runs cost at most the body's size) and are
        // expanded one extent at a time.
        let mut blocks_col = r.runs(n)?;
        let mut packs_col = r.runs(n)?;
        let mut offsets_col = r.runs(n)?;
        let mut lens_col = r.runs(n)?;
        let mut flags_col = r.runs(n)?;
        let crcs_col = r.take(4 * n)?;
        ensure!(r.0.is_empty(), "manifest has trailing bytes");
        let bs = header.block_size;
        ensure!(
            bs.is_power_of_two() && (4096..=1 << 20).contains(&bs),
            "manifest block size {bs} is invalid"
        );
        let blocks = header.size.div_ceil(u64::from(bs));
        let small = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| anyhow::anyhow!("manifest {what} {v} is out of range"))
        };
        let mut extents: Vec<Extent> = Vec::with_capacity(n);
        for i in 0..n {
            let mut e = Extent {
                block: extents
                    .last()
                    .map_or(0, |p| p.block)
                    .wrapping_add(blocks_col.next_value()),
                pack: small(packs_col.next_value(), "pack index")?,
                offset: small(offsets_col.next_value(), "offset")?,
                stored_len: small(lens_col.next_value(), "stored length")?,
                crc: u32::from_le_bytes(crcs_col[4 * i..4 * i + 4].try_into()?),
                lz4: match flags_col.next_value() {
                    0 => false,
                    1 => true,
                    f => bail!("manifest flags {f} are invalid"),
                },
            };
            if let Some(p) = extents.last() {
                e.offset = e.offset.wrapping_add(predicted_offset(p, &e));
            }
            ensure!(
                e.block < blocks,
                "manifest extent for block {} is beyond the volume",
                e.block
            );
            if let Some(prev) = extents.last() {
                let prev: &Extent = prev;
                ensure!(prev.block < e.block, "manifest extents are not sorted");
            }
            let Some(pack) = header.packs.get(e.pack as usize) else {
                bail!(
                    "manifest extent names pack {} of {}",
                    e.pack,
                    header.packs.len()
                );
            };
            ensure!(
                e.stored_len > 0 && e.stored_len <= bs,
                "manifest extent for block {} has stored length {}",
                e.block,
                e.stored_len
            );
            ensure!(
                u64::from(e.offset) + u64::from(e.stored_len) <= pack.len,
                "manifest extent for block {} is beyond its pack",
                e.block
            );
            extents.push(e);
        }
        Ok(Manifest { header, extents })
    }
}

/// Appends `values` run-length coded: runs u64, then (value u64, count u64) per run, LE.
fn rle(out: &mut Vec<u8>, values: impl Iterator<Item = u64>) {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for v in values {
        match runs.last_mut() {
            Some((last, n)) if *last == v => *n += 1,
            _ => runs.push((v, 1)),
        }
    }
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for (v, n) in runs {
        out.extend_from_slice(&v.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.0.len() >= n, "manifest is truncated");
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    /// A run-length coded column of exactly `n` values, as its runs.
    fn runs(&mut self, n: usize) -> Result<Runs> {
        let count = usize::try_from(self.u64()?)?;
        ensure!(
            count <= n && count <= self.0.len() / 16,
            "manifest column is damaged"
        );
        let mut runs = Vec::with_capacity(count);
        let mut total = 0usize;
        for _ in 0..count {
            let v = self.u64()?;
            let c = usize::try_from(self.u64()?)?;
            ensure!(c > 0 && c <= n - total, "manifest column is damaged");
            total += c;
            runs.push((v, c));
        }
        ensure!(total == n, "manifest column is damaged");
        runs.reverse();
        Ok(Runs(runs))
    }
}

/// A column's runs, consumed front to back (stored reversed).
struct Runs(Vec<(u64, usize)>);

impl Runs {
    /// The next value; called exactly as many times as the column has values.
    fn next_value(&mut self) -> u64 {
        match self.0.last_mut() {
            Some((v, c)) => {
                let v = *v;
                *c -= 1;
                if *c == 0 {
                    self.0.pop();
                }
                v
            }
            None => 0,
        }
    }
}

/// Where `e`'s record would start if it followed `prev`'s in the same pack.
fn predicted_offset(prev: &Extent, e: &Extent) -> u32 {
    if prev.pack == e.pack {
        prev.offset.wrapping_add(prev.stored_len)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn sample(n: u64) -> Manifest {
        Manifest {
            header: Header {
                volume: "vm".into(),
                checkpoint: "c1".into(),
                size: 1 << 30,
                block_size: 4096,
                lz4: false,
                created_unix: 1,
                base: Some("vm@c0".into()),
                push_id: "ab".into(),
                packs: vec![PackRef {
                    key: "packs/ab-000000.pack".into(),
                    len: 4096 * n,
                }],
            },
            extents: (0..n)
                .map(|i| Extent {
                    block: i * 3,
                    pack: 0,
                    offset: (i * 4096) as u32,
                    stored_len: 4096,
                    crc: i as u32,
                    lz4: i % 2 == 0,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample(1000);
        assert_eq!(Manifest::decode(&m.encode().unwrap()).unwrap(), m);
    }

    #[test]
    fn bad_extents_are_refused() {
        let mut m = sample(4);
        m.extents[2].block = m.extents[1].block;
        let err = Manifest::decode(&m.encode().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not sorted"), "{err}");
        let mut m = sample(4);
        m.extents[3].offset = 4096 * 4;
        assert!(Manifest::decode(&m.encode().unwrap()).is_err());
        let mut m = sample(4);
        m.extents[0].pack = 1;
        assert!(Manifest::decode(&m.encode().unwrap()).is_err());
        let mut m = sample(4);
        m.extents[3].block = (1 << 30) / 4096;
        assert!(Manifest::decode(&m.encode().unwrap()).is_err());
    }

    proptest! {
        /// Any valid extent list survives the column coding (runs, predicted offsets across
        /// pack changes, wrapping deltas, mixed flags).
        #[test]
        fn any_extents_round_trip(
            raw in proptest::collection::vec((1u64..5, 0u32..3, 0u32..8192, 1u32..=4096, any::<u32>(), any::<bool>()), 0..300)
        ) {
            let mut block = 0u64;
            let extents: Vec<Extent> = raw
                .iter()
                .map(|&(step, pack, offset, stored_len, crc, lz4)| {
                    block += step;
                    Extent { block, pack, offset, stored_len, crc, lz4 }
                })
                .collect();
            let mut m = sample(0);
            m.header.packs = (0..3)
                .map(|i| PackRef { key: format!("packs/x-{i}.pack"), len: 1 << 20 })
                .collect();
            m.extents = extents;
            prop_assert_eq!(Manifest::decode(&m.encode().unwrap()).unwrap(), m);
        }

        /// Any single flipped bit, and any truncation, is detected.
        #[test]
        fn damage_is_detected(bit in 0usize..8 * 600, cut in 0usize..600) {
            let bytes = sample(50).encode().unwrap();
            let mut flipped = bytes.clone();
            let i = bit / 8 % flipped.len();
            flipped[i] ^= 1 << (bit % 8);
            prop_assert!(Manifest::decode(&flipped).is_err());
            let cut = cut % bytes.len();
            prop_assert!(Manifest::decode(&bytes[..cut]).is_err());
        }
    }
}
