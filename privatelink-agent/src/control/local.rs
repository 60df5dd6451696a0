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

    /// This node's high-availability group and role, if it is in a group.
    fn ha(&self) -> Option<crate::control::store::HaRole> {
        None
    }
}
