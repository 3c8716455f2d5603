//! Traffic control over rtnetlink: the `clsact` qdisc and `cls_bpf` direct-action filters, the
//! way `tc qdisc add dev X clsact` and `tc filter replace dev X ingress bpf da` make them.
//!
//! micropod hooks its port programs here rather than with TCX links: on this kernel every TCX
//! attach waits for an RCU grace period while holding rtnl (≈ 8 ms each, two per port, and
//! parallel attaches queue behind each other), where a filter is in place in ≈ 0.05 ms. Both
//! hooks run at the same point of the receive and transmit paths, before the bridge; TCX
//! programs on the device run first, then these filters, in priority order.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use futures::{Stream, StreamExt as _};
use rtnetlink::{
    packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
        NetlinkMessage, NetlinkPayload,
    },
    packet_route::{
        RouteNetlinkMessage,
        tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption},
    },
};

use super::Netlink;

/// `ETH_P_ALL`: the filter sees every frame.
const ETH_P_ALL: u16 = 0x0003;
/// `EEXIST`, as netlink reports it (negated errno).
const EEXIST: i32 = 17;

/// Which side of the device a filter hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Frames the device receives (for a bridge port: what the endpoint sends).
    Ingress,
    /// Frames the device transmits (for a bridge port: what the endpoint receives).
    Egress,
}

impl Hook {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: TcHandle::CLSACT.major,
            minor: match self {
                Self::Ingress => TcHandle::MIN_INGRESS,
                Self::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// Where a filter sits in its hook's chain: tc runs filters by ascending priority, and the
/// handle tells micropod's filter apart from others at the same priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterSlot {
    pub priority: u16,
    pub handle: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("cannot add the clsact qdisc to interface index {ifindex}")]
    AddClsact {
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot attach BPF program {name} to interface index {ifindex} ({hook})")]
    AttachBpf {
        name: String,
        ifindex: u32,
        hook: Hook,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot list the filters of interface index {ifindex} ({hook})")]
    ListFilters {
        ifindex: u32,
        hook: Hook,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface index {ifindex} does not fit a tc request")]
    Index { ifindex: u32 },
}

/// A `cls_bpf` filter as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub slot: FilterSlot,
    /// The program's name as the filter records it (`TCA_BPF_NAME`).
    pub name: Option<String>,
    pub prog_id: Option<u32>,
    pub direct_action: bool,
}

fn index(ifindex: u32) -> Result<i32, TcError> {
    i32::try_from(ifindex).map_err(|_| TcError::Index { ifindex })
}

/// Adds the `clsact` qdisc to the device; one that is already there is fine.
pub async fn add_clsact(nl: &Netlink, ifindex: u32) -> Result<(), TcError> {
    let mut msg = TcMessage::with_index(index(ifindex)?);
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle {
        major: TcHandle::CLSACT.major,
        minor: 0,
    };
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    let request = RouteNetlinkMessage::NewQueueDiscipline(msg);
    match execute(nl, request, NLM_F_CREATE | NLM_F_EXCL).await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EEXIST => Ok(()),
        result => result.map_err(|source| TcError::AddClsact { ifindex, source }),
    }
}

/// Puts `prog` on the device's hook as a direct-action `cls_bpf` filter in `slot`, replacing
/// the filter in that slot if there is one (atomically: no frame sees neither program). The
/// device needs the `clsact` qdisc ([`add_clsact`]). The filter holds its own reference to the
/// program, so it stays after the caller closes `prog`, until it or the device is deleted.
pub async fn replace_bpf(
    nl: &Netlink,
    ifindex: u32,
    hook: Hook,
    slot: FilterSlot,
    prog: BorrowedFd<'_>,
    name: &str,
) -> Result<(), TcError> {
    let attach_err = |source| TcError::AttachBpf {
        name: name.into(),
        ifindex,
        hook,
        source,
    };
    let fd = u32::try_from(prog.as_raw_fd()).expect("a valid descriptor is not negative");
    let msg = TcMessage::from_parts(
        header(index(ifindex)?, hook, slot),
        vec![
            TcAttribute::Kind("bpf".into()),
            TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::ProgFd(fd)),
                TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
                TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
            ]),
        ],
    );
    execute(
        nl,
        RouteNetlinkMessage::NewTrafficFilter(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .await
    .map_err(attach_err)
}

/// The `cls_bpf` filters on the device's hook (none, without a `clsact` qdisc).
pub async fn bpf_filters(
    nl: &Netlink,
    ifindex: u32,
    hook: Hook,
) -> Result<Vec<BpfFilter>, TcError> {
    let list_err = |source| TcError::ListFilters {
        ifindex,
        hook,
        source,
    };
    let mut msg = TcMessage::with_index(index(ifindex)?);
    msg.header.parent = hook.parent();
    let mut responses =
        request(nl, RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP).map_err(list_err)?;
    let mut filters = Vec::new();
    while let Some(response) = responses.next().await {
        let msg = match response.payload {
            NetlinkPayload::Error(e) if e.raw_code() == -libc::EINVAL => {
                // No clsact qdisc: nothing is hooked there.
                return Ok(Vec::new());
            }
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(list_err(rtnetlink::Error::NetlinkError(e)));
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(msg)) => msg,
            _ => continue,
        };
        if !msg
            .attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"))
        {
            continue;
        }
        let mut filter = BpfFilter {
            slot: FilterSlot {
                // `info` packs the priority (high half) and the protocol (low half).
                priority: u16::try_from(msg.header.info >> 16).unwrap_or(u16::MAX),
                handle: u32::from(msg.header.handle.major) << 16
                    | u32::from(msg.header.handle.minor),
            },
            name: None,
            prog_id: None,
            direct_action: false,
        };
        // The kernel also lists each priority's chain head without options; skip those.
        let mut has_options = false;
        for attr in &msg.attributes {
            if let TcAttribute::Options(options) = attr {
                for option in options {
                    has_options = true;
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => {
                            filter.name = Some(n.clone());
                        }
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.prog_id = Some(*id),
                        TcOption::Bpf(TcFilterBpfOption::Flags(flags)) => {
                            filter.direct_action = flags.contains(TcBpfFlags::DirectAction);
                        }
                        _ => {}
                    }
                }
            }
        }
        if has_options {
            filters.push(filter);
        }
    }
    Ok(filters)
}

fn header(index: i32, hook: Hook, slot: FilterSlot) -> TcHeader {
    TcHeader {
        index,
        handle: TcHandle::from(slot.handle),
        parent: hook.parent(),
        info: u32::from(slot.priority) << 16 | u32::from(ETH_P_ALL.to_be()),
        ..TcHeader::default()
    }
}

fn request(
    nl: &Netlink,
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<impl Stream<Item = NetlinkMessage<RouteNetlinkMessage>> + use<>, rtnetlink::Error> {
    let mut req = NetlinkMessage::from(message);
    req.header.flags = NLM_F_REQUEST | flags;
    nl.handle().clone().request(req)
}

async fn execute(
    nl: &Netlink,
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut responses = request(nl, message, NLM_F_ACK | flags)?;
    while let Some(response) = responses.next().await {
        // An error message without a code is the kernel's acknowledgement.
        if let NetlinkPayload::Error(e) = response.payload
            && e.code.is_some()
        {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}
