//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), which aya 0.16 does not wrap: a whole hash map in a
//! few syscalls, where aya's iterators cost two per entry (next key, then lookup). The
//! exporter reads the counter and NAT maps on every scrape, and a busy NAT table holds
//! hundreds of thousands of entries.
//!
//! The kernel walks the hash table bucket by bucket, so entries added or removed meanwhile are
//! seen at most once; the per-key walk restarts from the first key when its cursor key is
//! deleted under it.

use std::{io, os::fd::BorrowedFd};

use aya::Pod;

use crate::sys;

/// Elements asked for per call; a bucket with more entries than this makes the kernel answer
/// ENOSPC, and the call is repeated with room for twice as many.
const FIRST_CHUNK: usize = 1024;
const MAX_CHUNK: usize = 1 << 20;

/// Calls `each(key, value bytes)` for every entry of the hash map behind `fd`. `value_size` is
/// the size the kernel copies per element: the value's size, or for per-CPU maps the value
/// rounded up to 8 bytes times the number of possible CPUs.
pub(super) fn for_each<K: Pod>(
    fd: BorrowedFd<'_>,
    value_size: usize,
    mut each: impl FnMut(K, &[u8]),
) -> io::Result<()> {
    let key_size = size_of::<K>();
    let mut chunk = FIRST_CHUNK;
    let mut keys = vec![0u8; chunk * key_size];
    let mut values = vec![0u8; chunk * value_size];
    // The kernel's cursor for hash maps is a bucket index (u32); u64 leaves room.
    let mut cursor_in = 0u64;
    let mut cursor_out = 0u64;
    let mut started = false;
    loop {
        // SAFETY: the key and value buffers hold `chunk` elements of the sizes the kernel
        // copies for this map: `K` is the map's key type, and `value_size` is its per-element
        // value size as documented above (the callers pass the map's value type, or its
        // per-CPU size). This is the one unsafe block outside `sys`: only the caller of the
        // batch call knows the map behind the descriptor.
        let (count, err) = unsafe {
            sys::bpf_map_lookup_batch(
                fd,
                started.then_some(&cursor_in),
                &mut cursor_out,
                &mut keys,
                &mut values,
                u32::try_from(chunk).expect("chunk fits u32"),
            )
        };
        match err.as_ref().and_then(io::Error::raw_os_error) {
            Some(libc::ENOSPC) if chunk < MAX_CHUNK => {
                chunk *= 2;
                keys.resize(chunk * key_size, 0);
                values.resize(chunk * value_size, 0);
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.expect("an error")),
        }
        for i in 0..count as usize {
            let key = sys::pod_from_bytes::<K>(&keys[i * key_size..][..key_size]);
            each(key, &values[i * value_size..][..value_size]);
        }
        if err.is_some() {
            // ENOENT: that was the last batch.
            return Ok(());
        }
        cursor_in = cursor_out;
        started = true;
    }
}

/// Reads a `T` from the start of `bytes`.
pub(super) fn read<T: Pod>(bytes: &[u8]) -> T {
    sys::pod_from_bytes(bytes)
}
