//! Errors the engine reports. Each variant names the step that failed; messages are short and
//! do not repeat their source.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not a Strata store (no store metadata found, and it is not empty)")]
    NotAStore { path: PathBuf },
    #[error("no store at {path} (pass create to make one)")]
    NoStore { path: PathBuf },
    #[error("store format version {found} is not supported (this build reads version {expected})")]
    FormatVersion { found: u32, expected: u32 },
    #[error("store metadata is damaged: {0}")]
    Corrupt(String),
    #[error("opening store directory {path}")]
    StoreDir { path: PathBuf, source: io::Error },
    #[error("metadata database")]
    Db(#[from] rocksdb::Error),
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    #[error("checkpoint {volume}@{name} already exists")]
    CheckpointExists { volume: String, name: String },
    #[error("no checkpoint {volume}@{name}")]
    NoSuchCheckpoint { volume: String, name: String },
    #[error("volume {0:?} is open; close it first")]
    VolumeBusy(String),
    #[error(
        "checkpoint {volume}@{name} is open (an export or a job is reading it); close it first"
    )]
    CheckpointBusy { volume: String, name: String },
    #[error("offset {offset} and length {len} must be multiples of 512")]
    Misaligned { offset: u64, len: u64 },
    #[error("range {offset}+{len} is beyond the end of volume {volume:?} ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("remote data for {volume:?} at byte offset {offset}: {detail}")]
    Remote {
        volume: String,
        offset: u64,
        detail: String,
    },
    #[error("checksum mismatch in volume {volume:?} at byte offset {offset}")]
    Checksum { volume: String, offset: u64 },
    #[error("{op} failed")]
    Io { op: &'static str, source: io::Error },
    #[error("no space left on the store's filesystem")]
    NoSpace,
    #[error("volume {volume:?} is at its quota of {quota} allocated bytes")]
    QuotaExceeded { volume: String, quota: u64 },
    #[error("store stopped accepting writes after an IO failure; reopen it to recover")]
    Poisoned,
    #[error("too many concurrent writers to one block of volume {0:?}; retry")]
    Contention(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace;
        }
        Error::Io { op, source }
    }
}
