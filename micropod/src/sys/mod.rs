//! The raw system calls micropod makes itself, behind safe functions (as aya's `sys` module
//! does): every `unsafe` block of the crate but one lives here, each with its `// SAFETY:`
//! argument. Callers get `io::Error` (or nix's [`Errno`](nix::errno::Errno) where their
//! errors already carry one) and owned descriptors.
//!
//! - [`net`]: the tun ioctls and `SIOCGIFINDEX` on one [`IfReq`], the `SIOCGIFINDEX`
//!   socket, `SO_RCVTIMEO`, `NS_GET_NSTYPE`, `poll`.
//! - [`process`]: pidfds, the `pre_exec` hooks (`setsid`, `PR_SET_PDEATHSIG`), `getrandom`,
//!   `capget`, the `SIGPIPE` disposition.
//! - [`kvm`]: the KVM probe's two ioctls.
//! - [`bpf`]: `BPF_MAP_LOOKUP_BATCH` (an `unsafe fn`: only the caller knows the map's element
//!   sizes) and reading a [`Pod`](aya::Pod) from map bytes.

pub(crate) mod bpf;
pub(crate) mod kvm;
pub(crate) mod net;
pub(crate) mod process;

pub(crate) use self::{
    bpf::{bpf_map_lookup_batch, pod_from_bytes},
    kvm::{kvm_api_version, kvm_create_vm},
    net::{
        IfReq, if_index, inet_dgram_socket, ns_type, poll_readable, set_receive_timeout,
        tun_get_iff, tun_set_iff, tun_set_owner, tun_set_persist,
    },
    process::{
        die_on_sigpipe, effective_capabilities, getrandom, kill_on_parent_death, pidfd_open,
        pidfd_send_signal, setsid_on_exec,
    },
};
