//! What this node publishes to the control plane beside it ([`NodeLocal`]): the health of
//! backends as its checks last applied it, its monitoring history, and the revision it applied.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::{
    control::{
        local::NodeLocal,
        monitoring::{Period, Point},
        store::NodeReport,
    },
    node::{connlog::ConnLog, history::History},
};

/// The node's side of [`NodeLocal`]; the runtime updates it, the API reads it.
pub struct NodeFacts {
    /// service id → (backend, healthy), as the last sync applied it.
    health: Mutex<BTreeMap<String, Vec<(IpAddr, bool)>>>,
    history: Option<Arc<Mutex<History>>>,
    report: Mutex<Option<NodeReport>>,
    /// The high-availability group and its shared state, for a node of a group.
    ha: Mutex<Option<(String, Arc<crate::node::ha::HaShared>)>>,
    conn_log: Arc<ConnLog>,
}

impl NodeFacts {
    pub fn new(history: Option<Arc<Mutex<History>>>, conn_log: Arc<ConnLog>) -> Self {
        NodeFacts {
            history,
            conn_log,
            health: Default::default(),
            report: Default::default(),
            ha: Default::default(),
        }
    }

    /// The node's connection log.
    pub fn conn_log(&self) -> Arc<ConnLog> {
        self.conn_log.clone()
    }

    pub fn set_ha(&self, group: String, shared: Arc<crate::node::ha::HaShared>) {
        *self.ha.lock().unwrap_or_else(|p| p.into_inner()) = Some((group, shared));
    }

    pub fn set_health(&self, health: BTreeMap<String, Vec<(IpAddr, bool)>>) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = health;
    }

    pub fn set_report(&self, report: NodeReport) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }
}

impl NodeLocal for NodeFacts {
    fn backend_healthy(&self, service_id: &str, backend: IpAddr) -> Option<bool> {
        let all = self.health.lock().unwrap_or_else(|p| p.into_inner());
        all.get(service_id)?
            .iter()
            .find(|(a, _)| *a == backend)
            .map(|(_, h)| *h)
    }

    fn history(&self, kind: &str, id: &str, period: &Period) -> Option<Result<Vec<Point>, String>> {
        let h = self.history.as_ref()?;
        let h = h.lock().unwrap_or_else(|p| p.into_inner());
        Some(h.query(kind, id, period).map_err(|e| e.to_string()))
    }

    fn connections(
        &self,
        service_id: &str,
        after: u64,
        limit: usize,
    ) -> Option<Vec<crate::control::local::ConnRecord>> {
        Some(self.conn_log.page(service_id, after, limit))
    }

    fn report(&self) -> Option<NodeReport> {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn ha(&self) -> Option<crate::control::store::HaRole> {
        let ha = self.ha.lock().unwrap_or_else(|p| p.into_inner());
        ha.as_ref().map(|(group, h)| crate::control::store::HaRole {
            group: group.clone(),
            active: h.active(),
            networks: h.networks(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_unknown_until_set_then_read_per_backend() {
        let f = NodeFacts::new(None, Arc::new(ConnLog::open(None).unwrap()));
        let (a, b): (IpAddr, IpAddr) = (
            "198.18.100.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        );
        assert_eq!(f.backend_healthy("svc-1", a), None);
        f.set_health(BTreeMap::from([(
            "svc-1".to_string(),
            vec![(a, false), (b, true)],
        )]));
        assert_eq!(f.backend_healthy("svc-1", a), Some(false));
        assert_eq!(f.backend_healthy("svc-1", b), Some(true));
        assert_eq!(
            f.backend_healthy("svc-2", a),
            None,
            "another service's backend"
        );
        assert!(
            f.history(
                "endpoint",
                "vpce-1",
                &Period {
                    from: 0,
                    to: 10,
                    granularity: 10
                }
            )
            .is_none()
        );
        assert!(f.report().is_none());
    }
}
