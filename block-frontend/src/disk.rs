//! What a frontend needs from a volume, as a trait so request handling is tested without an
//! engine, and its implementation for engine volumes.

/// Any failure is reported to the guest as IOERR; the detail goes to the log.
#[derive(Debug)]
pub struct DiskError;

pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Serial number shown to the guest (GET_ID).
    fn id(&self) -> &str;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    /// Reads consecutive bytes from `offset` into `bufs` in order (a request's guest
    /// buffers; only their total is a multiple of 512).
    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), DiskError> {
        if let [one] = bufs {
            return self.read(offset, one);
        }
        let total = bufs.iter().map(|b| b.len()).sum();
        let mut tmp = vec![0u8; total];
        self.read(offset, &mut tmp)?;
        let mut at = 0;
        for b in bufs.iter_mut() {
            b.copy_from_slice(&tmp[at..at + b.len()]);
            at += b.len();
        }
        Ok(())
    }
    /// Writes `bufs`, in order, as consecutive bytes from `offset`. The buffers are guest
    /// memory, which the guest may change meanwhile: implementations copy what they keep.
    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), DiskError> {
        if let [one] = bufs {
            return self.write(offset, one);
        }
        self.write(offset, &bufs.concat())
    }
    fn flush(&self) -> Result<(), DiskError>;
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError>;
}

#[cfg(feature = "engine")]
use strata_engine::Volume;

#[cfg(feature = "engine")]
fn logged<T>(what: &str, vol: &Volume, r: strata_engine::Result<T>) -> Result<T, DiskError> {
    r.map_err(|e| {
        if matches!(e, strata_engine::Error::QuotaExceeded { .. }) {
            // Expected of a guest filling its disk; counted in the volume's metrics.
            tracing::debug!(volume = vol.name(), error = %e, "{what} refused");
        } else {
            tracing::warn!(volume = vol.name(), error = %e, "{what} failed");
        }
        DiskError
    })
}

#[cfg(feature = "engine")]
impl Disk for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn id(&self) -> &str {
        self.name()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        logged("read", self, Volume::read(self, offset, buf))
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        logged("write", self, Volume::write(self, offset, data))
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<(), DiskError> {
        logged("read", self, Volume::read_vectored(self, offset, bufs))
    }
    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<(), DiskError> {
        logged("write", self, Volume::write_vectored(self, offset, bufs))
    }
    fn flush(&self) -> Result<(), DiskError> {
        logged("flush", self, Volume::flush(self))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        logged("discard", self, Volume::discard(self, offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        logged(
            "write-zeroes",
            self,
            Volume::write_zeroes(self, offset, len),
        )
    }
}
