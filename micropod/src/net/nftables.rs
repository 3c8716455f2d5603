//! nf_tables over netlink: micropod's MASQUERADE fallback, in an `ip` table of its own.
//!
//! Requests are built with libnftnl and sent with libmnl (Mullvad's `nftnl`/`mnl` bindings) on a
//! `NETLINK_NETFILTER` socket; no `nft` binary is run. The socket is opened by the calling
//! thread, so every function acts on the network namespace of the calling thread.
//!
//! Changes go out as one batch, which nf_tables applies as one transaction: either all of it
//! takes effect or none of it. Every message asks for an acknowledgement and every
//! acknowledgement is checked, so a refused batch is an error, never silently ignored.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::{CStr, CString},
    fmt, io,
    net::Ipv4Addr,
    time::Duration,
};

use ipnetwork::Ipv4Network;
use mnl::CbResult;
use nftnl::{
    Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, NlMsg, Policy, ProtoFamily, Rule,
    Table,
    expr::{Immediate, Register},
    nft_expr,
};

use super::link::{self, IFNAME_MAX, LinkError};
use crate::sys;

/// The one base chain of the table.
pub const CHAIN: &str = "postrouting";
const CHAIN_C: &CStr = c"postrouting";
/// `NF_IP_PRI_NAT_SRC`, the priority `nft` calls `srcnat`.
pub const SRCNAT_PRIORITY: i32 = 100;
/// Longest table name nf_tables accepts (`NFT_NAME_MAXLEN` minus the NUL).
pub const TABLE_NAME_MAX: usize = 255;
/// How long to wait for each answer from the kernel: an error instead of a hang should it ever
/// not answer (it answers at once in practice, even when loading modules).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// micropod's MASQUERADE fallback for one network, in an `ip` family table of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Masquerade<'a> {
    /// Name of the `ip` table; micropod owns the whole table.
    pub table: &'a str,
    /// Sources to masquerade. Host bits are ignored (10.10.0.1/24 means 10.10.0.0/24).
    pub subnet: Ipv4Network,
    /// Traffic leaving through this interface (guest to guest) keeps its source address.
    pub bridge: &'a str,
    /// The source ports translated flows get (TCP, UDP; ICMP echo ids too).
    pub ports: super::ports::PortRange,
}

