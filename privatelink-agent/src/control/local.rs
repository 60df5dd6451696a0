//! What only a node knows, as the control plane serves it. A node runtime registers one
//! [`NodeLocal`] with the plane ([`super::plane::ControlPlane::attach_node`]); an API server
//! without a node has none, and answers that it keeps no such facts.
use std::net::IpAddr;

use super::{
    monitoring::{Period, Point},
    store::NodeReport,
};

/// The narrow interface from the control plane to the node beside it.
pub trait NodeLocal: Send + Sync {
    /// Whether this node's checks find `backend` of service `service_id` healthy; `None` when it
    /// has not been checked (targets start healthy).
    fn backend_healthy(&self, service_id: &str, backend: IpAddr) -> Option<bool>;

    /// Points of one object (`endpoint` or `service`, its id) over `period`, from this node's
    /// monitoring history; `None` when the node keeps none. Blocking: it reads a database.
    fn history(&self, kind: &str, id: &str, period: &Period) -> Option<Result<Vec<Point>, String>>;

    /// The revision this node last applied and reported, listed with the store's reports.
    fn report(&self) -> Option<NodeReport>;

    /// Connection-log records of service `service_id` on this node with a sequence number above
    /// `after`, oldest first, at most `limit`; `None` when the node keeps no log.
    fn connections(
        &self,
        _service_id: &str,
        _after: u64,
        _limit: usize,
    ) -> Option<Vec<ConnRecord>> {
        None
    }

    /// This node's high-availability group and role, if it is in a group.
    fn ha(&self) -> Option<crate::control::store::HaRole> {
        None
    }
}

/// One record of a node's connection log (see `node::connlog`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ConnRecord {
    /// This node's sequence number of the record (page with `after`).
    pub seq: u64,
    /// `opened` or `closed`.
    pub event: &'static str,
    /// When the connection opened (`opened`) or was found closed (`closed`), RFC 3339, UTC.
    pub time: String,
    /// The same, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub service_id: String,
    pub endpoint_id: String,
    /// The consumer account that owns the endpoint.
    pub account_id: String,
    /// The link (packet id) the datapath counts the connection under.
    pub link_id: u32,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The consumer's address and port, in its own network.
    pub consumer: String,
    /// The endpoint's address and terminal port.
    pub endpoint: String,
    /// The NAT address and port the backend saw.
    pub nat: String,
    /// The backend's address and service port.
    pub backend: String,
    /// `closed` only: how long it lived, its traffic each way, and how it ended (`fin`, `rst`,
    /// `timeout`: idle until conntrack let it go).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<&'static str>,
}
