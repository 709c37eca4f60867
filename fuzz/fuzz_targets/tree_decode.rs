#![no_main]
//! A tree volume's metadata blocks come back from disk (or from a remote a checkpoint was
//! pulled from): decoding arbitrary bytes as a directory bucket, a superblock, an inode or an
//! xattr blob must never panic, and a bucket that decodes must encode to bytes that decode to
//! the same bucket.

use libfuzzer_sys::fuzz_target;

#[path = "../../fuse-frontend/src/tree/format.rs"]
#[allow(dead_code)]
mod format;

fuzz_target!(|data: &[u8]| {
    let mut block = data.to_vec();
    block.resize(format::BS as usize, 0);
    if let Ok(b) = format::Bucket::decode(&block) {
        let again = format::Bucket::decode(&b.encode()).expect("an encoded bucket decodes");
        assert_eq!(again, b);
    }
    let _ = format::Super::decode(data);
    if data.len() >= format::INODE_SIZE as usize {
        let i = format::Inode::decode(&data[..format::INODE_SIZE as usize]);
        let mut slot = [0u8; 256];
        i.encode_into(&mut slot);
        assert_eq!(format::Inode::decode(&slot), i);
    }
    let _ = format::check_xattrs(data);
    for e in format::xattr_entries(data) {
        if let Ok((start, name, value)) = e {
            assert!(start < name.start && name.end <= value.start && value.end <= data.len());
        }
    }
});
