//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), which aya 0.16 does not wrap, and reading map
//! elements out of the bytes it copies.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

/// `enum bpf_cmd` in linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

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

/// One `BPF_MAP_LOOKUP_BATCH` on the map behind `map`: up to `count` elements into `keys` and
/// `values`, continuing from the cursor `in_batch` (`None`: from the start) and leaving the
/// next cursor in `out_batch`. Returns what the kernel left in `count` (the elements copied;
/// after `ENOSPC`, the room the bucket needs) and the call's error: `ENOENT` says this was
/// the last batch, with elements copied all the same.
///
/// # Safety
///
/// `keys` and `values` must each hold `count` elements of the sizes the kernel copies for
/// this map: its key size, and its value size (per-CPU maps: rounded up to 8 bytes, times the
/// number of possible CPUs). The kernel does not know the buffers' lengths; only the caller
/// knows the map.
pub(crate) unsafe fn bpf_map_lookup_batch(
    map: BorrowedFd<'_>,
    in_batch: Option<&u64>,
    out_batch: &mut u64,
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> (u32, Option<io::Error>) {
    let mut attr = BatchAttr {
        in_batch: in_batch.map_or(0, |cursor| std::ptr::from_ref(cursor) as u64),
        out_batch: (&raw mut *out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: u32::try_from(map.as_raw_fd()).expect("fds are not negative"),
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr.batch` of the size passed; the key and value
    // buffers hold `count` elements of the sizes the kernel copies (the caller's contract),
    // both cursors are live u64s (the kernel's hash-map cursor is a u32 bucket index) and
    // `map` is open while borrowed. The kernel writes only into those buffers, `out_batch`
    // and `attr.count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    (attr.count, (ret < 0).then(io::Error::last_os_error))
}

/// Reads a `T` from the start of `bytes` (which must hold at least `size_of::<T>()`).
#[must_use]
pub(crate) fn pod_from_bytes<T: Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>(), "short map value");
    // SAFETY: `T: Pod` is valid for any bit pattern, `bytes` holds at least `size_of::<T>()`
    // bytes, and the read does not assume alignment.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}
