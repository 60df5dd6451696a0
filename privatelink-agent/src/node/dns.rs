//! Private DNS for consumer networks, served by hickory-server.
//!
//! Each consumer network with a `[dns.networks.<vpc>]` entry gets a DNS server (UDP and TCP) on its
//! configured address, on every interface of that network on this node. The address is put on the
//! interface (/32 or /128) and the sockets are bound to the interface, so two consumer networks
//! with the same CIDR and the same DNS address each get their own answers.
//!
//! What a network's server answers, recomputed after every sync:
//! - every Available endpoint's generated name (`<endpoint>.<service>.<region>.<zone>`) → its IP;
//! - the service's private DNS name → the IP of the one endpoint in this network that has private
//!   DNS on (the API keeps it to one);
//! - AAAA or A without an address of that family: NODATA; other names under the zone: NXDOMAIN;
//!   names outside every zone: NXDOMAIN or REFUSED, as configured.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    str::FromStr as _,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, Result};
use hickory_server::{
    Server,
    net::runtime::{Time, TokioRuntimeProvider},
    proto::rr::{
        LowerName, Name, RData, Record, RecordSet, RecordType, RrKey,
        rdata::{A, AAAA, SOA},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType},
};

use crate::{
    control::{
        state::State,
        types::{Cluster, ConnectionState},
    },
    datapath::Role,
    node::config::{DnsConfig, OtherNames},
    node::sync::NodeIface,
};

/// Name (lowercase, no trailing dot) → addresses, for one consumer network.
pub type Answers = BTreeMap<String, BTreeSet<IpAddr>>;

/// What the DNS server of each consumer network of `networks` answers, from the control-plane
/// state, in one pass over the endpoints (a node serving DNS in many networks would otherwise walk
/// every endpoint once per network on every revision).
pub fn answers<'n>(
    state: &State,
    networks: impl IntoIterator<Item = &'n str>,
) -> BTreeMap<&'n str, Answers> {
    let mut out: BTreeMap<&str, Answers> =
        networks.into_iter().map(|n| (n, Answers::new())).collect();
    for e in state.endpoints.values() {
        if e.state != ConnectionState::Available {
            continue;
        }
        let Some(out) = out.get_mut(e.network_id.as_str()) else {
            continue;
        };
        let Some(svc) = state.services.get(&e.service_id) else {
            continue;
        };
        // A dual-stack endpoint answers A and AAAA.
        out.entry(e.dns_name.to_ascii_lowercase())
            .or_default()
            .extend(e.all_ips());
        if e.private_dns_enabled
            && let Some(name) = &svc.private_dns_name
        {
            out.entry(name.clone()).or_default().extend(e.all_ips());
        }
    }
    out
}

fn fqdn(name: &str) -> Result<Name> {
    Name::from_str(&format!("{}.", name.trim_end_matches('.')))
        .with_context(|| format!("{name:?} is not a DNS name"))
}

/// One authoritative zone at `origin` with an SOA (its minimum is the negative-answer TTL) and the
/// given address records.
fn zone(origin: &Name, records: &[(Name, IpAddr)], ttl: u32) -> Result<Arc<dyn ZoneHandler>> {
    let mut sets: BTreeMap<RrKey, RecordSet> = BTreeMap::new();
    let soa = SOA::new(
        Name::from_str("ns.privatelink.")?,
        Name::from_str("hostmaster.privatelink.")?,
        1,
        3600,
        600,
        86400,
        ttl,
    );
    let mut add = |name: &Name, rtype: RecordType, data: RData| {
        sets.entry(RrKey::new(name.into(), rtype))
            .or_insert_with(|| RecordSet::new(name.clone(), rtype, 1))
            .insert(Record::from_rdata(name.clone(), ttl, data), 1);
    };
    add(origin, RecordType::SOA, RData::SOA(soa));
    for (name, ip) in records {
        match ip {
            IpAddr::V4(a) => add(name, RecordType::A, RData::A(A(*a))),
            IpAddr::V6(a) => add(name, RecordType::AAAA, RData::AAAA(AAAA(*a))),
        }
    }
    let z = InMemoryZoneHandler::<TokioRuntimeProvider>::new(
        origin.clone(),
        sets,
        ZoneType::Primary,
        AxfrPolicy::Deny,
    )
    .map_err(|e| anyhow::anyhow!("zone {origin}: {e}"))?;
    Ok(Arc::new(z))
}

/// A zone handler at the root that relays every name to `forwarders` (UDP, then TCP).
pub fn forwarder(forwarders: &[SocketAddr]) -> Result<Arc<dyn ZoneHandler>> {
    use hickory_server::{
        resolver::config::NameServerConfig,
        store::forwarder::{ForwardConfig, ForwardZoneHandler},
    };
    let name_servers = forwarders
        .iter()
        .map(|a| {
            let mut ns = NameServerConfig::udp_and_tcp(a.ip());
            for c in &mut ns.connections {
                c.port = a.port();
            }
            ns
        })
        .collect();
    let handler = ForwardZoneHandler::builder_tokio(ForwardConfig {
        name_servers,
        options: None,
    })
    .with_origin(Name::root())
    .build()
    .map_err(|e| anyhow::anyhow!("forwarder: {e}"))?;
    Ok(Arc::new(handler))
}

