//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), which aya 0.16 does not wrap, reading map elements
//! out of the bytes it copies, and what a pinned TCX link is attached to (aya's `LinkInfo`
//! has the program but not the device).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

use aya::Pod;

/// `enum bpf_cmd` in linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The `link_update` member of `union bpf_attr` (`BPF_LINK_UPDATE`).
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The `obj` member of `union bpf_attr` (`BPF_OBJ_GET`).
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// The `info` member of `union bpf_attr` (`BPF_OBJ_GET_INFO_BY_FD`).
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` with its `tcx` member: type, id, prog_id, then the
/// union (8-byte aligned, at offset 16), of which `tcx` is `{ ifindex, attach_type }`. The
/// kernel copies at most `info_len` bytes and zero-fills nothing beyond.
#[repr(C)]
#[derive(Default)]
struct TcxLinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    attach_type: u32,
}

const _: () = assert!(size_of::<TcxLinkInfo>() == 24);

/// What the link pinned at `path` is: its program's id, and for a TCX link the device
/// (ifindex, 0 once the device is gone) and the attach type (`BPF_TCX_INGRESS` 46,
/// `BPF_TCX_EGRESS` 47).
pub(crate) fn pinned_link(path: &Path) -> io::Result<(u32, u32, u32)> {
    let fd = obj_get(path)?;
    let mut info = TcxLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).expect("fds are not negative"),
        info_len: size_of::<TcxLinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` is a valid `bpf_attr.info` of the size passed; `info` is a live buffer
    // of `info_len` bytes, the most the kernel writes; `fd` is open for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.prog_id, info.ifindex, info.attach_type))
}

/// Opens the BPF object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: `get` is a valid `bpf_attr.obj` of the size passed, naming a NUL-terminated
    // path that outlives the call; the kernel only reads it and returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw mut get,
            size_of::<ObjAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).expect("fds fit an int");
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the link pinned at `path` run `program` instead of its current one, atomically: the
/// hook never runs neither (`BPF_LINK_UPDATE`).
pub(crate) fn update_pinned_link(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let link = obj_get(path)?;
    let mut attr = LinkUpdateAttr {
        link_fd: u32::try_from(link.as_raw_fd()).expect("fds are not negative"),
        new_prog_fd: u32::try_from(program.as_raw_fd()).expect("fds are not negative"),
        ..LinkUpdateAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr.link_update` of the size passed; both fds are
    // open for the call; the kernel only reads it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw mut attr,
            size_of::<LinkUpdateAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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
