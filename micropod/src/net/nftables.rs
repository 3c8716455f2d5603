//! nf_tables over netlink: micropod's MASQUERADE fallback, in an `ip` table of its own.
//!
//! Requests are encoded here (the few message and expression types micropod needs, in the
//! layout `nft` itself sends) and sent on a `NETLINK_NETFILTER` socket, and the answers are
//! read with netlink-packet-core's message and attribute parsers; no `nft` binary and no C
//! library is involved, so the binary links statically. The socket is opened by the calling
//! thread, so every function acts on the network namespace of the calling thread.
//!
//! Changes go out as one batch, which nf_tables applies as one transaction: either all of it
//! takes effect or none of it. Every message asks for an acknowledgement and every
//! acknowledgement is checked, so a refused batch is an error, never silently ignored.

use std::{collections::BTreeMap, fmt, io, net::Ipv4Addr, time::Duration};

use ipnetwork::Ipv4Network;
use netlink_packet_core::{
    NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NlasIterator,
};

use super::link::{self, IFNAME_MAX, LinkError};
use crate::sys;

/// The one base chain of the table.
pub const CHAIN: &str = "postrouting";
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
    /// Destinations the subnet reaches with its own addresses: no rule below theirs applies
    /// (other nodes' pod subnets, a service range; `0.0.0.0/0` means no NAT at all).
    pub keep: &'a [Ipv4Network],
    /// Ports of the host forwarded to endpoints (published ports).
    pub forwards: &'a [Forward],
}

/// A port of the host forwarded to an endpoint: connections to `host_ip:host_port` (any of
/// the host's own addresses when `host_ip` is `None`), from outside or from the host itself,
/// go to `to:to_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub to: Ipv4Addr,
    pub to_port: u16,
}

/// The chains that forward published ports: `nft`'s `dstnat` priority, for traffic arriving
/// (prerouting) and made by the host itself (output).
pub const PREROUTING_CHAIN: &str = "prerouting";
pub const OUTPUT_CHAIN: &str = "output";
/// `NF_IP_PRI_NAT_DST`, the priority `nft` calls `dstnat`.
pub const DSTNAT_PRIORITY: i32 = -100;

/// One request inside a batch (or the batch itself), to say which one the kernel refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The batch as a whole: its begin/end messages, the permission check, the commit.
    Batch,
    AddTable,
    DeleteTable,
    AddChain,
    AddRule,
    AddForwardChain,
    AddForwardRule,
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
            Self::AddForwardChain => "create a nat chain for the published ports",
            Self::AddForwardRule => "add a published port's rule",
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
/// rest (`nft` itself only maps ports after a protocol match). Before them, for each
/// destination of `keep`, `ip saddr <subnet> ip daddr <destination> counter accept`.
///
/// Idempotent: whatever the table held before (even chains or rules added by hand) is replaced.
/// Acts on the calling thread's network namespace; needs CAP_NET_ADMIN there.
pub fn apply(m: &Masquerade<'_>) -> Result<(), NftError> {
    let name = table_name(m.table)?;
    let oifname = padded_ifname(m.bridge)?;

    let mut tx = Transaction::default();
    // Add first so the delete cannot fail with ENOENT, then delete so the table starts empty:
    // the commit swaps the old table for the new one at once, with no window without NAT.
    tx.table(NFT_MSG_NEWTABLE, &name, Step::AddTable);
    tx.table(NFT_MSG_DELTABLE, &name, Step::DeleteTable);
    tx.table(NFT_MSG_NEWTABLE, &name, Step::AddTable);
    tx.nat_chain(
        &name,
        CHAIN,
        NF_INET_POST_ROUTING,
        SRCNAT_PRIORITY,
        Step::AddChain,
    );
    if !m.forwards.is_empty() {
        forward_rules(&mut tx, &name, m, &oifname);
    }
    for destination in m.keep {
        tx.rule(&name, CHAIN, Step::AddRule, |list| {
            prefix_match(list, IP_SADDR_OFFSET, m.subnet);
            prefix_match(list, IP_DADDR_OFFSET, *destination);
            expr(list, b"counter", |_| {});
            // A nat chain's accept: this connection keeps its addresses.
            expr(list, b"immediate", |e| {
                e.u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                e.nested(NFTA_IMMEDIATE_DATA, |d| {
                    d.nested(NFTA_DATA_VERDICT, |v| v.u32(NFTA_VERDICT_CODE, NF_ACCEPT));
                });
            });
        });
    }
    for proto in [Some(libc::IPPROTO_TCP), Some(libc::IPPROTO_UDP), None] {
        tx.rule(&name, CHAIN, Step::AddRule, |list| {
            masquerade_rule(list, m, &oifname, proto);
        });
    }
    tx.run(m.table)
}