/// The catalog for one network: the generated-name zone, one zone per private DNS name, and at the
/// root an empty zone (other names: NXDOMAIN), the `forward` handler, or nothing (REFUSED).
pub fn catalog(
    answers: &Answers,
    cluster: &Cluster,
    cfg: &DnsConfig,
    forward: Option<&Arc<dyn ZoneHandler>>,
) -> Result<Catalog> {
    let zone_name = cluster.dns_zone.to_ascii_lowercase();
    let origin = fqdn(&zone_name)?;
    let mut generated = Vec::new();
    let mut cat = Catalog::new();
    for (name, ips) in answers {
        let n = fqdn(name)?;
        let recs: Vec<(Name, IpAddr)> = ips.iter().map(|ip| (n.clone(), *ip)).collect();
        if name.ends_with(&format!(".{zone_name}")) {
            generated.extend(recs);
        } else {
            cat.upsert(LowerName::new(&n), vec![zone(&n, &recs, cfg.ttl)?]);
        }
    }
    cat.upsert(
        LowerName::new(&origin),
        vec![zone(&origin, &generated, cfg.ttl)?],
    );
    let root = LowerName::new(&Name::root());
    match (cfg.others, forward) {
        (OtherNames::Nxdomain, _) => cat.upsert(root, vec![zone(&Name::root(), &[], cfg.ttl)?]),
        (OtherNames::Forward, Some(f)) => cat.upsert(root, vec![f.clone()]),
        (OtherNames::Forward, None) => anyhow::bail!("others = \"forward\" without a forwarder"),
        (OtherNames::Refuse, _) => {}
    }
    Ok(cat)
}

/// The request handler of one network's servers: the current catalog, swapped after each sync.
#[derive(Clone)]
struct Shared(Arc<RwLock<Arc<Catalog>>>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let catalog = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A running server on one interface.
struct Running {
    ifindex: u32,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The node's DNS servers and what they answer.
pub struct Dns {
    cfg: DnsConfig,
    cluster: Cluster,
    /// Per network: the last answers and the handler the servers share.
    networks: BTreeMap<String, (Answers, Shared)>,
    /// Per interface name.
    running: BTreeMap<String, Running>,
    /// The upstream relay, shared by every network's catalog (`others = "forward"`).
    forward: Option<Arc<dyn ZoneHandler>>,
}

impl Dns {
    /// Must run inside the tokio runtime (the forwarder's resolver lives there).
    pub fn new(cfg: DnsConfig, cluster: Cluster) -> Result<Self> {
        let networks = cfg
            .networks
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    (
                        Answers::new(),
                        Shared(Arc::new(RwLock::new(Arc::new(Catalog::new())))),
                    ),
                )
            })
            .collect();
        let forward = match cfg.others {
            OtherNames::Forward => Some(forwarder(&cfg.forwarders)?),
            _ => None,
        };
        Ok(Dns {
            cfg,
            cluster,
            networks,
            running: BTreeMap::new(),
            forward,
        })
    }

    /// Recomputes every network's answers; swaps the catalogs whose answers changed.
    pub fn update(&mut self, state: &State) {
        let names: Vec<String> = self.networks.keys().cloned().collect();
        let mut all = answers(state, names.iter().map(String::as_str));
        for (network, (last, shared)) in &mut self.networks {
            let now = all.remove(network.as_str()).unwrap_or_default();
            if &now == last && !last.is_empty() {
                continue;
            }
            match catalog(&now, &self.cluster, &self.cfg, self.forward.as_ref()) {
                Ok(c) => {
                    *shared.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
                    log::info!("dns: {network} answers {} names", now.len());
                    *last = now;
                }
                Err(e) => log::error!("dns: {network}: {e:#}"),
            }
        }
    }

    /// Starts a server on every present consumer interface of a network with DNS configured (and
    /// restarts it when the interface was re-created); stops those whose interface is gone.
    /// Must run inside the tokio runtime.
    pub fn ensure(&mut self, ifaces: &[NodeIface]) {
        let present: BTreeMap<&str, &NodeIface> = ifaces
            .iter()
            .filter(|i| i.role == Role::Consumer && self.networks.contains_key(&i.network))
            .map(|i| (i.name.as_str(), i))
            .collect();
        self.running.retain(|name, r| {
            present
                .get(name.as_str())
                .is_some_and(|i| i.ifindex == r.ifindex)
        });
        for (name, iface) in present {
            if self.running.contains_key(name) {
                continue;
            }
            let listen = self.cfg.networks[&iface.network].listen;
            let shared = self.networks[&iface.network].1.clone();
            match serve(iface, listen, self.cfg.port, shared) {
                Ok(task) => {
                    log::info!(
                        "dns: serving {} on {name} at {listen} port {}",
                        iface.network,
                        self.cfg.port
                    );
                    self.running.insert(
                        name.to_string(),
                        Running {
                            ifindex: iface.ifindex,
                            task,
                        },
                    );
                }
                Err(e) => log::warn!("dns: {name}: {e:#} (retried at the next resync)"),
            }
        }
    }
}

