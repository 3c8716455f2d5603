//! IPv4 routes in the main table.

use std::net::Ipv4Addr;

use futures::TryStreamExt as _;
use ipnetwork::Ipv4Network;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};

use super::Netlink;

/// The kernel's main routing table (RT_TABLE_MAIN).
const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot list IPv4 routes")]
    List {
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot add a default route via {gateway}")]
    AddDefault {
        gateway: Ipv4Addr,
        #[source]
        source: rtnetlink::Error,
    },
}

/// An IPv4 unicast route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

impl Route {
    fn from_message(msg: &RouteMessage) -> Option<Self> {
        if msg.header.kind != RouteType::Unicast {
            return None;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut gateway = None;
        let mut oif = None;
        let mut table = u32::from(msg.header.table);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if table != MAIN_TABLE {
            return None;
        }
        let destination = Ipv4Network::new(dst, msg.header.destination_prefix_length).ok()?;
        Some(Self {
            destination,
            gateway,
            oif,
        })
    }

    pub fn is_default(&self) -> bool {
        self.destination.prefix() == 0
    }
}

/// The IPv4 unicast routes of the main table.
pub async fn list(nl: &Netlink) -> Result<Vec<Route>, RouteError> {
    let request = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let messages: Vec<RouteMessage> = nl
        .handle()
        .route()
        .get(request)
        .execute()
        .try_collect()
        .await
        .map_err(|source| RouteError::List { source })?;
    Ok(messages.iter().filter_map(Route::from_message).collect())
}

/// Adds `default via gateway dev oif` to the main table.
pub async fn add_default(nl: &Netlink, gateway: Ipv4Addr, oif: u32) -> Result<(), RouteError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(oif)
        .build();
    nl.handle()
        .route()
        .add(route)
        .execute()
        .await
        .map_err(|source| RouteError::AddDefault { gateway, source })
}