/// The published ports: a `prerouting` and an `output` chain, each with one DNAT rule per
/// forward (`[ip daddr <host ip> | fib daddr type local] meta l4proto <p> th dport <port>
/// dnat to <endpoint>:<port>`), and two masquerade rules at the head of `postrouting`: for a
/// forward from an endpoint to one of the bridge (hairpin: `ct status dnat ip saddr <subnet>
/// ip daddr <subnet>`; the reply must come back through the host to be translated back) and
/// for one from the host's loopback (`ip saddr 127.0.0.0/8 oifname "<bridge>"`, which also
/// needs `route_localnet` on the bridge).
fn forward_rules(tx: &mut Transaction, table: &[u8], m: &Masquerade<'_>, oifname: &[u8]) {
    for (chain, hook) in [
        (PREROUTING_CHAIN, NF_INET_PRE_ROUTING),
        (OUTPUT_CHAIN, NF_INET_LOCAL_OUT),
    ] {
        tx.nat_chain(table, chain, hook, DSTNAT_PRIORITY, Step::AddForwardChain);
        for f in m.forwards {
            tx.rule(table, chain, Step::AddForwardRule, |list| {
                dnat_rule(list, f)
            });
        }
    }
    // Hairpin: ct status & dnat != 0, from the subnet to the subnet.
    tx.rule(table, CHAIN, Step::AddForwardRule, |list| {
        expr(list, b"ct", |e| {
            e.u32(NFTA_CT_DREG, NFT_REG_1);
            e.u32(NFTA_CT_KEY, NFT_CT_STATUS);
        });
        expr(list, b"bitwise", |e| {
            e.u32(NFTA_BITWISE_SREG, NFT_REG_1);
            e.u32(NFTA_BITWISE_DREG, NFT_REG_1);
            e.u32(NFTA_BITWISE_LEN, 4);
            e.data(NFTA_BITWISE_MASK, &IPS_DST_NAT.to_ne_bytes());
            e.data(NFTA_BITWISE_XOR, &[0; 4]);
        });
        cmp(list, NFT_CMP_NEQ, &[0; 4]);
        prefix_match(list, IP_SADDR_OFFSET, m.subnet);
        prefix_match(list, IP_DADDR_OFFSET, m.subnet);
        expr(list, b"counter", |_| {});
        expr(list, b"masq", |_| {});
    });
    // The host's loopback, out of the bridge.
    let loopback = Ipv4Network::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("a valid prefix");
    tx.rule(table, CHAIN, Step::AddForwardRule, |list| {
        prefix_match(list, IP_SADDR_OFFSET, loopback);
        meta(list, NFT_META_OIFNAME);
        cmp(list, NFT_CMP_EQ, oifname);
        expr(list, b"counter", |_| {});
        expr(list, b"masq", |_| {});
    });
}

