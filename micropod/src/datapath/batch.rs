//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), which aya 0.16 does not wrap: a whole hash map in a
//! few syscalls, where aya's iterators cost two per entry (next key, then lookup). The
//! exporter reads the counter and NAT maps on every scrape, and a busy NAT table holds
//! hundreds of thousands of entries.
//!
//! The kernel walks the hash table bucket by bucket, so entries added or removed meanwhile are
//! seen at most once; the per-key walk restarts from the first key when its cursor key is
//! deleted under it.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

/// `enum bpf_cmd` in linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Elements asked for per call; a bucket with more entries than this makes the kernel answer
/// ENOSPC, and the call is repeated with room for twice as many.
const FIRST_CHUNK: usize = 1024;
const MAX_CHUNK: usize = 1 << 20;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

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
        let mut attr = BatchAttr {
            in_batch: if started {
                (&raw const cursor_in) as u64
            } else {
                0
            },
            out_batch: (&raw mut cursor_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).expect("chunk fits u32"),
            map_fd: u32::try_from(fd.as_raw_fd()).expect("fds are not negative"),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` of the size passed; the key and value
        // buffers hold `chunk` elements of the sizes the kernel copies (key size, and
        // `value_size` as documented above), and both cursors are live u64s. The kernel writes
        // only into those buffers, the cursor and `attr.count`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
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
        for i in 0..attr.count as usize {
            let key = &keys[i * key_size..][..key_size];
            // SAFETY: `K: Pod` is valid for any bit pattern of its size, and `key` is exactly
            // `size_of::<K>()` bytes; the read is unaligned-safe.
            let key = unsafe { std::ptr::read_unaligned(key.as_ptr().cast::<K>()) };
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
    assert!(bytes.len() >= size_of::<T>(), "short map value");
    // SAFETY: `T: Pod` is valid for any bit pattern, `bytes` holds at least `size_of::<T>()`
    // bytes, and the read does not assume alignment.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}