/// One request inside a batch (or the batch itself), to say which one the kernel refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The batch as a whole: its begin/end messages, the permission check, the commit.
    Batch,
    AddTable,
    DeleteTable,
    AddChain,
    AddRule,
    ListTables,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Batch => "run the transaction",
            Self::AddTable => "create the table",
            Self::DeleteTable => "delete the table",
            Self::AddChain => "create the nat chain postrouting",
            Self::AddRule => "add the masquerade rule",
            Self::ListTables => "list the tables",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("invalid nf_tables table name {name:?}: use 1-{TABLE_NAME_MAX} bytes without NUL")]
    InvalidTableName { name: String },
    #[error("invalid bridge name for the masquerade rule")]
    InvalidBridgeName(#[source] LinkError),
    #[error(
        "cannot open a netfilter netlink socket (is nfnetlink available in this kernel? \
         modprobe nfnetlink)"
    )]
    OpenSocket(#[source] io::Error),
    #[error("cannot send the nf_tables batch for table ip {table}")]
    SendBatch {
        table: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "no answer from nf_tables about table ip {table} within {waited:?}; a batch may or may \
         not have been applied (check with `nft list table ip {table}`)"
    )]
    Timeout { table: String, waited: Duration },
    #[error("cannot read the kernel's answer to the nf_tables batch for table ip {table}")]
    Receive {
        table: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "nf_tables refused to {step} for table ip {table} ({hint}); the transaction was rolled \
         back, nothing changed"
    )]
    Refused {
        table: String,
        step: Step,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot ask nf_tables for its ip tables (looking for table ip {table})")]
    SendDump {
        table: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the nf_tables ip tables (looking for table ip {table}): {hint}")]
    Dump {
        table: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Atomically (one netlink batch = one nf_tables transaction) (re)creates table `ip <table>`
/// holding exactly one base chain `postrouting` (type nat, hook postrouting, priority 100 =
/// srcnat, policy accept) with exactly three rules:
/// `ip saddr <subnet> oifname != "<bridge>" meta l4proto tcp counter masquerade to :<ports>`,
/// the same for udp, and `ip saddr <subnet> oifname != "<bridge>" counter masquerade` for the
/// rest (`nft` itself only maps ports after a protocol match).
///
/// Idempotent: whatever the table held before (even chains or rules added by hand) is replaced.
/// Acts on the calling thread's network namespace; needs CAP_NET_ADMIN there.
pub fn apply(m: &Masquerade<'_>) -> Result<(), NftError> {
    let name = table_name(m.table)?;
    let oifname = padded_ifname(m.bridge)?;

    let table = Table::new(&name, ProtoFamily::Ipv4);
    let mut chain = Chain::new(CHAIN_C, &table);
    chain.set_type(ChainType::Nat);
    chain.set_hook(Hook::PostRouting, SRCNAT_PRIORITY);
    chain.set_policy(Policy::Accept);

    let rules = [Some(libc::IPPROTO_TCP), Some(libc::IPPROTO_UDP), None]
        .map(|proto| masquerade_rule(&chain, m, &oifname, proto));

    let mut tx = Transaction::default();
    // Add first so the delete cannot fail with ENOENT, then delete so the table starts empty:
    // the commit swaps the old table for the new one at once, with no window without NAT.
    tx.add(&table, MsgType::Add, Step::AddTable);
    tx.add(&table, MsgType::Del, Step::DeleteTable);
    tx.add(&table, MsgType::Add, Step::AddTable);
    tx.add(&chain, MsgType::Add, Step::AddChain);
    for rule in &rules {
        tx.add(rule, MsgType::Add, Step::AddRule);
    }
    tx.run(m.table)
}

/// One rule of the chain: for TCP or UDP (`proto`) with the port range, else for the rest
/// (ICMP and anything else without ports nf_tables could map).
fn masquerade_rule<'c>(
    chain: &'c Chain<'_>,
    m: &Masquerade<'_>,
    oifname: &[u8],
    proto: Option<i32>,
) -> Rule<'c> {
    let mut rule = Rule::new(chain);
    rule.add_expr(&nft_expr!(payload ipv4 saddr));
    let (mask, network) = saddr_match(m.subnet);
    if let Some(mask) = mask {
        rule.add_expr(&nft_expr!(bitwise mask mask, xor Ipv4Addr::UNSPECIFIED));
    }
    rule.add_expr(&nft_expr!(cmp == network));
    rule.add_expr(&nft_expr!(meta oifname));
    rule.add_expr(&nft_expr!(cmp != oifname));
    if let Some(proto) = proto {
        rule.add_expr(&nft_expr!(meta l4proto));
        rule.add_expr(&nft_expr!(cmp == proto as u8));
    }
    rule.add_expr(&nft_expr!(counter));
    if proto.is_some() {
        // Ports go into the registers in network order, as `nft` puts them.
        rule.add_expr(&Immediate::new(m.ports.min.to_be_bytes(), Register::Reg1));
        rule.add_expr(&Immediate::new(m.ports.max.to_be_bytes(), Register::Reg2));
        rule.add_expr(&sys::nft::MasqueradePorts {
            min: Register::Reg1,
            max: Register::Reg2,
        });
    } else {
        rule.add_expr(&nft_expr!(masquerade));
    }
    rule
}

/// Deletes table `ip <table>` with everything in it; `Ok(false)` when it did not exist.
pub fn delete(table: &str) -> Result<bool, NftError> {
    let name = table_name(table)?;
    let mut tx = Transaction::default();
    tx.add(
        &Table::new(&name, ProtoFamily::Ipv4),
        MsgType::Del,
        Step::DeleteTable,
    );
    match tx.run(table) {
        Ok(()) => Ok(true),
        // Asking the kernel (instead of checking first) leaves no window for a race.
        Err(NftError::Refused {
            step: Step::DeleteTable,
            source,
            ..
        }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether table `ip <table>` exists (only the `ip` family counts: an `inet` table of the same
/// name is somebody else's).
pub fn exists(table: &str) -> Result<bool, NftError> {
    let name = table_name(table)?;
    Ok(ip_tables(table)?.contains(&name))
}

/// Names of all `ip` family tables.
fn ip_tables(table: &str) -> Result<HashSet<CString>, NftError> {
    // The dump is marked interrupted when the ruleset changes under it; another try is cheap.
    const ATTEMPTS: usize = 3;
    const SEQ: u32 = 1;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let socket = open_socket()?;
        let portid = socket.portid();
        let mut request = nftnl::table::get_tables_nlmsg(SEQ);
        // get_tables_nlmsg asks for every family; the `nfgenmsg` right after the 16-byte
        // `nlmsghdr` starts with the family, and the kernel then dumps only that family's tables.
        request[NLMSG_HDRLEN] = ProtoFamily::Ipv4 as u8;
        // The buffer is sized for the largest message; send only the message itself.
        request.truncate(nlmsg_len(&request));
        socket.send(&request).map_err(|source| NftError::SendDump {
            table: table.into(),
            source,
        })?;

        let mut names = HashSet::new();
        let mut buffer = RecvBuffer::new();
        let result = loop {
            let received = socket.recv_raw(buffer.as_mut_slice());
            let done = received.and_then(|n| {
                mnl::cb_run2(
                    &buffer.as_mut_slice()[..n],
                    SEQ,
                    portid,
                    nftnl::table::get_tables_cb,
                    &mut names,
                )
            });
            match done {
                Ok(CbResult::Stop) => break Ok(names),
                Ok(CbResult::Ok) => {}
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(names) => return Ok(names),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => last = Some(e),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(NftError::Timeout {
                    table: table.into(),
                    waited: ANSWER_TIMEOUT,
                });
            }
            Err(source) => {
                return Err(NftError::Dump {
                    table: table.into(),
                    hint: hint(Step::ListTables, source.raw_os_error()),
                    source,
                });
            }
        }
    }
    let source = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINTR));
    Err(NftError::Dump {
        table: table.into(),
        hint: hint(Step::ListTables, source.raw_os_error()),
        source,
    })
}

/// A batch being built, with what each message does, to name the one the kernel refuses.
#[derive(Default)]
struct Transaction {
    batch: Batch,
    steps: Vec<Step>,
}

impl Transaction {
    fn add(&mut self, msg: &impl NlMsg, kind: MsgType, step: Step) {
        self.batch.add(msg, kind);
        self.steps.push(step);
    }

    /// Sends the batch and waits for every acknowledgement; the first error wins.
    fn run(self, table: &str) -> Result<(), NftError> {
        let Self { batch, steps } = self;
        let batch = batch.finalize();
        let mut pending = expected_acks(&batch, &steps);

        let socket = open_socket()?;
        let portid = socket.portid();
        socket
            .send_all(&batch)
            .map_err(|source| NftError::SendBatch {
                table: table.into(),
                source,
            })?;

        let receive_error = |source: io::Error| match source.kind() {
            io::ErrorKind::WouldBlock => NftError::Timeout {
                table: table.into(),
                waited: ANSWER_TIMEOUT,
            },
            _ => NftError::Receive {
                table: table.into(),
                source,
            },
        };
        let mut buffer = RecvBuffer::new();
        while !pending.is_empty() {
            let buf = buffer.as_mut_slice();
            let n = socket.recv_raw(buf).map_err(receive_error)?;
            for message in mnl::NlMessages::new(&buf[..n]) {
                let message = message.map_err(receive_error)?;
                let seq = nlmsg_seq(message);
                // Kernels before 6.10 answer for the batch begin message (permission check,
                // missing nf_tables) with sequence number 0, as nftnl sends it unnumbered.
                let step = match pending.get(&seq) {
                    Some(&step) => step,
                    None if seq == 0 => Step::Batch,
                    None => {
                        return Err(receive_error(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("answer with unexpected sequence number {seq}"),
                        )));
                    }
                };
                // cb_run checks port id and sequence number and turns an NLMSG_ERROR with a
                // non-zero code into that errno; an ACK (error 0) is MNL_CB_STOP.
                match mnl::cb_run(message, seq, portid) {
                    Ok(CbResult::Stop) => {
                        pending.remove(&seq);
                    }
                    // Not an acknowledgement (we ask for no echo, so nothing is expected):
                    // keep waiting for the real one.
                    Ok(CbResult::Ok) => {}
                    Err(source) => {
                        return Err(NftError::Refused {
                            table: table.into(),
                            step,
                            hint: hint(step, source.raw_os_error()),
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Which step each acknowledged sequence number belongs to. nftnl numbers the batch begin and
/// end messages (and asks for their ACK) only on kernels that honour it (>= 6.10); the range
/// it reports tells which case this is.
fn expected_acks(batch: &FinalizedBatch, steps: &[Step]) -> BTreeMap<u32, Step> {
    ack_map(batch.sequence_numbers(), steps)
}

fn ack_map(seqs: std::ops::Range<u32>, steps: &[Step]) -> BTreeMap<u32, Step> {
    let framed = seqs.len() == steps.len() + 2;
    let mut order = Vec::with_capacity(steps.len() + 2);
    if framed {
        order.push(Step::Batch);
    }
    order.extend_from_slice(steps);
    if framed {
        order.push(Step::Batch);
    }
    seqs.zip(order).collect()
}

fn open_socket() -> Result<mnl::Socket, NftError> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NftError::OpenSocket)?;
    // mnl has no timeout of its own, and nix is built without its socket feature.
    sys::set_receive_timeout(&socket, ANSWER_TIMEOUT).map_err(NftError::OpenSocket)?;
    Ok(socket)
}

/// What to tell the user about an errno the kernel answered `step` with.
fn hint(step: Step, errno: Option<i32>) -> &'static str {
    match (step, errno) {
        (Step::AddTable | Step::DeleteTable, Some(libc::EPERM)) => {
            "needs CAP_NET_ADMIN in this network namespace; or the table is owned by another \
             process"
        }
        (_, Some(libc::EPERM | libc::EACCES)) => "needs CAP_NET_ADMIN in this network namespace",
        (Step::AddChain, Some(libc::ENOENT | libc::EOPNOTSUPP)) => {
            "is nf_tables NAT available? (modprobe nft_chain_nat)"
        }
        (Step::AddRule, Some(libc::ENOENT | libc::EOPNOTSUPP)) => {
            "is the nf_tables masquerade expression available? (modprobe nft_masq)"
        }
        (Step::DeleteTable, Some(libc::ENOENT)) => "the table does not exist",
        (_, Some(libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::ENOENT)) => {
            "is the nf_tables module available? (modprobe nf_tables)"
        }
        (_, Some(libc::EBUSY)) => "the table is still in use by another nf_tables object",
        (_, Some(libc::EINTR)) => "the ruleset kept changing while it was read; try again",
        (_, Some(libc::ENOMEM | libc::ENOBUFS)) => "the kernel ran out of memory",
        _ => "unexpected answer; is nf_tables fully available in this kernel?",
    }
}

/// A table name as nf_tables takes it.
fn table_name(name: &str) -> Result<CString, NftError> {
    let invalid = || NftError::InvalidTableName { name: name.into() };
    if name.is_empty() || name.len() > TABLE_NAME_MAX {
        return Err(invalid());
    }
    CString::new(name).map_err(|_| invalid())
}

/// An interface name NUL-padded to `IFNAMSIZ`, the way `nft` encodes `oifname "<name>"`: the
/// comparison then covers the terminating NUL, so `micropod0` does not match `micropod01`.
fn padded_ifname(name: &str) -> Result<[u8; IFNAME_MAX + 1], NftError> {
    link::validate_name(name).map_err(NftError::InvalidBridgeName)?;
    let mut padded = [0u8; IFNAME_MAX + 1];
    padded[..name.len()].copy_from_slice(name.as_bytes());
    Ok(padded)
}

/// The mask to apply to the source address (none for a /32, as `nft` does) and the network
/// address to compare the result with.
fn saddr_match(subnet: Ipv4Network) -> (Option<Ipv4Addr>, Ipv4Addr) {
    let mask = (subnet.prefix() < 32).then(|| subnet.mask());
    (mask, subnet.network())
}

/// Size of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

/// `nlmsg_len` of the message at the start of `msg` (native endian, as netlink is).
fn nlmsg_len(msg: &[u8]) -> usize {
    header_u32(msg, 0) as usize
}

/// `nlmsg_seq` of the message at the start of `msg`.
fn nlmsg_seq(msg: &[u8]) -> u32 {
    header_u32(msg, 8)
}

fn header_u32(msg: &[u8], offset: usize) -> u32 {
    msg.get(offset..offset + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// A receive buffer for the largest nf_tables message, aligned for `nlmsghdr` as mnl requires.
/// A `Vec<u8>` promises no alignment, so it is over-allocated and used from its first aligned
/// byte (safe code, no casts).
struct RecvBuffer {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl RecvBuffer {
    fn new() -> Self {
        let align = align_of::<libc::nlmsghdr>();
        let len = nftnl::nft_nlmsg_maxsize() as usize;
        let bytes = vec![0u8; len + align];
        let start = (align - bytes.as_ptr().addr() % align) % align;
        Self { bytes, start, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_follow_nf_tables_limits() {
        for bad in ["", "a\0b", &"t".repeat(TABLE_NAME_MAX + 1)] {
            assert!(
                matches!(table_name(bad), Err(NftError::InvalidTableName { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["micropod", "mp-0", &"t".repeat(TABLE_NAME_MAX)] {
            assert_eq!(table_name(good).unwrap().as_bytes(), good.as_bytes());
        }
    }

    #[test]
    fn bridge_name_is_validated_and_padded_to_ifnamsiz() {
        let padded = padded_ifname("micropod0").unwrap();
        assert_eq!(padded.len(), 16);
        assert_eq!(&padded[..9], b"micropod0");
        assert!(padded[9..].iter().all(|&b| b == 0));
        assert_eq!(padded_ifname("abcdefghijklmno").unwrap()[15], 0);
        for bad in ["", "abcdefghijklmnop", "a b", "a/b"] {
            assert!(
                matches!(padded_ifname(bad), Err(NftError::InvalidBridgeName(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn chain_name_constants_agree() {
        assert_eq!(CHAIN_C.to_str(), Ok(CHAIN));
    }

    #[test]
    fn saddr_match_uses_the_network_address() {
        let (mask, network) = saddr_match("10.10.0.7/24".parse().unwrap());
        assert_eq!(mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(network, Ipv4Addr::new(10, 10, 0, 0));
        let (mask, network) = saddr_match("192.0.2.9/32".parse().unwrap());
        assert_eq!(mask, None);
        assert_eq!(network, Ipv4Addr::new(192, 0, 2, 9));
    }

    #[test]
    fn acks_map_to_steps_with_and_without_framing() {
        let steps = [Step::AddTable, Step::AddChain];
        // Kernel >= 6.10: begin and end are numbered and acknowledged too.
        let framed = ack_map(1..5, &steps);
        assert_eq!(
            framed.into_iter().collect::<Vec<_>>(),
            [
                (1, Step::Batch),
                (2, Step::AddTable),
                (3, Step::AddChain),
                (4, Step::Batch)
            ]
        );
        let bare = ack_map(1..3, &steps);
        assert_eq!(
            bare.into_iter().collect::<Vec<_>>(),
            [(1, Step::AddTable), (2, Step::AddChain)]
        );
    }

    #[test]
    fn hints_say_what_to_do() {
        assert!(hint(Step::Batch, Some(libc::EPERM)).contains("CAP_NET_ADMIN"));
        assert!(hint(Step::ListTables, Some(libc::EPERM)).contains("CAP_NET_ADMIN"));
        assert!(hint(Step::Batch, Some(libc::EOPNOTSUPP)).contains("nf_tables module"));
        assert!(hint(Step::AddChain, Some(libc::ENOENT)).contains("nft_chain_nat"));
        assert!(hint(Step::AddRule, Some(libc::ENOENT)).contains("nft_masq"));
    }

    #[test]
    fn refused_error_names_step_table_and_errno() {
        let err = NftError::Refused {
            table: "micropod".into(),
            step: Step::Batch,
            hint: hint(Step::Batch, Some(libc::EPERM)),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let text = err.to_string();
        assert!(text.contains("table ip micropod"), "{text}");
        assert!(text.contains("CAP_NET_ADMIN"), "{text}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("os error 1"), "{source}");
    }

    #[test]
    fn dump_request_header_is_read_back() {
        let request = nftnl::table::get_tables_nlmsg(7);
        assert_eq!(nlmsg_seq(&request), 7);
        assert_eq!(nlmsg_len(&request), NLMSG_HDRLEN + 4);
    }

    #[test]
    fn receive_buffer_is_aligned_for_nlmsghdr() {
        let mut buffer = RecvBuffer::new();
        let slice = buffer.as_mut_slice();
        assert!(slice.as_ptr().cast::<libc::nlmsghdr>().is_aligned());
        assert_eq!(slice.len(), nftnl::nft_nlmsg_maxsize() as usize);
    }
}