/// One forward's DNAT rule (see [`forward_rules`]).
fn dnat_rule(list: &mut Msg, f: &Forward) {
    match f.host_ip {
        Some(ip) => prefix_match(
            list,
            IP_DADDR_OFFSET,
            Ipv4Network::new(ip, 32).expect("a host prefix"),
        ),
        None => {
            // fib daddr type local: any address of this namespace's own.
            expr(list, b"fib", |e| {
                e.u32(NFTA_FIB_DREG, NFT_REG_1);
                e.u32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
                e.u32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR);
            });
            cmp(list, NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes());
        }
    }
    meta(list, NFT_META_L4PROTO);
    cmp(list, NFT_CMP_EQ, &[f.proto]);
    // th dport: 2 bytes at offset 2 of the transport header.
    expr(list, b"payload", |e| {
        e.u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        e.u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_TRANSPORT_HEADER);
        e.u32(NFTA_PAYLOAD_OFFSET, 2);
        e.u32(NFTA_PAYLOAD_LEN, 2);
    });
    cmp(list, NFT_CMP_EQ, &f.host_port.to_be_bytes());
    expr(list, b"counter", |_| {});
    for (reg, value) in [
        (NFT_REG_1, f.to.octets().to_vec()),
        (NFT_REG_2, f.to_port.to_be_bytes().to_vec()),
    ] {
        expr(list, b"immediate", |e| {
            e.u32(NFTA_IMMEDIATE_DREG, reg);
            e.data(NFTA_IMMEDIATE_DATA, &value);
        });
    }
    expr(list, b"nat", |e| {
        e.u32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
        e.u32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4));
        e.u32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1);
        e.u32(NFTA_NAT_REG_PROTO_MIN, NFT_REG_2);
        e.u32(
            NFTA_NAT_FLAGS,
            NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED,
        );
    });
}