/// A socket of `ty` bound to `addr` on device `dev` only.
fn bound(dev: &str, addr: SocketAddr, ty: socket2::Type) -> Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.bind_device(Some(dev.as_bytes()))
        .with_context(|| format!("binding to device {dev}"))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("binding {addr} on {dev}"))?;
    Ok(s)
}

fn serve(
    iface: &NodeIface,
    listen: IpAddr,
    port: u16,
    handler: Shared,
) -> Result<tokio::task::JoinHandle<()>> {
    let dev = iface.name.as_str();
    crate::node::netlink::replace_host_address(iface.ifindex, listen)
        .with_context(|| format!("putting {listen} on {dev}"))?;
    let addr = SocketAddr::new(listen, port);
    let udp = bound(dev, addr, socket2::Type::DGRAM)?;
    let tcp = bound(dev, addr, socket2::Type::STREAM)?;
    tcp.listen(128)?;
    let udp = tokio::net::UdpSocket::from_std(udp.into())?;
    let tcp = tokio::net::TcpListener::from_std(tcp.into())?;
    let dev = dev.to_string();
    Ok(tokio::spawn(async move {
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16 << 10);
        if let Err(e) = server.block_until_done().await {
            log::warn!("dns: server on {dev} stopped: {e}");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::types::{Endpoint, Service};

    fn state() -> State {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "id": "svc-1", "service_name": "r.db.svc-1", "slot": 1, "name": "db",
            "private_dns_name": "db.example.com", "owner": "1", "network_id": "vpc-p",
            "service_type": "mysql", "backends": [], "port_mappings": [], "auto_accept": false,
            "allowlist": [], "tags": [], "created_at": 0 }))
        .unwrap();
        let ep = |id: &str, net: &str, ip: &str, st: &str, private: bool| -> Endpoint {
            serde_json::from_value(serde_json::json!({
                "id": id, "link_id": 1, "name": "e", "owner": "2", "network_id": net,
                "subnet_id": "s", "ip": ip, "service_id": "svc-1",
                "dns_name": format!("{id}.svc-1.r.privatelink.internal"),
                "private_dns_enabled": private, "state": st, "security_groups": [], "tags": [],
                "created_at": 0 }))
            .unwrap()
        };
        let mut s = State::default();
        s.services.insert(svc.id.clone(), svc);
        for e in [
            ep("ep-a", "vpc-1", "198.18.0.100", "Available", true),
            ep("ep-b", "vpc-2", "198.18.0.100", "Available", false),
            ep("ep-c", "vpc-1", "198.18.0.101", "Rejected", false),
        ] {
            s.endpoints.insert(e.id.clone(), e);
        }
        s
    }

    #[test]
    fn each_network_answers_its_own_available_endpoints_and_its_private_names() {
        let s = state();
        let alone = |network| answers(&s, [network]).remove(network).unwrap();
        let a = alone("vpc-1");
        let ip: IpAddr = "198.18.0.100".parse().unwrap();
        assert_eq!(
            a,
            Answers::from([
                ("db.example.com".into(), BTreeSet::from([ip])),
                (
                    "ep-a.svc-1.r.privatelink.internal".into(),
                    BTreeSet::from([ip])
                ),
            ]),
            "the rejected endpoint resolves nowhere"
        );
        let b = alone("vpc-2");
        assert_eq!(
            b.keys().collect::<Vec<_>>(),
            ["ep-b.svc-1.r.privatelink.internal"],
            "private DNS is off in vpc-2"
        );
        assert!(alone("vpc-3").is_empty());
        // All networks in one pass give each network what it gives alone.
        let all = answers(&s, ["vpc-1", "vpc-2", "vpc-3"]);
        assert_eq!(
            (
                &all["vpc-1"],
                &all["vpc-2"],
                all["vpc-3"].is_empty(),
                all.len()
            ),
            (&a, &b, true, 3)
        );
        // The catalog holds the generated zone, the private name and the root (NXDOMAIN mode).
        let cfg = DnsConfig::default();
        let cluster = Cluster::default();
        let c = catalog(&a, &cluster, &cfg, None).unwrap();
        for z in ["privatelink.internal.", "db.example.com.", "."] {
            assert!(
                c.contains(&LowerName::new(&Name::from_str(z).unwrap())),
                "{z}"
            );
        }
        let refuse = DnsConfig {
            others: OtherNames::Refuse,
            ..DnsConfig::default()
        };
        let c = catalog(&a, &cluster, &refuse, None).unwrap();
        assert!(!c.contains(&LowerName::new(&Name::root())));
        let forward = DnsConfig {
            others: OtherNames::Forward,
            ..DnsConfig::default()
        };
        assert!(
            catalog(&a, &cluster, &forward, None).is_err(),
            "forwarding needs its handler"
        );
    }
}
