//! The manifest of a pushed checkpoint: self-contained (restoring needs this object and the
//! packs it names, never another manifest) and checksummed end to end.
//!
//! ```text
//! "STRATAMF" | format u32 LE | body length u64 LE | body | crc32 u32 LE of everything before
//! body = lz4 (size-prepended) of: header length u32 LE | header JSON | extents
//! extent (25 bytes, LE): block u64 | pack index u32 | offset u32 | stored_len u32 | crc32 u32 | flags u8 (bit0 lz4)
//! ```
//!
//! Extents are sorted by block, one per mapped block; `crc32` is the engine's checksum of the
//! record's stored bytes, so a fetched block is verified with no extra hashing.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"STRATAMF";
const FORMAT: u32 = 1;
const EXTENT_LEN: usize = 25;
/// Bound on a decoded body: about 43 million mapped blocks (160 GiB of 4 KiB blocks).
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
        let mut raw = Vec::with_capacity(4 + header.len() + self.extents.len() * EXTENT_LEN);
        raw.extend_from_slice(&u32::try_from(header.len())?.to_le_bytes());
        raw.extend_from_slice(&header);
        for e in &self.extents {
            raw.extend_from_slice(&e.block.to_le_bytes());
            raw.extend_from_slice(&e.pack.to_le_bytes());
            raw.extend_from_slice(&e.offset.to_le_bytes());
            raw.extend_from_slice(&e.stored_len.to_le_bytes());
            raw.extend_from_slice(&e.crc.to_le_bytes());
            raw.push(u8::from(e.lz4));
        }
        ensure!(
            raw.len() <= MAX_BODY,
            "manifest too large ({} bytes)",
            raw.len()
        );
        let body = lz4_flex::block::compress_prepend_size(&raw);
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
        ensure!(body.len() >= 4, "manifest body is truncated");
        let claimed = u32::from_le_bytes(body[..4].try_into()?) as usize;
        ensure!(
            claimed <= MAX_BODY,
            "manifest body too large ({claimed} bytes)"
        );
        let raw = lz4_flex::block::decompress_size_prepended(body)
            .map_err(|e| anyhow::anyhow!("manifest body does not decode: {e}"))?;
        ensure!(raw.len() >= 4, "manifest body is truncated");
        let hlen = u32::from_le_bytes(raw[..4].try_into()?) as usize;
        ensure!(raw.len() >= 4 + hlen, "manifest header is truncated");
        let header: Header =
            serde_json::from_slice(&raw[4..4 + hlen]).context("manifest header")?;
        let rest = &raw[4 + hlen..];
        ensure!(
            rest.len() % EXTENT_LEN == 0,
            "manifest extents are truncated"
        );
        let bs = header.block_size;
        ensure!(
            bs.is_power_of_two() && (4096..=1 << 20).contains(&bs),
            "manifest block size {bs} is invalid"
        );
        let blocks = header.size.div_ceil(u64::from(bs));
        let mut extents = Vec::with_capacity(rest.len() / EXTENT_LEN);
        for c in rest.chunks_exact(EXTENT_LEN) {
            let u32_at = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
            let e = Extent {
                block: u64::from_le_bytes(c[..8].try_into()?),
                pack: u32_at(8),
                offset: u32_at(12),
                stored_len: u32_at(16),
                crc: u32_at(20),
                lz4: c[24] & 1 != 0,
            };
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