/// The expressions of one rule: for TCP or UDP (`proto`) with the port range, else for the
/// rest (ICMP and anything else without ports nf_tables could map).
fn masquerade_rule(list: &mut Msg, m: &Masquerade<'_>, oifname: &[u8], proto: Option<i32>) {
    prefix_match(list, IP_SADDR_OFFSET, m.subnet);
    meta(list, NFT_META_OIFNAME);
    cmp(list, NFT_CMP_NEQ, oifname);
    if let Some(proto) = proto {
        meta(list, NFT_META_L4PROTO);
        cmp(
            list,
            NFT_CMP_EQ,
            &[u8::try_from(proto).expect("an IP protocol number")],
        );
    }
    expr(list, b"counter", |_| {});
    if proto.is_some() {
        // Ports go into the registers in network order, as `nft` puts them.
        for (reg, port) in [(NFT_REG_1, m.ports.min), (NFT_REG_2, m.ports.max)] {
            expr(list, b"immediate", |e| {
                e.u32(NFTA_IMMEDIATE_DREG, reg);
                e.data(NFTA_IMMEDIATE_DATA, &port.to_be_bytes());
            });
        }
        expr(list, b"masq", |e| {
            e.u32(NFTA_MASQ_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            e.u32(NFTA_MASQ_REG_PROTO_MIN, NFT_REG_1);
            e.u32(NFTA_MASQ_REG_PROTO_MAX, NFT_REG_2);
        });
    } else {
        expr(list, b"masq", |_| {});
    }
}

/// The IPv4 header's source and destination addresses: 4 bytes each at these offsets.
const IP_SADDR_OFFSET: u32 = 12;
const IP_DADDR_OFFSET: u32 = 16;

/// `ip saddr|daddr <prefix>`: the address at `offset` of the network header, masked unless the
/// prefix is a host (/32); nothing at all for /0, which every address matches.
fn prefix_match(list: &mut Msg, offset: u32, prefix: Ipv4Network) {
    if prefix.prefix() == 0 {
        return;
    }
    expr(list, b"payload", |e| {
        e.u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        e.u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
        e.u32(NFTA_PAYLOAD_OFFSET, offset);
        e.u32(NFTA_PAYLOAD_LEN, 4);
    });
    let (mask, network) = saddr_match(prefix);
    if let Some(mask) = mask {
        expr(list, b"bitwise", |e| {
            e.u32(NFTA_BITWISE_SREG, NFT_REG_1);
            e.u32(NFTA_BITWISE_DREG, NFT_REG_1);
            e.u32(NFTA_BITWISE_LEN, 4);
            e.data(NFTA_BITWISE_MASK, &mask.octets());
            e.data(NFTA_BITWISE_XOR, &[0; 4]);
        });
    }
    cmp(list, NFT_CMP_EQ, &network.octets());
}

/// One element of a rule's expression list: its name and its attributes.
fn expr(list: &mut Msg, name: &[u8], data: impl FnOnce(&mut Msg)) {
    list.nested(NFTA_LIST_ELEM, |elem| {
        elem.string(NFTA_EXPR_NAME, name);
        elem.nested(NFTA_EXPR_DATA, data);
    });
}

fn cmp(list: &mut Msg, op: u32, value: &[u8]) {
    expr(list, b"cmp", |e| {
        e.u32(NFTA_CMP_SREG, NFT_REG_1);
        e.u32(NFTA_CMP_OP, op);
        e.data(NFTA_CMP_DATA, value);
    });
}

fn meta(list: &mut Msg, key: u32) {
    expr(list, b"meta", |e| {
        e.u32(NFTA_META_DREG, NFT_REG_1);
        e.u32(NFTA_META_KEY, key);
    });
}

/// Deletes table `ip <table>` with everything in it; `Ok(false)` when it did not exist.
pub fn delete(table: &str) -> Result<bool, NftError> {
    let name = table_name(table)?;
    let mut tx = Transaction::default();
    tx.table(NFT_MSG_DELTABLE, &name, Step::DeleteTable);
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

/// Names of all `ip` family tables (each with its terminating NUL, as the kernel sends it).
fn ip_tables(table: &str) -> Result<Vec<Vec<u8>>, NftError> {
    // The dump is marked interrupted when the ruleset changes under it; another try is cheap.
    const ATTEMPTS: usize = 3;
    const SEQ: u32 = 1;
    let dump_error = |source: io::Error| {
        answer_error(table, source, |source| NftError::Dump {
            table: table.into(),
            hint: hint(Step::ListTables, source.raw_os_error()),
            source,
        })
    };
    for _ in 0..ATTEMPTS {
        let socket = open_socket()?;
        let request = Msg::new(
            nft_type(NFT_MSG_GETTABLE),
            NLM_F_REQUEST | NLM_F_DUMP,
            SEQ,
            libc::AF_INET as u8,
            0,
        )
        .finish();
        socket
            .send(&request, 0)
            .map_err(|source| NftError::SendDump {
                table: table.into(),
                source,
            })?;
        let mut names = Vec::new();
        let mut interrupted = false;
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        'receive: loop {
            buf.clear();
            socket.recv(&mut buf, 0).map_err(dump_error)?;
            for message in Messages(&buf) {
                let message = message.map_err(dump_error)?;
                if message.seq != SEQ {
                    continue;
                }
                interrupted |= message.flags & NLM_F_DUMP_INTR != 0;
                match message.kind {
                    NLMSG_DONE => break 'receive,
                    NLMSG_ERROR => match message.errno() {
                        0 => break 'receive,
                        errno => return Err(dump_error(io::Error::from_raw_os_error(errno))),
                    },
                    kind if kind == nft_type(NFT_MSG_NEWTABLE) => {
                        if let Some(name) = message.attr(NFGENMSG_LEN, NFTA_TABLE_NAME) {
                            names.push(name.to_vec());
                        }
                    }
                    _ => {}
                }
            }
        }
        if !interrupted {
            return Ok(names);
        }
    }
    Err(dump_error(io::Error::from_raw_os_error(libc::EINTR)))
}

/// A batch being built, with what each message does, to name the one the kernel refuses.
struct Transaction {
    messages: Vec<Msg>,
    /// The step of each sequence number; the batch's begin and end messages are
    /// [`Step::Batch`].
    steps: BTreeMap<u32, Step>,
}

impl Default for Transaction {
    fn default() -> Self {
        let mut steps = BTreeMap::new();
        steps.insert(1, Step::Batch);
        Self {
            messages: vec![batch_message(NFNL_MSG_BATCH_BEGIN, 1)],
            steps,
        }
    }
}

impl Transaction {
    /// Adds a message of type `kind` (an `NFT_MSG_*`) for the `ip` family, asking for its
    /// acknowledgement; returns it for its attributes.
    fn message(&mut self, kind: u16, flags: u16, step: Step) -> &mut Msg {
        let seq = u32::try_from(self.messages.len() + 1).expect("a short batch");
        self.steps.insert(seq, step);
        self.messages.push(Msg::new(
            nft_type(kind),
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            libc::AF_INET as u8,
            0,
        ));
        self.messages.last_mut().expect("just pushed")
    }

    fn table(&mut self, kind: u16, name: &[u8], step: Step) {
        self.message(kind, 0, step).string(NFTA_TABLE_NAME, name);
    }

    /// A base chain of type nat on `hook` at `priority`, policy accept.
    fn nat_chain(&mut self, table: &[u8], chain: &str, hook: u32, priority: i32, step: Step) {
        let c = self.message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, step);
        c.string(NFTA_CHAIN_TABLE, table);
        c.string(NFTA_CHAIN_NAME, chain.as_bytes());
        c.nested(NFTA_CHAIN_HOOK, |h| {
            h.u32(NFTA_HOOK_HOOKNUM, hook);
            h.u32(NFTA_HOOK_PRIORITY, priority.cast_unsigned());
        });
        c.u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        c.string(NFTA_CHAIN_TYPE, b"nat");
    }

    /// A rule appended to `chain`, its expressions written by `exprs`.
    fn rule(&mut self, table: &[u8], chain: &str, step: Step, exprs: impl FnOnce(&mut Msg)) {
        let r = self.message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, step);
        r.string(NFTA_RULE_TABLE, table);
        r.string(NFTA_RULE_CHAIN, chain.as_bytes());
        r.nested(NFTA_RULE_EXPRESSIONS, exprs);
    }

    /// Sends the batch and waits for every acknowledgement; the first error wins.
    fn run(self, table: &str) -> Result<(), NftError> {
        let Self {
            mut messages,
            mut steps,
        } = self;
        let end = u32::try_from(messages.len() + 1).expect("a short batch");
        steps.insert(end, Step::Batch);
        messages.push(batch_message(NFNL_MSG_BATCH_END, end));
        // Only the messages inside the batch ask for an acknowledgement; the begin and end
        // messages are answered only when they fail (no permission, no nf_tables).
        let mut pending: Vec<u32> = steps
            .iter()
            .filter(|(_, s)| **s != Step::Batch)
            .map(|(seq, _)| *seq)
            .collect();
        let batch: Vec<u8> = messages.into_iter().flat_map(Msg::finish).collect();

        let socket = open_socket()?;
        socket
            .send(&batch, 0)
            .map_err(|source| NftError::SendBatch {
                table: table.into(),
                source,
            })?;

        let receive_error = |source: io::Error| {
            answer_error(table, source, |source| NftError::Receive {
                table: table.into(),
                source,
            })
        };
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        while !pending.is_empty() {
            buf.clear();
            socket.recv(&mut buf, 0).map_err(receive_error)?;
            for message in Messages(&buf) {
                let message = message.map_err(receive_error)?;
                if message.kind != NLMSG_ERROR {
                    // Not an acknowledgement (we ask for no echo): keep waiting for it.
                    continue;
                }
                // Some kernels answer a refused batch begin with sequence number 0.
                let step = match steps.get(&message.seq) {
                    Some(&step) => step,
                    None if message.seq == 0 => Step::Batch,
                    None => {
                        return Err(receive_error(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("answer with unexpected sequence number {}", message.seq),
                        )));
                    }
                };
                match message.errno() {
                    0 => pending.retain(|seq| *seq != message.seq),
                    errno => {
                        let source = io::Error::from_raw_os_error(errno);
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

/// A failed receive: [`NftError::Timeout`] when `SO_RCVTIMEO` ran out, else `other`.
fn answer_error(
    table: &str,
    source: io::Error,
    other: impl FnOnce(io::Error) -> NftError,
) -> NftError {
    if source.kind() == io::ErrorKind::WouldBlock {
        NftError::Timeout {
            table: table.into(),
            waited: ANSWER_TIMEOUT,
        }
    } else {
        other(source)
    }
}

/// A batch's begin or end message: nfnetlink's framing of an nf_tables transaction.
fn batch_message(kind: u16, seq: u32) -> Msg {
    Msg::new(
        kind,
        NLM_F_REQUEST,
        seq,
        libc::AF_UNSPEC as u8,
        NFNL_SUBSYS_NFTABLES,
    )
}

fn open_socket() -> Result<netlink_sys::Socket, NftError> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)
        .map_err(NftError::OpenSocket)?;
    socket.bind_auto().map_err(NftError::OpenSocket)?;
    // Acknowledgements without a copy of the request: they stay small.
    socket.set_cap_ack(true).map_err(NftError::OpenSocket)?;
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

/// A table name as nf_tables takes it: 1 to 255 bytes, NUL-terminated.
fn table_name(name: &str) -> Result<Vec<u8>, NftError> {
    let invalid = || NftError::InvalidTableName { name: name.into() };
    if name.is_empty() || name.len() > TABLE_NAME_MAX || name.contains('\0') {
        return Err(invalid());
    }
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    Ok(bytes)
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

// nfnetlink's and nf_tables' numbers (linux/netfilter/nfnetlink.h, nf_tables.h, nf_nat.h),
// written out rather than taken from `libc`, whose musl and glibc modules do not all carry
// them; netlink's own come from netlink-packet-core.
/// `struct nfgenmsg`: family, version, resource id.
const NFGENMSG_LEN: usize = 4;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_MASQ_FLAGS: u16 = 1;
const NFTA_MASQ_REG_PROTO_MIN: u16 = 2;
const NFTA_MASQ_REG_PROTO_MAX: u16 = 3;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_INET_POST_ROUTING: u32 = 4;
const NFPROTO_IPV4: u8 = 2;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_DNAT: u32 = 1;
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
/// `RTN_LOCAL`, the address type `fib … type local` compares with (host order in the register).
const RTN_LOCAL: u32 = 2;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATUS: u32 = 2;
/// `IPS_DST_NAT` of `ct status` (host order in the register).
const IPS_DST_NAT: u32 = 1 << 5;
const NF_ACCEPT: u32 = 1;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
/// The port registers of `masq` count.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;
/// Large enough for any datagram nf_tables sends micropod (acknowledgements, table dumps).
const RECV_BUFFER: usize = 64 * 1024;

/// The nfnetlink message type of an nf_tables message.
const fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// One netlink message being encoded: header, `nfgenmsg`, attributes (nested ones through
/// [`Msg::nested`]). Attribute payloads are padded to 4 bytes; integers go in network order,
/// as nf_tables reads them.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel's
        buf.extend_from_slice(&[family, 0]); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Self { buf }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).expect("a short attribute");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    /// A NUL-terminated string (`value` carries its NUL, or gets one).
    fn string(&mut self, kind: u16, value: &[u8]) {
        if value.last() == Some(&0) {
            self.attr(kind, value);
        } else {
            let mut with_nul = value.to_vec();
            with_nul.push(0);
            self.attr(kind, &with_nul);
        }
    }

    fn u32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    /// `NFTA_DATA_VALUE` inside a nested `kind`: how nf_tables takes constants.
    fn data(&mut self, kind: u16, value: &[u8]) {
        self.nested(kind, |d| d.attr(NFTA_DATA_VALUE, value));
    }

    fn nested(&mut self, kind: u16, inner: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        inner(self);
        let len = u16::try_from(self.buf.len() - start).expect("a short attribute");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("a short message");
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One message of a received datagram.
struct Received<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    /// What follows the header.
    payload: &'a [u8],
}

impl<'a> Received<'a> {
    /// The errno of an `NLMSG_ERROR` (0 for an acknowledgement), positive.
    fn errno(&self) -> i32 {
        self.payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map_or(libc::EPROTO, |b| i32::from_ne_bytes(b).saturating_neg())
    }

    /// The payload of the first top-level attribute `kind`, after `skip` bytes of fixed header.
    fn attr(&self, skip: usize, kind: u16) -> Option<&'a [u8]> {
        NlasIterator::new(self.payload.get(skip..)?)
            .map_while(Result::ok)
            .find(|nla| nla.kind() == kind)
            .map(|nla| {
                let len = usize::from(nla.length());
                &nla.into_inner()[4..len]
            })
    }
}

/// The netlink messages of a datagram; a malformed one ends it with an error.
struct Messages<'a>(&'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = io::Result<Received<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        match NetlinkBuffer::new_checked(self.0) {
            Ok(message) => {
                let received = Received {
                    kind: message.message_type(),
                    flags: message.flags(),
                    seq: message.sequence_number(),
                    payload: message.payload(),
                };
                let len = message.length() as usize;
                self.0 = self.0.get(len.next_multiple_of(4)..).unwrap_or_default();
                Some(Ok(received))
            }
            Err(e) => {
                self.0 = &[];
                Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a malformed netlink message: {e}"),
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `struct nlmsghdr`.
    const NLMSG_HDRLEN: usize = 16;

    #[test]
    fn table_names_follow_nf_tables_limits() {
        for bad in ["", "a\0b", &"t".repeat(TABLE_NAME_MAX + 1)] {
            assert!(
                matches!(table_name(bad), Err(NftError::InvalidTableName { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["micropod", "mp-0", &"t".repeat(TABLE_NAME_MAX)] {
            let name = table_name(good).unwrap();
            assert_eq!(&name[..good.len()], good.as_bytes());
            assert_eq!(name[good.len()..], [0]);
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
    fn saddr_match_uses_the_network_address() {
        let (mask, network) = saddr_match("10.10.0.7/24".parse().unwrap());
        assert_eq!(mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(network, Ipv4Addr::new(10, 10, 0, 0));
        let (mask, network) = saddr_match("192.0.2.9/32".parse().unwrap());
        assert_eq!(mask, None);
        assert_eq!(network, Ipv4Addr::new(192, 0, 2, 9));
    }

    #[test]
    fn a_batch_numbers_its_messages_and_frames_them() {
        let mut tx = Transaction::default();
        tx.table(NFT_MSG_NEWTABLE, b"t\0", Step::AddTable);
        tx.table(NFT_MSG_DELTABLE, b"t\0", Step::DeleteTable);
        assert_eq!(
            tx.steps.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [
                (1, Step::Batch),
                (2, Step::AddTable),
                (3, Step::DeleteTable)
            ]
        );
        let kinds: Vec<(u16, u16, u32)> = tx
            .messages
            .into_iter()
            .map(|m| {
                let bytes = m.finish();
                let m = Messages(&bytes).next().unwrap().unwrap();
                (m.kind, m.flags, m.seq)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1),
                (nft_type(NFT_MSG_NEWTABLE), NLM_F_REQUEST | NLM_F_ACK, 2),
                (nft_type(NFT_MSG_DELTABLE), NLM_F_REQUEST | NLM_F_ACK, 3),
            ]
        );
    }

    #[test]
    fn messages_are_encoded_as_netlink_lays_them_out() {
        let mut m = Msg::new(nft_type(NFT_MSG_NEWTABLE), NLM_F_REQUEST, 7, 2, 0);
        m.string(NFTA_TABLE_NAME, b"abc");
        m.nested(NFTA_CHAIN_HOOK, |h| h.u32(NFTA_HOOK_HOOKNUM, 4));
        let bytes = m.finish();
        // header 16 + nfgenmsg 4 + "abc\0" attribute 8 + nest 4 + u32 attribute 8
        assert_eq!(bytes.len(), 40);
        assert_eq!(u32::from_ne_bytes(bytes[..4].try_into().unwrap()), 40);
        assert_eq!(&bytes[16..20], &[2, 0, 0, 0]);
        assert_eq!(&bytes[20..28], &[8, 0, 1, 0, b'a', b'b', b'c', 0]);
        assert_eq!(
            &bytes[28..40],
            &[12, 0, 4, 0x80, 8, 0, 1, 0, 0, 0, 0, 4],
            "nested, with the integer in network order"
        );
        let parsed = Messages(&bytes).next().unwrap().unwrap();
        assert_eq!(parsed.seq, 7);
        assert_eq!(
            parsed.attr(NFGENMSG_LEN, NFTA_TABLE_NAME),
            Some(&b"abc\0"[..])
        );
        assert_eq!(parsed.attr(NFGENMSG_LEN, 9), None);
    }

    #[test]
    fn acknowledgements_and_errors_are_read_back() {
        let answer = |errno: i32, seq: u32| {
            let mut m = Msg::new(NLMSG_ERROR, 0, seq, 0, 0);
            m.buf.truncate(NLMSG_HDRLEN);
            m.buf.extend_from_slice(&errno.to_ne_bytes());
            m.finish()
        };
        let mut datagram = answer(0, 2);
        datagram.extend(answer(-libc::EPERM, 3));
        let got: Vec<(u32, i32)> = Messages(&datagram)
            .map(|m| m.map(|m| (m.seq, m.errno())).unwrap())
            .collect();
        assert_eq!(got, [(2, 0), (3, libc::EPERM)]);
        let truncated = &datagram[..datagram.len() - 2];
        assert!(Messages(truncated).nth(1).unwrap().is_err());
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
}
