//! The map writer: shadow state in userspace, only differences written, in an order that never
//! forwards wrongly in between, and flows of cut links removed from conntrack at once.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
        RingBuf, xdp::XdpMapError,
    },
};
use privatelink_common::{
    AllowKey, Backend4, Backend6, CONN_LOG_COUNTERS, ConnStats, ConnStats4, ConnStats6,
    DatapathConfig, EndpointIpKey4, EndpointIpKey6, EndpointIpValue, EndpointKey4, EndpointKey6,
    EndpointValue, FLOW_SYNC_COUNTERS, FLOW_SYNC_LOST, Flow, Flow4, Flow6, FlowEvent4, FlowEvent6,
    FlowKey, FlowKey4, FlowKey6, IfaceInfo, IfaceKey, LINK_AVAILABLE, LINK_EMPTY, LinkDropKey,
    LinkInfo, LinkStats, MAGLEV_SIZE, MAX_RULES, MaglevTable, NatRange4, NatRange6, OUTCOMES,
    PROXY_COUNTERS, ProxyPending, ProxyTlvs, Rule4, Rule6, RuleList4, RuleList6, names,
};

use super::{
    compile::{CompileError, MapState, compile, compile_links},
    model::Model,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("invalid datapath state: {0}")]
    Compile(#[from] CompileError),
    #[error(
        "state does not fit map {map}: needs {need} entries (index {need_index}), capacity {capacity}"
    )]
    Capacity {
        map: &'static str,
        need: usize,
        need_index: u64,
        capacity: u32,
    },
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("device map: {0}")]
    DevMap(#[from] XdpMapError),
    #[error(
        "refusing to write from network namespace {current}: this dataplane belongs to namespace {bound} \
         (device-map ifindexes resolve in the writer's namespace, so a write from elsewhere would \
         redirect to another namespace's interfaces)"
    )]
    WrongNamespace { bound: u64, current: u64 },
    #[error("reading the calling thread's network namespace: {0}")]
    Namespace(std::io::Error),
}

/// Inode of the calling thread's network namespace.
fn current_netns() -> Result<u64, DataplaneError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(DataplaneError::Namespace)
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// What an apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Map entries written or deleted.
    pub writes: usize,
    /// Conntrack entries removed because their link was cut.
    pub flows_cut: usize,
    /// Entries found different from what was last written (maps edited behind the agent's back),
    /// counted by `resync` before it repairs them.
    pub drift: usize,
}

/// Typed handles on every map, and the shadow of what was last written.
pub struct Dataplane {
    ifaces: HashMap<MapData, IfaceKey, IfaceInfo>,
    iface_index: Array<MapData, IfaceInfo>,
    endpoints4: HashMap<MapData, EndpointKey4, EndpointValue>,
    endpoint_ips4: HashMap<MapData, EndpointIpKey4, EndpointIpValue>,
    links: Array<MapData, LinkInfo>,
    allowlist: HashMap<MapData, AllowKey, u32>,
    rules4: Array<MapData, RuleList4>,
    maglev: Array<MapData, MaglevTable>,
    backends4: Array<MapData, Backend4>,
    nat4: Array<MapData, NatRange4>,
    ct4: HashMap<MapData, FlowKey4, Flow4>,
    endpoints6: HashMap<MapData, EndpointKey6, EndpointValue>,
    endpoint_ips6: HashMap<MapData, EndpointIpKey6, EndpointIpValue>,
    rules6: Array<MapData, RuleList6>,
    maglev6: Array<MapData, MaglevTable>,
    backends6: Array<MapData, Backend6>,
    nat6: Array<MapData, NatRange6>,
    ct6: HashMap<MapData, FlowKey6, Flow6>,
    config: ConfigMap,
    devmap: DevMapHash<MapData>,
    global_stats: PerCpuArray<MapData, u64>,
    link_stats: PerCpuArray<MapData, LinkStats>,
    link_drops: PerCpuHashMap<MapData, LinkDropKey, u64>,
    flow_cache_stats: PerCpuArray<MapData, u64>,
    /// Flow-limit accounting; the conntrack scan ([`StatsReader::retire`]) is what writes it.
    link_opened: Array<MapData, u64>,
    link_retired: Array<MapData, u64>,
    proxy_tlvs: HashMap<MapData, u32, ProxyTlvs>,
    /// Written by the datapath only; here for the stats reader's handles.
    proxy_pending4: HashMap<MapData, FlowKey4, ProxyPending>,
    proxy_pending6: HashMap<MapData, FlowKey6, ProxyPending>,
    proxy_stats: PerCpuArray<MapData, u64>,
    conn_stats4: PerCpuHashMap<MapData, FlowKey4, ConnStats4>,
    conn_stats6: PerCpuHashMap<MapData, FlowKey6, ConnStats6>,
    conn_log_stats: PerCpuArray<MapData, u64>,
    /// The connection log's ring buffer, until its reader takes it ([`Self::take_conn_log`]).
    conn_log: Option<RingBuf<MapData>>,
    /// The flow sync's events, switch and counters, until the group's task takes them
    /// ([`Self::take_flow_sync`]).
    flow_sync: Option<FlowSync>,
    /// Capacities of the hash maps (arrays know their length).
    caps: BTreeMap<&'static str, u32>,
    shadow: MapState,
    /// The model the shadow was compiled from, while it is known to match the maps (a change that
    /// touches only links is then compiled and written for those links alone).
    last_model: Option<Model>,
    /// The network namespace whose interfaces the ifindexes in the state refer to.
    netns: u64,
    /// Owned here, not by the model (the FIB generation is the config map's own, see
    /// [`ConfigMap`]): bumped after conntrack entries were deleted, so that the datapath's
    /// per-CPU flow caches stop standing in for them.
    flow_generation: u32,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DataplaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

fn capacity(ebpf: &Ebpf, name: &'static str) -> Result<u32, DataplaneError> {
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    let data: &MapData = match map {
        aya::maps::Map::HashMap(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::PerCpuHashMap(d) => d,
        _ => return Err(DataplaneError::MissingMap(name)),
    };
    let info = data.info().map_err(map_err(name))?;
    Ok(info.max_entries())
}

impl Dataplane {
    /// Takes the maps out of a loaded object. The maps start empty, as the shadow does. The
    /// dataplane is bound to the calling thread's network namespace: `apply` refuses to run in any
    /// other, because interface indexes mean different devices there.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let mut caps = BTreeMap::new();
        for name in [
            names::IFACES,
            names::ENDPOINTS4,
            names::ENDPOINT_IPS4,
            names::ENDPOINTS6,
            names::ENDPOINT_IPS6,
            names::ALLOWLIST,
            names::PROXY_TLVS,
        ] {
            caps.insert(name, capacity(ebpf, name)?);
        }
        Dataplane {
            ifaces: take(ebpf, names::IFACES)?,
            iface_index: take(ebpf, names::IFACE_INDEX)?,
            endpoints4: take(ebpf, names::ENDPOINTS4)?,
            endpoint_ips4: take(ebpf, names::ENDPOINT_IPS4)?,
            links: take(ebpf, names::LINKS)?,
            allowlist: take(ebpf, names::ALLOWLIST)?,
            rules4: take(ebpf, names::RULES4)?,
            maglev: take(ebpf, names::MAGLEV)?,
            backends4: take(ebpf, names::BACKENDS4)?,
            nat4: take(ebpf, names::NAT4)?,
            ct4: take(ebpf, names::CT4)?,
            endpoints6: take(ebpf, names::ENDPOINTS6)?,
            endpoint_ips6: take(ebpf, names::ENDPOINT_IPS6)?,
            rules6: take(ebpf, names::RULES6)?,
            maglev6: take(ebpf, names::MAGLEV6)?,
            backends6: take(ebpf, names::BACKENDS6)?,
            nat6: take(ebpf, names::NAT6)?,
            ct6: take(ebpf, names::CT6)?,
            config: ConfigMap(Arc::new(Mutex::new(ConfigInner {
                map: take(ebpf, names::CONFIG)?,
                fib_generation: 0,
            }))),
            devmap: take(ebpf, names::DEVMAP)?,
            global_stats: take(ebpf, names::GLOBAL_STATS)?,
            link_stats: take(ebpf, names::LINK_STATS)?,
            link_drops: take(ebpf, names::LINK_DROPS)?,
            flow_cache_stats: take(ebpf, names::FLOW_CACHE_STATS)?,
            link_opened: take(ebpf, names::LINK_OPENED)?,
            link_retired: take(ebpf, names::LINK_RETIRED)?,
            proxy_tlvs: take(ebpf, names::PROXY_TLVS)?,
            proxy_pending4: take(ebpf, names::PROXY_PENDING4)?,
            proxy_pending6: take(ebpf, names::PROXY_PENDING6)?,
            proxy_stats: take(ebpf, names::PROXY_STATS)?,
            conn_stats4: take(ebpf, names::CONN_STATS4)?,
            conn_stats6: take(ebpf, names::CONN_STATS6)?,
            conn_log_stats: take(ebpf, names::CONN_LOG_STATS)?,
            conn_log: Some(take(ebpf, names::CONN_LOG)?),
            flow_sync: Some(FlowSync {
                events: take(ebpf, names::FLOW_SYNC)?,
                on: take(ebpf, names::FLOW_SYNC_ON)?,
                stats: take(ebpf, names::FLOW_SYNC_STATS)?,
            }),
            caps,
            shadow: MapState::default(),
            last_model: None,
            netns: current_netns()?,
            flow_generation: 0,
        }
        .with_shadow_from_maps()
    }

    /// What was last written.
    pub fn shadow(&self) -> &MapState {
        &self.shadow
    }

    /// Starts from what the maps hold (pinned maps of a previous agent), so the first apply writes
    /// only real differences.
    fn with_shadow_from_maps(mut self) -> Result<Self, DataplaneError> {
        self.shadow = self.read_maps()?;
        self.config.lock().fib_generation = self.shadow.config.fib_generation;
        self.flow_generation = self.shadow.config.flow_generation;
        Ok(self)
    }

    /// The contents of every written map, as the kernel has them now.
    pub fn read_maps(&self) -> Result<MapState, DataplaneError> {
        let mut s = MapState {
            config: self.config.read()?,
            ..Default::default()
        };
        s.ifaces = read_hash(&self.ifaces, names::IFACES)?;
        s.iface_index = read_array(&self.iface_index, names::IFACE_INDEX, |v| {
            (v.role != 0).then_some(v)
        })?;
        for k in self.devmap.keys() {
            s.devmap.insert(k.map_err(map_err(names::DEVMAP))?);
        }
        // Array slots nobody wrote read as zeroes: those are not entries.
        s.nat4 = read_array(&self.nat4, names::NAT4, |v| (v.count != 0).then_some(v))?;
        s.backends4 = read_array(&self.backends4, names::BACKENDS4, |v| {
            (v.addr_be != 0).then_some(v)
        })?;
        s.nat6 = read_array(&self.nat6, names::NAT6, |v| (v.count != 0).then_some(v))?;
        s.backends6 = read_array(&self.backends6, names::BACKENDS6, |v| {
            (v.addr_be != [0; 4]).then_some(v)
        })?;
        let table = |v: MaglevTable| (v.backends != 0).then(|| v.slots.to_vec());
        s.maglev = read_array(&self.maglev, names::MAGLEV, table)?;
        s.maglev6 = read_array(&self.maglev6, names::MAGLEV6, table)?;
        for r in self.allowlist.iter() {
            s.allowlist.insert(r.map_err(map_err(names::ALLOWLIST))?.0);
        }
        s.links = read_array(&self.links, names::LINKS, |v| {
            (v.state != LINK_EMPTY).then_some(v)
        })?;
        // Rule lists in use are the ones links point at.
        for slot in rule_slots(&s.links, |l| l.rules_slot) {
            let l = self.rules4.get(&slot, 0).map_err(map_err(names::RULES4))?;
            s.rules4
                .insert(slot, l.rules[..(l.count as usize).min(MAX_RULES)].to_vec());
        }
        for slot in rule_slots(&s.links, |l| l.rules_slot6) {
            let l = self.rules6.get(&slot, 0).map_err(map_err(names::RULES6))?;
            s.rules6
                .insert(slot, l.rules[..(l.count as usize).min(MAX_RULES)].to_vec());
        }
        s.endpoint_ips4 = read_hash(&self.endpoint_ips4, names::ENDPOINT_IPS4)?;
        s.endpoints4 = read_hash(&self.endpoints4, names::ENDPOINTS4)?;
        s.endpoint_ips6 = read_hash(&self.endpoint_ips6, names::ENDPOINT_IPS6)?;
        s.endpoints6 = read_hash(&self.endpoints6, names::ENDPOINTS6)?;
        s.proxy_tlvs = read_hash(&self.proxy_tlvs, names::PROXY_TLVS)?;
        Ok(s)
    }

    /// Full resync: compares the maps with what was last written (counting every entry that
    /// differs as drift), then applies `model` against what the maps really hold.
    pub fn resync(&mut self, model: &Model) -> Result<ApplyReport, DataplaneError> {
        // A full compile and diff: drift can be anywhere.
        self.last_model = None;
        let actual = self.read_maps()?;
        let drift = drift(&self.shadow, &actual);
        if drift > 0 {
            self.shadow = actual;
        }
        let mut report = self.apply(model)?;
        report.drift = drift;
        Ok(report)
    }

    /// Checks that `s` fits every map before anything is written.
    fn check_capacity(&self, s: &MapState) -> Result<(), DataplaneError> {
        let hash = |name: &'static str, need: usize| -> Result<(), DataplaneError> {
            let cap = self.caps[name];
            if need > cap as usize {
                return Err(DataplaneError::Capacity {
                    map: name,
                    need,
                    need_index: 0,
                    capacity: cap,
                });
            }
            Ok(())
        };
        hash(names::IFACES, s.ifaces.len())?;
        hash(names::ENDPOINTS4, s.endpoints4.len())?;
        hash(names::ENDPOINT_IPS4, s.endpoint_ips4.len())?;
        hash(names::ENDPOINTS6, s.endpoints6.len())?;
        hash(names::ENDPOINT_IPS6, s.endpoint_ips6.len())?;
        hash(names::ALLOWLIST, s.allowlist.len())?;
        hash(names::PROXY_TLVS, s.proxy_tlvs.len())?;
        let array =
            |name: &'static str, len: u32, max_index: Option<u32>| -> Result<(), DataplaneError> {
                match max_index {
                    Some(i) if i >= len => Err(DataplaneError::Capacity {
                        map: name,
                        need: i as usize + 1,
                        need_index: i.into(),
                        capacity: len,
                    }),
                    _ => Ok(()),
                }
            };
        array(
            names::LINKS,
            self.links.len(),
            s.links.keys().next_back().copied(),
        )?;
        array(
            names::RULES4,
            self.rules4.len(),
            s.rules4.keys().next_back().copied(),
        )?;
        array(
            names::MAGLEV,
            self.maglev.len(),
            s.maglev.keys().next_back().copied(),
        )?;
        array(
            names::BACKENDS4,
            self.backends4.len(),
            s.backends4.keys().next_back().copied(),
        )?;
        array(
            names::NAT4,
            self.nat4.len(),
            s.nat4.keys().next_back().copied(),
        )?;
        array(
            names::RULES6,
            self.rules6.len(),
            s.rules6.keys().next_back().copied(),
        )?;
        array(
            names::MAGLEV6,
            self.maglev6.len(),
            s.maglev6.keys().next_back().copied(),
        )?;
        array(
            names::BACKENDS6,
            self.backends6.len(),
            s.backends6.keys().next_back().copied(),
        )?;
        array(
            names::NAT6,
            self.nat6.len(),
            s.nat6.keys().next_back().copied(),
        )?;
        Ok(())
    }

    /// Compiles `model` and writes the differences from the shadow. A model that does not compile
    /// or fit is refused as a whole and the maps keep the last good state.
    pub fn apply(&mut self, model: &Model) -> Result<ApplyReport, DataplaneError> {
        let current = current_netns()?;
        if current != self.netns {
            return Err(DataplaneError::WrongNamespace {
                bound: self.netns,
                current,
            });
        }
        let partial = match &self.last_model {
            Some(before) => compile_links(before, model, &self.shadow)?,
            None => None,
        };
        if let Some((old, new)) = partial {
            return self.apply_links(model, old, new);
        }
        let mut next = compile(model, &self.shadow)?;
        next.config.fib_generation = self.config.fib_generation();
        next.config.flow_generation = self.flow_generation;
        self.check_capacity(&next)?;
        let prev = std::mem::take(&mut self.shadow);
        self.last_model = None;
        match self.write(&prev, &next) {
            Ok(report) => {
                self.shadow = next;
                self.last_model = Some(model.clone());
                self.after_cut(report.flows_cut);
                Ok(report)
            }
            Err(e) => {
                // Partly written: the next full resync compares against the maps themselves. The
                // part may have cut flows, so their cached copies go too.
                self.shadow = prev;
                self.retire_cached_flows("a map write failed partway");
                Err(e)
            }
        }
    }

    /// Writes a links-only change (`old` → `new` entries of the touched links), in the same
    /// order as a full apply; the shadow and the last model follow.
    fn apply_links(
        &mut self,
        model: &Model,
        old: MapState,
        new: MapState,
    ) -> Result<ApplyReport, DataplaneError> {
        self.shadow.overlay(&old, &new);
        if let Err(e) = self.check_capacity(&self.shadow) {
            self.shadow.overlay(&new, &old);
            return Err(e);
        }
        let result = self.write(&old, &new);
        // A failed write may have cut flows before it stopped: their cached copies go too.
        match &result {
            Ok(r) => self.after_cut(r.flows_cut),
            Err(_) => self.retire_cached_flows("a map write failed partway"),
        }
        match (&result, &mut self.last_model) {
            (Ok(_), Some(before)) => {
                for id in old.links.keys() {
                    before.links.remove(id);
                }
                for id in new.links.keys() {
                    before.links.insert(*id, model.links[id].clone());
                }
            }
            _ => {
                self.shadow.overlay(&new, &old);
                self.last_model = None;
            }
        }
        result
    }

    fn write(&mut self, prev: &MapState, next: &MapState) -> Result<ApplyReport, DataplaneError> {
        let mut w = 0usize;
        // 1. What others point at comes first: config, interfaces, NAT, backends, rule lists,
        //    Maglev tables, allowlist.
        if !same_config(&prev.config, &next.config) {
            self.config.write(next.config)?;
            w += 1;
        }
        w += put_hash(&mut self.ifaces, &prev.ifaces, &next.ifaces, names::IFACES)?;
        w += put_array(
            &mut self.iface_index,
            &prev.iface_index,
            &next.iface_index,
            names::IFACE_INDEX,
            |v| *v,
        )?;
        for &ifindex in next.devmap.difference(&prev.devmap) {
            self.devmap.insert(ifindex, ifindex, None, 0)?;
            w += 1;
        }
        w += put_array(&mut self.nat4, &prev.nat4, &next.nat4, names::NAT4, |v| *v)?;
        w += put_array(
            &mut self.backends4,
            &prev.backends4,
            &next.backends4,
            names::BACKENDS4,
            |v| *v,
        )?;
        w += put_array(
            &mut self.rules4,
            &prev.rules4,
            &next.rules4,
            names::RULES4,
            |v| rule_list(v),
        )?;
        w += put_array(
            &mut self.maglev,
            &prev.maglev,
            &next.maglev,
            names::MAGLEV,
            |v| maglev_table(v),
        )?;
        w += put_array(&mut self.nat6, &prev.nat6, &next.nat6, names::NAT6, |v| *v)?;
        w += put_array(
            &mut self.backends6,
            &prev.backends6,
            &next.backends6,
            names::BACKENDS6,
            |v| *v,
        )?;
        w += put_array(
            &mut self.rules6,
            &prev.rules6,
            &next.rules6,
            names::RULES6,
            |v| rule_list6(v),
        )?;
        w += put_array(
            &mut self.maglev6,
            &prev.maglev6,
            &next.maglev6,
            names::MAGLEV6,
            |v| maglev_table(v),
        )?;
        for k in next.allowlist.difference(&prev.allowlist) {
            self.allowlist
                .insert(k, 1, 0)
                .map_err(map_err(names::ALLOWLIST))?;
            w += 1;
        }
        // A link id new to the maps starts with zeroed counters (ids are reused after deletion,
        // and the counters are pinned across agent restarts).
        let new_links: BTreeSet<u32> = next
            .links
            .keys()
            .filter(|id| !prev.links.contains_key(id))
            .copied()
            .collect();
        if !new_links.is_empty() {
            let cpus = nr_cpus()?;
            for id in &new_links {
                let zero =
                    PerCpuValues::try_from(vec![LinkStats::default(); cpus]).map_err(|e| {
                        DataplaneError::Map {
                            map: names::LINK_STATS,
                            source: MapError::IoError(e),
                        }
                    })?;
                self.link_stats
                    .set(*id, zero, 0)
                    .map_err(map_err(names::LINK_STATS))?;
            }
            // One pass over the drop counters: walking a hash map scans all its buckets, so this
            // must not happen once per link.
            let stale: Vec<LinkDropKey> = self
                .link_drops
                .keys()
                .filter_map(Result::ok)
                .filter(|k| new_links.contains(&k.link_id))
                .collect();
            for k in stale {
                let _ = self.link_drops.remove(&k);
            }
        }
        // 2. Links (state, rule-list pointer flips; their PROXY TLVs first), then the endpoint
        // entries that point at them.
        w += put_hash(
            &mut self.proxy_tlvs,
            &prev.proxy_tlvs,
            &next.proxy_tlvs,
            names::PROXY_TLVS,
        )?;
        w += put_array(
            &mut self.links,
            &prev.links,
            &next.links,
            names::LINKS,
            |v| *v,
        )?;
        w += put_hash(
            &mut self.endpoint_ips4,
            &prev.endpoint_ips4,
            &next.endpoint_ips4,
            names::ENDPOINT_IPS4,
        )?;
        w += put_hash(
            &mut self.endpoints4,
            &prev.endpoints4,
            &next.endpoints4,
            names::ENDPOINTS4,
        )?;
        w += put_hash(
            &mut self.endpoint_ips6,
            &prev.endpoint_ips6,
            &next.endpoint_ips6,
            names::ENDPOINT_IPS6,
        )?;
        w += put_hash(
            &mut self.endpoints6,
            &prev.endpoints6,
            &next.endpoints6,
            names::ENDPOINTS6,
        )?;
        // 3. Removals, entry points first, then what they pointed at.
        w += del_hash(
            &mut self.endpoints4,
            &prev.endpoints4,
            &next.endpoints4,
            names::ENDPOINTS4,
        )?;
        w += del_hash(
            &mut self.endpoints6,
            &prev.endpoints6,
            &next.endpoints6,
            names::ENDPOINTS6,
        )?;
        w += del_hash(
            &mut self.endpoint_ips4,
            &prev.endpoint_ips4,
            &next.endpoint_ips4,
            names::ENDPOINT_IPS4,
        )?;
        w += del_hash(
            &mut self.endpoint_ips6,
            &prev.endpoint_ips6,
            &next.endpoint_ips6,
            names::ENDPOINT_IPS6,
        )?;
        let empty_link = LinkInfo {
            state: LINK_EMPTY,
            ..Default::default()
        };
        w += clear_array(
            &mut self.links,
            &prev.links,
            &next.links,
            names::LINKS,
            empty_link,
        )?;
        w += del_hash(
            &mut self.proxy_tlvs,
            &prev.proxy_tlvs,
            &next.proxy_tlvs,
            names::PROXY_TLVS,
        )?;
        for k in prev.allowlist.difference(&next.allowlist) {
            self.allowlist
                .remove(k)
                .map_err(map_err(names::ALLOWLIST))?;
            w += 1;
        }
        // Flows of links that stopped being usable go now, not when they time out.
        let cut: BTreeSet<u32> = prev
            .links
            .iter()
            .filter(|(id, old)| usable(old) && !next.links.get(id).is_some_and(usable))
            .map(|(id, _)| *id)
            .collect();
        let flows_cut = if cut.is_empty() {
            0
        } else {
            self.cut_flows(&cut)?
        };
        w += clear_array(
            &mut self.maglev,
            &prev.maglev,
            &next.maglev,
            names::MAGLEV,
            maglev_table(&[]),
        )?;
        w += clear_array(
            &mut self.rules4,
            &prev.rules4,
            &next.rules4,
            names::RULES4,
            rule_list(&[]),
        )?;
        w += clear_array(
            &mut self.backends4,
            &prev.backends4,
            &next.backends4,
            names::BACKENDS4,
            Backend4::default(),
        )?;
        w += clear_array(
            &mut self.nat4,
            &prev.nat4,
            &next.nat4,
            names::NAT4,
            NatRange4::default(),
        )?;
        w += clear_array(
            &mut self.maglev6,
            &prev.maglev6,
            &next.maglev6,
            names::MAGLEV6,
            maglev_table(&[]),
        )?;
        w += clear_array(
            &mut self.rules6,
            &prev.rules6,
            &next.rules6,
            names::RULES6,
            rule_list6(&[]),
        )?;
        w += clear_array(
            &mut self.backends6,
            &prev.backends6,
            &next.backends6,
            names::BACKENDS6,
            Backend6::default(),
        )?;
        w += clear_array(
            &mut self.nat6,
            &prev.nat6,
            &next.nat6,
            names::NAT6,
            NatRange6::default(),
        )?;
        w += clear_array(
            &mut self.iface_index,
            &prev.iface_index,
            &next.iface_index,
            names::IFACE_INDEX,
            IfaceInfo::default(),
        )?;
        w += del_hash(&mut self.ifaces, &prev.ifaces, &next.ifaces, names::IFACES)?;
        for &ifindex in prev.devmap.difference(&next.devmap) {
            self.devmap
                .remove(ifindex)
                .map_err(map_err(names::DEVMAP))?;
            w += 1;
        }
        Ok(ApplyReport {
            writes: w,
            flows_cut,
            drift: 0,
        })
    }

    /// Invalidates every cached next hop (forward flows resolve their next hop again with their
    /// next packet). Called when routes or neighbours change; [`Self::config_map`] does the same
    /// from another thread.
    pub fn bump_fib_generation(&mut self) -> Result<u32, DataplaneError> {
        let generation = self.config.bump_fib_generation()?;
        self.shadow.config.fib_generation = generation;
        Ok(generation)
    }

    /// The config map, for bumping the FIB generation from another thread (the network watcher)
    /// without waiting for this writer.
    pub fn config_map(&self) -> ConfigMap {
        self.config.clone()
    }

    /// Retires every per-CPU flow-cache entry (they name the generation they were copied in), for
    /// after conntrack entries were deleted: a cached copy must not outlive its entry. Expired
    /// entries need no bump: a copy is trusted for less than half the flow's timeout since the
    /// table's last refresh, so the sweep never deletes an entry a cache may stand in for.
    pub fn bump_flow_generation(&mut self) -> Result<u32, DataplaneError> {
        let generation = self.flow_generation.wrapping_add(1);
        self.write_config(DatapathConfig {
            flow_generation: generation,
            ..self.shadow.config
        })?;
        self.flow_generation = generation;
        Ok(generation)
    }

    /// Writes `config` and, once it is in the map, the shadow's copy.
    fn write_config(&mut self, config: DatapathConfig) -> Result<(), DataplaneError> {
        self.shadow.config = self.config.write(config)?;
        Ok(())
    }

    /// The bump after `cut` deleted entries. The deletions stand either way; should the config
    /// write fail, a cached copy outlives its entry by at most a second (its age limit).
    fn after_cut(&mut self, cut: usize) {
        if cut > 0 {
            self.retire_cached_flows(&format!("{cut} conntrack entries deleted"));
        }
    }

    /// [`Self::bump_flow_generation`], logging a failure with `why` the bump was due.
    fn retire_cached_flows(&mut self, why: &str) {
        if let Err(e) = self.bump_flow_generation() {
            log::warn!("flow cache: {why}, generation not bumped: {e}");
        }
    }

    /// The connection log's ring buffer, for its one reader (`None` once taken).
    pub fn take_conn_log(&mut self) -> Option<RingBuf<MapData>> {
        self.conn_log.take()
    }

    /// The flow sync's maps, for the group's task (`None` once taken).
    pub fn take_flow_sync(&mut self) -> Option<FlowSync> {
        self.flow_sync.take()
    }

    /// Deletes every conntrack entry of the given links. Returns how many.
    pub fn cut_flows(&mut self, links: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
        Ok(
            remove_where(&mut self.ct4, |_, f| links.contains(&f.link_id))
                + remove_where(&mut self.ct6, |_, f| links.contains(&f.link_id)),
        )
    }

    /// Deletes every conntrack entry of flows to the given backends, as (provider network id,
    /// backend address). Returns how many.
    pub fn cut_backend_flows(&mut self, backends: &BTreeSet<(u32, std::net::IpAddr)>) -> usize {
        fn to_backend<A: Copy>(k: &FlowKey<A>, f: &Flow<A>) -> (u32, A) {
            if f.dir == privatelink_common::DIR_FORWARD {
                (f.peer_network, f.daddr_be)
            } else {
                (k.network_id, k.saddr_be)
            }
        }
        let n = remove_where(&mut self.ct4, |k, f| {
            let (net, a) = to_backend(k, f);
            backends.contains(&(net, std::net::Ipv4Addr::from(a.to_ne_bytes()).into()))
        }) + remove_where(&mut self.ct6, |k, f| {
            let (net, a) = to_backend(k, f);
            backends.contains(&(net, super::compile::addr6(a).into()))
        });
        self.after_cut(n);
        n
    }

    /// Independent handles on the conntrack tables, for the flow sync of a high-availability
    /// group on another task.
    pub fn flow_tables(&self) -> Result<FlowTables, DataplaneError> {
        let reader = self.stats_reader()?;
        Ok(FlowTables {
            ct4: reader.ct4,
            ct6: reader.ct6,
        })
    }

    /// Independent handles on the counter and conntrack maps, for a metrics reader on another
    /// thread (the writer keeps its own).
    pub fn stats_reader(&self) -> Result<StatsReader, DataplaneError> {
        use aya::maps::{IterableMap as _, Map as M};
        /// A second handle on map `m` (by its kernel id), typed as `T` through `kind`.
        fn again<T: TryFrom<aya::maps::Map, Error = MapError>>(
            m: &MapData,
            name: &'static str,
            kind: fn(MapData) -> aya::maps::Map,
        ) -> Result<T, DataplaneError> {
            let id = m.info().map_err(map_err(name))?.id();
            let data = MapData::from_id(id).map_err(map_err(name))?;
            T::try_from(kind(data)).map_err(map_err(name))
        }
        Ok(StatsReader {
            link_stats: again(self.link_stats.map(), names::LINK_STATS, M::PerCpuArray)?,
            link_drops: again(self.link_drops.map(), names::LINK_DROPS, M::PerCpuHashMap)?,
            global_stats: again(self.global_stats.map(), names::GLOBAL_STATS, M::PerCpuArray)?,
            flow_cache_stats: again(
                self.flow_cache_stats.map(),
                names::FLOW_CACHE_STATS,
                M::PerCpuArray,
            )?,
            ct4: again(self.ct4.map(), names::CT4, M::HashMap)?,
            proxy_pending4: again(self.proxy_pending4.map(), names::PROXY_PENDING4, M::HashMap)?,
            proxy_pending6: again(self.proxy_pending6.map(), names::PROXY_PENDING6, M::HashMap)?,
            proxy_stats: again(self.proxy_stats.map(), names::PROXY_STATS, M::PerCpuArray)?,
            conn_stats4: again(self.conn_stats4.map(), names::CONN_STATS4, M::PerCpuHashMap)?,
            conn_stats6: again(self.conn_stats6.map(), names::CONN_STATS6, M::PerCpuHashMap)?,
            conn_log_stats: again(
                self.conn_log_stats.map(),
                names::CONN_LOG_STATS,
                M::PerCpuArray,
            )?,
            link_opened: again(self.link_opened.map(), names::LINK_OPENED, M::Array)?,
            link_retired: again(self.link_retired.map(), names::LINK_RETIRED, M::Array)?,
            retired: super::batch::array_values(&self.link_retired)
                .into_iter()
                .filter(|(_, v)| *v != 0)
                .collect(),
            ct6: again(self.ct6.map(), names::CT6, M::HashMap)?,
            ct6_capacity: self
                .ct6
                .map()
                .info()
                .map_err(map_err(names::CT6))?
                .max_entries(),
            ct4_capacity: self
                .ct4
                .map()
                .info()
                .map_err(map_err(names::CT4))?
                .max_entries(),
            counter_capacity: (
                self.link_stats
                    .map()
                    .info()
                    .map_err(map_err(names::LINK_STATS))?
                    .max_entries(),
                self.link_drops
                    .map()
                    .info()
                    .map_err(map_err(names::LINK_DROPS))?
                    .max_entries(),
            ),
        })
    }

    /// Entries and capacity of every map the agent writes, from the shadow.
    pub fn map_usage(&self) -> Vec<(&'static str, usize, u32)> {
        let s = &self.shadow;
        vec![
            (names::IFACES, s.ifaces.len(), self.caps[names::IFACES]),
            (
                names::IFACE_INDEX,
                s.iface_index.len(),
                self.iface_index.len(),
            ),
            (
                names::ENDPOINTS4,
                s.endpoints4.len(),
                self.caps[names::ENDPOINTS4],
            ),
            (
                names::ENDPOINT_IPS4,
                s.endpoint_ips4.len(),
                self.caps[names::ENDPOINT_IPS4],
            ),
            (
                names::ALLOWLIST,
                s.allowlist.len(),
                self.caps[names::ALLOWLIST],
            ),
            (names::LINKS, s.links.len(), self.links.len()),
            (names::RULES4, s.rules4.len(), self.rules4.len()),
            (names::MAGLEV, s.maglev.len(), self.maglev.len()),
            (names::BACKENDS4, s.backends4.len(), self.backends4.len()),
            (names::NAT4, s.nat4.len(), self.nat4.len()),
            (
                names::ENDPOINTS6,
                s.endpoints6.len(),
                self.caps[names::ENDPOINTS6],
            ),
            (
                names::ENDPOINT_IPS6,
                s.endpoint_ips6.len(),
                self.caps[names::ENDPOINT_IPS6],
            ),
            (names::RULES6, s.rules6.len(), self.rules6.len()),
            (names::MAGLEV6, s.maglev6.len(), self.maglev6.len()),
            (names::BACKENDS6, s.backends6.len(), self.backends6.len()),
            (names::NAT6, s.nat6.len(), self.nat6.len()),
        ]
    }

    /// All IPv4 conntrack entries (for metrics, tests and the CLI).
    pub fn flows(&self) -> Vec<(FlowKey4, Flow4)> {
        super::batch::entries(&self.ct4)
    }

    /// All IPv6 conntrack entries.
    pub fn flows6(&self) -> Vec<(FlowKey6, Flow6)> {
        super::batch::entries(&self.ct6)
    }

    /// Global outcome counters summed over CPUs, indexed by outcome code.
    pub fn global_stats(&self) -> Result<Vec<u64>, DataplaneError> {
        (0..OUTCOMES)
            .map(|i| sum_outcome(&self.global_stats, i).map_err(map_err(names::GLOBAL_STATS)))
            .collect()
    }

    /// Flow-cache (hits, fills) summed over CPUs.
    pub fn flow_cache_stats(&self) -> Result<(u64, u64), DataplaneError> {
        flow_cache_sums(&self.flow_cache_stats)
    }

    /// A link's counters summed over CPUs.
    pub fn link_stats(&self, link_id: u32) -> Result<LinkStats, DataplaneError> {
        sum_link(&self.link_stats, link_id).map_err(map_err(names::LINK_STATS))
    }

    /// A link's drops by reason, summed over CPUs.
    pub fn link_drops(&self, link_id: u32) -> BTreeMap<u32, u64> {
        sum_drops(&self.link_drops)
            .range((link_id, 0)..=(link_id, u32::MAX))
            .map(|(&(_, reason), &n)| (reason, n))
            .collect()
    }
}

/// Flow-cache (hits, fills) summed over CPUs.
fn flow_cache_sums(map: &PerCpuArray<MapData, u64>) -> Result<(u64, u64), DataplaneError> {
    let sum = |i| sum_outcome(map, i).map_err(map_err(names::FLOW_CACHE_STATS));
    Ok((
        sum(privatelink_common::FLOW_CACHE_HITS)?,
        sum(privatelink_common::FLOW_CACHE_FILLS)?,
    ))
}

/// One outcome counter summed over CPUs.
fn sum_outcome(map: &PerCpuArray<MapData, u64>, code: u32) -> Result<u64, MapError> {
    Ok(map.get(&code, 0)?.iter().sum())
}

/// A link's counters summed over CPUs.
fn sum_link(map: &PerCpuArray<MapData, LinkStats>, link_id: u32) -> Result<LinkStats, MapError> {
    let mut sum = LinkStats::default();
    for s in map.get(&link_id, 0)?.iter() {
        sum.add(s);
    }
    Ok(sum)
}

/// Drops by (link, reason), summed over CPUs.
fn sum_drops(map: &PerCpuHashMap<MapData, LinkDropKey, u64>) -> BTreeMap<(u32, u32), u64> {
    let mut out = BTreeMap::new();
    for (k, v) in map.iter().filter_map(Result::ok) {
        *out.entry((k.link_id, k.reason)).or_default() += v.iter().sum::<u64>();
    }
    out
}

/// Whether two configs are the same as the writer sees them: the FIB generation is the config
/// map's own ([`ConfigMap`]) and may move on between the writer's writes.
fn same_config(a: &DatapathConfig, b: &DatapathConfig) -> bool {
    DatapathConfig {
        fib_generation: 0,
        ..*a
    } == DatapathConfig {
        fib_generation: 0,
        ..*b
    }
}

/// The datapath's config map (index 0), shared by the map writer and whoever bumps the FIB
/// generation from another thread (the network watcher, which must not wait for a full resync).
/// Every write happens under its lock and carries the latest FIB generation, so neither side
/// undoes the other's change.
#[derive(Clone)]
pub struct ConfigMap(Arc<Mutex<ConfigInner>>);

struct ConfigInner {
    map: Array<MapData, DatapathConfig>,
    fib_generation: u32,
}

impl ConfigInner {
    /// The config the datapath runs with: the map's, or the defaults while the map was never
    /// written (it then reads as zeroes, and the datapath uses the defaults).
    fn current(&self) -> Result<DatapathConfig, DataplaneError> {
        let cfg = self.map.get(&0, 0).map_err(map_err(names::CONFIG))?;
        Ok(if cfg.udp_timeout_ns == 0 {
            DatapathConfig::DEFAULT
        } else {
            cfg
        })
    }
}

impl ConfigMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConfigInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> Result<DatapathConfig, DataplaneError> {
        self.lock().current()
    }

    fn fib_generation(&self) -> u32 {
        self.lock().fib_generation
    }

    /// Writes `config` with the current FIB generation; returns what was written.
    fn write(&self, config: DatapathConfig) -> Result<DatapathConfig, DataplaneError> {
        let mut inner = self.lock();
        let config = DatapathConfig {
            fib_generation: inner.fib_generation,
            ..config
        };
        inner
            .map
            .set(0, config, 0)
            .map_err(map_err(names::CONFIG))?;
        Ok(config)
    }

    /// Invalidates every cached next hop: the map's config as it is, with the next FIB
    /// generation. Returns that generation.
    pub fn bump_fib_generation(&self) -> Result<u32, DataplaneError> {
        let mut inner = self.lock();
        let current = inner.current()?;
        let generation = inner.fib_generation.wrapping_add(1);
        inner
            .map
            .set(
                0,
                DatapathConfig {
                    fib_generation: generation,
                    ..current
                },
                0,
            )
            .map_err(map_err(names::CONFIG))?;
        inner.fib_generation = generation;
        Ok(generation)
    }
}

/// Entries that differ between two map states (added, removed or changed).
fn drift(a: &MapState, b: &MapState) -> usize {
    fn count<K: Ord, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
        a.iter().filter(|(k, v)| b.get(k) != Some(v)).count()
            + b.keys().filter(|k| !a.contains_key(k)).count()
    }
    fn count_set<K: Ord>(a: &BTreeSet<K>, b: &BTreeSet<K>) -> usize {
        a.symmetric_difference(b).count()
    }
    usize::from(!same_config(&a.config, &b.config))
        + count(&a.ifaces, &b.ifaces)
        + count(&a.iface_index, &b.iface_index)
        + count_set(&a.devmap, &b.devmap)
        + count(&a.nat4, &b.nat4)
        + count(&a.backends4, &b.backends4)
        + count(&a.rules4, &b.rules4)
        + count(&a.maglev, &b.maglev)
        + count_set(&a.allowlist, &b.allowlist)
        + count(&a.links, &b.links)
        + count(&a.endpoint_ips4, &b.endpoint_ips4)
        + count(&a.endpoints4, &b.endpoints4)
        + count(&a.nat6, &b.nat6)
        + count(&a.backends6, &b.backends6)
        + count(&a.rules6, &b.rules6)
        + count(&a.maglev6, &b.maglev6)
        + count(&a.endpoint_ips6, &b.endpoint_ips6)
        + count(&a.endpoints6, &b.endpoints6)
        + count(&a.proxy_tlvs, &b.proxy_tlvs)
}

/// Possible CPUs, the length of per-CPU values.
fn nr_cpus() -> Result<usize, DataplaneError> {
    aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
        map: names::LINK_STATS,
        source: MapError::IoError(e),
    })
}

/// The conntrack tables, read and written beside the `Dataplane` (see `Dataplane::flow_tables`).
pub struct FlowTables {
    ct4: HashMap<MapData, FlowKey4, Flow4>,
    ct6: HashMap<MapData, FlowKey6, Flow6>,
}

impl FlowTables {
    pub fn entries4(&self) -> Vec<(FlowKey4, Flow4)> {
        super::batch::entries(&self.ct4)
    }

    pub fn entries6(&self) -> Vec<(FlowKey6, Flow6)> {
        super::batch::entries(&self.ct6)
    }

    /// The entry under `k`, if there is one.
    pub fn get4(&self, k: &FlowKey4) -> Option<Flow4> {
        self.ct4.get(k, 0).ok()
    }

    pub fn get6(&self, k: &FlowKey6) -> Option<Flow6> {
        self.ct6.get(k, 0).ok()
    }

    pub fn insert4(&mut self, k: &FlowKey4, v: &Flow4) -> Result<(), DataplaneError> {
        self.ct4.insert(k, v, 0).map_err(map_err(names::CT4))
    }

    pub fn insert6(&mut self, k: &FlowKey6, v: &Flow6) -> Result<(), DataplaneError> {
        self.ct6.insert(k, v, 0).map_err(map_err(names::CT6))
    }

    /// Removes an entry; one that is not there is no error.
    pub fn remove4(&mut self, k: &FlowKey4) -> Result<(), DataplaneError> {
        match self.ct4.remove(k) {
            Err(MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(map_err(names::CT4)(e)),
        }
    }

    pub fn remove6(&mut self, k: &FlowKey6) -> Result<(), DataplaneError> {
        match self.ct6.remove(k) {
            Err(MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(e) => Err(map_err(names::CT6)(e)),
        }
    }
}

/// The datapath's flow-sync events ([`FlowEvent4`]/[`FlowEvent6`]: a flow made, or its TCP
/// state changed), the switch that turns them on, and the count of those a full ring lost.
pub struct FlowSync {
    pub events: RingBuf<MapData>,
    on: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
}

/// One event as the ring holds it: which table, and the key of one of the flow's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEventKey {
    V4(FlowKey4),
    V6(FlowKey6),
}

impl FlowSync {
    /// Starts or stops the events (a node outside any group writes none).
    pub fn switch(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.on
            .set(0, u32::from(on), 0)
            .map_err(map_err(names::FLOW_SYNC_ON))
    }

    /// Events lost to a full ring, summed over CPUs.
    pub fn lost(&self) -> u64 {
        sums::<{ FLOW_SYNC_COUNTERS as usize }>(&self.stats)[FLOW_SYNC_LOST as usize]
    }

    /// Takes every event in the ring (the malformed, which the datapath never writes, skipped).
    pub fn drain(&mut self) -> Vec<FlowEventKey> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            let e = match item.first() {
                Some(4) => bytemuck::try_pod_read_unaligned::<FlowEvent4>(&item)
                    .ok()
                    .map(|e| FlowEventKey::V4(e.key)),
                Some(6) => bytemuck::try_pod_read_unaligned::<FlowEvent6>(&item)
                    .ok()
                    .map(|e| FlowEventKey::V6(e.key)),
                _ => None,
            };
            out.extend(e);
        }
        out
    }
}

/// The ring's descriptor, which becomes readable when the datapath submits an event.
impl std::os::fd::AsRawFd for FlowSync {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.events.as_raw_fd()
    }
}

/// Read-only handles on the counters and conntrack (see `Dataplane::stats_reader`).
pub struct StatsReader {
    link_stats: PerCpuArray<MapData, LinkStats>,
    link_drops: PerCpuHashMap<MapData, LinkDropKey, u64>,
    global_stats: PerCpuArray<MapData, u64>,
    flow_cache_stats: PerCpuArray<MapData, u64>,
    ct4: HashMap<MapData, FlowKey4, Flow4>,
    ct6: HashMap<MapData, FlowKey6, Flow6>,
    proxy_pending4: HashMap<MapData, FlowKey4, ProxyPending>,
    proxy_pending6: HashMap<MapData, FlowKey6, ProxyPending>,
    proxy_stats: PerCpuArray<MapData, u64>,
    conn_stats4: PerCpuHashMap<MapData, FlowKey4, ConnStats4>,
    conn_stats6: PerCpuHashMap<MapData, FlowKey6, ConnStats6>,
    conn_log_stats: PerCpuArray<MapData, u64>,
    link_opened: Array<MapData, u64>,
    link_retired: Array<MapData, u64>,
    /// What `link_retired` holds where it is not 0.
    retired: std::collections::HashMap<u32, u64>,
    pub ct4_capacity: u32,
    pub ct6_capacity: u32,
    /// Capacities of the counter maps (LINK_STATS, LINK_DROPS).
    pub counter_capacity: (u32, u32),
}

/// Every counter of a per-CPU array, summed over CPUs (a failed read counts 0).
fn sums<const N: usize>(map: &PerCpuArray<MapData, u64>) -> [u64; N] {
    std::array::from_fn(|i| sum_outcome(map, i as u32).unwrap_or_default())
}

/// A logged connection whose flow is gone: its tuple, translation and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnEnd {
    pub link_id: u32,
    pub proto: u8,
    pub consumer: std::net::SocketAddr,
    pub endpoint: std::net::SocketAddr,
    pub nat: std::net::SocketAddr,
    pub backend: std::net::SocketAddr,
    /// CLOCK_MONOTONIC ns when the flow was made.
    pub opened_ns: u64,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    /// `CONN_FIN_*` and `CONN_RST` bits.
    pub ended: u32,
}

/// The entries of `stats` whose forward flow is not in `ct`, removed and returned, each CPU's
/// counters summed and its `ended` bits merged (the translation is the one CPU's that made the
/// flow: the others' copies are zero there).
fn ended<A>(
    stats: &mut PerCpuHashMap<MapData, FlowKey<A>, ConnStats<A>>,
    ct: &HashMap<MapData, FlowKey<A>, Flow<A>>,
) -> Vec<ConnEnd>
where
    A: Copy + Default + PartialEq + super::compile::WireAddr,
    FlowKey<A>: aya::Pod,
    Flow<A>: aya::Pod,
    ConnStats<A>: aya::Pod,
{
    let gone = flows_gone(stats.keys(), ct);
    gone.into_iter()
        .filter_map(|k| {
            let per_cpu = stats.get(&k, 0).ok()?;
            let _ = stats.remove(&k);
            let s = per_cpu
                .iter()
                .find(|c| c.opened_ns != 0)
                .copied()
                .unwrap_or_default();
            let total = |f: fn(&ConnStats<A>) -> u64| per_cpu.iter().map(f).sum();
            let at = |a: A, port_be: u16| std::net::SocketAddr::new(a.ip(), u16::from_be(port_be));
            Some(ConnEnd {
                link_id: s.link_id,
                proto: k.proto,
                consumer: at(k.saddr_be, k.sport_be),
                endpoint: at(k.daddr_be, k.dport_be),
                nat: at(s.nat_be, s.nat_port_be),
                backend: at(s.backend_be, s.backend_port_be),
                opened_ns: s.opened_ns,
                fwd_packets: total(|c| c.fwd_packets),
                fwd_bytes: total(|c| c.fwd_bytes),
                rev_packets: total(|c| c.rev_packets),
                rev_bytes: total(|c| c.rev_bytes),
                ended: per_cpu.iter().fold(0, |e, c| e | c.ended),
            })
        })
        .collect()
}

/// Removes the pending PROXY headers whose flow is gone from `ct` (it ended, or expired, before
/// the backend acknowledged the header).
fn forget_pending<A>(
    pending: &mut HashMap<MapData, FlowKey<A>, ProxyPending>,
    ct: &HashMap<MapData, FlowKey<A>, Flow<A>>,
) where
    FlowKey<A>: aya::Pod,
    Flow<A>: aya::Pod,
{
    for k in flows_gone(pending.keys(), ct) {
        let _ = pending.remove(&k);
    }
}

/// The keys of `keys` (a side table's, keyed by forward keys) whose flow is not in `ct`.
fn flows_gone<A>(
    keys: impl Iterator<Item = Result<FlowKey<A>, MapError>>,
    ct: &HashMap<MapData, FlowKey<A>, Flow<A>>,
) -> Vec<FlowKey<A>>
where
    FlowKey<A>: aya::Pod,
    Flow<A>: aya::Pod,
{
    keys.filter_map(Result::ok)
        .filter(|k| ct.get(k, 0).is_err())
        .collect()
}

/// Removes the conntrack entries `doomed` picks. Returns how many.
fn remove_where<A>(
    ct: &mut HashMap<MapData, FlowKey<A>, Flow<A>>,
    doomed: impl Fn(&FlowKey<A>, &Flow<A>) -> bool,
) -> usize
where
    FlowKey<A>: aya::Pod,
    Flow<A>: aya::Pod,
{
    let keys: Vec<FlowKey<A>> = super::batch::entries(ct)
        .into_iter()
        .filter(|(k, f)| doomed(k, f))
        .map(|(k, _)| k)
        .collect();
    for k in &keys {
        // Already gone (the datapath met it first) is fine.
        let _ = ct.remove(k);
    }
    keys.len()
}

/// One read of a conntrack table: expired entries removed, the rest's views appended to `views`.
/// Returns how many were removed.
fn scan_table<A>(
    ct: &mut HashMap<MapData, FlowKey<A>, Flow<A>>,
    now: u64,
    cfg: &DatapathConfig,
    ipv6: bool,
    views: &mut Vec<FlowView>,
) -> usize
where
    FlowKey<A>: aya::Pod,
    Flow<A>: aya::Pod,
{
    let mut removed = 0;
    for (k, f) in super::batch::entries(ct) {
        if now.saturating_sub(f.last_seen_ns) > cfg.timeout_for(k.proto, f.tcp_state) {
            // Already gone (the datapath met it first) is fine.
            let _ = ct.remove(&k);
            removed += 1;
        } else {
            views.push(FlowView {
                ipv6,
                network_id: k.network_id,
                proto: k.proto,
                link_id: f.link_id,
                dir: f.dir,
                tcp_state: f.tcp_state,
                last_seen_ns: f.last_seen_ns,
            });
        }
    }
    removed
}

/// The rule-list slots (of the family `slot` picks) that links point at; 0 is "no groups".
fn rule_slots(links: &BTreeMap<u32, LinkInfo>, slot: impl Fn(&LinkInfo) -> u32) -> BTreeSet<u32> {
    links.values().map(slot).filter(|&r| r != 0).collect()
}

/// Every entry of a hash map.
fn read_hash<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, DataplaneError> {
    Ok(super::batch::try_entries(map)
        .map_err(map_err(name))?
        .into_iter()
        .collect())
}

/// The slots of an array map that `entry` turns into entries (it refuses empty slots).
fn read_array<M: aya::Pod, V>(
    map: &Array<MapData, M>,
    name: &'static str,
    entry: impl Fn(M) -> Option<V>,
) -> Result<BTreeMap<u32, V>, DataplaneError> {
    let mut out = BTreeMap::new();
    for (i, v) in map.iter().enumerate() {
        if let Some(e) = entry(v.map_err(map_err(name))?) {
            out.insert(i as u32, e);
        }
    }
    Ok(out)
}

/// Writes the entries of an array map that are new or changed, converted by `value`.
fn put_array<V, M: aya::Pod>(
    map: &mut Array<MapData, M>,
    prev: &BTreeMap<u32, V>,
    next: &BTreeMap<u32, V>,
    name: &'static str,
    value: impl Fn(&V) -> M,
) -> Result<usize, DataplaneError>
where
    V: PartialEq,
{
    let mut w = 0;
    for (k, v) in changed(prev, next) {
        map.set(*k, value(v), 0).map_err(map_err(name))?;
        w += 1;
    }
    Ok(w)
}

/// Resets the entries of an array map that `next` no longer has to `empty`.
fn clear_array<V, M: aya::Pod + Copy>(
    map: &mut Array<MapData, M>,
    prev: &BTreeMap<u32, V>,
    next: &BTreeMap<u32, V>,
    name: &'static str,
    empty: M,
) -> Result<usize, DataplaneError> {
    let mut w = 0;
    for k in removed(prev, next) {
        map.set(*k, empty, 0).map_err(map_err(name))?;
        w += 1;
    }
    Ok(w)
}

/// Writes the entries of a hash map that are new or changed.
fn put_hash<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    prev: &BTreeMap<K, V>,
    next: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<usize, DataplaneError> {
    let mut w = 0;
    for (k, v) in changed(prev, next) {
        map.insert(k, v, 0).map_err(map_err(name))?;
        w += 1;
    }
    Ok(w)
}

/// Deletes the entries of a hash map that `next` no longer has.
fn del_hash<K: aya::Pod + Ord, V>(
    map: &mut HashMap<MapData, K, V>,
    prev: &BTreeMap<K, V>,
    next: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<usize, DataplaneError>
where
    V: aya::Pod,
{
    let mut w = 0;
    for k in removed(prev, next) {
        map.remove(k).map_err(map_err(name))?;
        w += 1;
    }
    Ok(w)
}

impl StatsReader {
    /// Flow-cache (hits, fills) summed over CPUs (zeroes if unreadable).
    pub fn flow_cache(&self) -> (u64, u64) {
        flow_cache_sums(&self.flow_cache_stats).unwrap_or_default()
    }

    /// A link's counters summed over CPUs.
    pub fn link(&self, link_id: u32) -> Option<LinkStats> {
        sum_link(&self.link_stats, link_id).ok()
    }

    /// Drops by (link, reason), summed over CPUs.
    pub fn drops(&self) -> BTreeMap<(u32, u32), u64> {
        sum_drops(&self.link_drops)
    }

    /// Global outcome counters, indexed by outcome code.
    pub fn outcomes(&self) -> Vec<u64> {
        (0..OUTCOMES)
            .map(|i| sum_outcome(&self.global_stats, i).unwrap_or(0))
            .collect()
    }

    /// Every IPv4 conntrack entry.
    pub fn flows(&self) -> Vec<(FlowKey4, Flow4)> {
        super::batch::entries(&self.ct4)
    }

    /// Every IPv6 conntrack entry.
    pub fn flows6(&self) -> Vec<(FlowKey6, Flow6)> {
        super::batch::entries(&self.ct6)
    }

    /// Every link's count of flows admitted under a flow limit (`LINK_OPENED`), where not 0.
    pub fn opened(&self) -> Vec<(u32, u64)> {
        super::batch::array_values(&self.link_opened)
            .into_iter()
            .filter(|(_, v)| *v != 0)
            .collect()
    }

    /// Tells the datapath how many flows of each link ended: for a link whose count was `opened`
    /// (read before the scan that found it `live` flows), `opened − live` (wrapping: a link
    /// without a limit opens nothing and has live flows all the same). Writes only what changed;
    /// returns how many writes.
    pub fn retire(
        &mut self,
        opened: &[(u32, u64)],
        live: &BTreeMap<u32, u64>,
    ) -> Result<usize, DataplaneError> {
        let opened: std::collections::HashMap<u32, u64> = opened.iter().copied().collect();
        let links: BTreeSet<u32> = opened
            .keys()
            .chain(live.keys())
            .chain(self.retired.keys())
            .copied()
            .collect();
        let mut writes = 0;
        for link in links {
            let o = opened.get(&link).copied().unwrap_or(0);
            let want = o.wrapping_sub(live.get(&link).copied().unwrap_or(0));
            if self.retired.get(&link).copied().unwrap_or(0) == want {
                continue;
            }
            self.link_retired
                .set(link, want, 0)
                .map_err(map_err(names::LINK_RETIRED))?;
            writes += 1;
            if want == 0 {
                self.retired.remove(&link);
            } else {
                self.retired.insert(link, want);
            }
        }
        Ok(writes)
    }

    /// One pass over both conntrack tables at `now`: the expired entries it meets are removed
    /// (`cfg`'s timeouts), the others returned as the counters see them, with how many went.
    pub fn scan(&mut self, now: u64, cfg: &DatapathConfig) -> (Vec<FlowView>, usize) {
        let mut views = Vec::new();
        let removed = scan_table(&mut self.ct4, now, cfg, false, &mut views)
            + scan_table(&mut self.ct6, now, cfg, true, &mut views);
        forget_pending(&mut self.proxy_pending4, &self.ct4);
        forget_pending(&mut self.proxy_pending6, &self.ct6);
        (views, removed)
    }

    /// The PROXY counters summed over CPUs: headers sent, headers acknowledged, MSS clamped.
    pub fn proxy(&self) -> [u64; PROXY_COUNTERS as usize] {
        sums(&self.proxy_stats)
    }

    /// The connection log's counters summed over CPUs: records written to the ring, records lost
    /// to a full ring, connections logged without counters.
    pub fn conn_log(&self) -> [u64; CONN_LOG_COUNTERS as usize] {
        sums(&self.conn_log_stats)
    }

    /// The logged connections whose flow is gone from conntrack (ended and expired, or removed),
    /// with their counters; their entries are removed. Call after [`Self::scan`], which removes
    /// the expired flows.
    pub fn ended_connections(&mut self) -> Vec<ConnEnd> {
        let mut out = ended(&mut self.conn_stats4, &self.ct4);
        out.extend(ended(&mut self.conn_stats6, &self.ct6));
        out
    }

    /// Every conntrack entry of both families, as the counters see them.
    pub fn flow_views(&self) -> Vec<FlowView> {
        fn view<A>(ipv6: bool) -> impl Fn((FlowKey<A>, Flow<A>)) -> FlowView {
            move |(k, f)| FlowView {
                ipv6,
                network_id: k.network_id,
                proto: k.proto,
                link_id: f.link_id,
                dir: f.dir,
                tcp_state: f.tcp_state,
                last_seen_ns: f.last_seen_ns,
            }
        }
        let v4 = super::batch::entries(&self.ct4)
            .into_iter()
            .map(view(false));
        v4.chain(super::batch::entries(&self.ct6).into_iter().map(view(true)))
            .collect()
    }
}

/// What the counters need of a conntrack entry of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowView {
    /// From the IPv6 table.
    pub ipv6: bool,
    /// Network of the entry's key (provider network for reply entries).
    pub network_id: u32,
    pub proto: u8,
    pub link_id: u32,
    pub dir: u8,
    pub tcp_state: u8,
    pub last_seen_ns: u64,
}

fn usable(l: &LinkInfo) -> bool {
    l.state == LINK_AVAILABLE && l.allowed != 0
}

/// Entries of `next` that are new or differ from `prev`.
fn changed<'a, K: Ord, V: PartialEq>(
    prev: &'a BTreeMap<K, V>,
    next: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (&'a K, &'a V)> {
    // Both are sorted: one merged walk instead of a lookup per key (100k+ entries per sync).
    let mut p = prev.iter().peekable();
    next.iter().filter(move |(k, v)| {
        while p.next_if(|(pk, _)| *pk < *k).is_some() {}
        p.next_if(|(pk, _)| *pk == *k)
            .is_none_or(|(_, pv)| pv != *v)
    })
}

/// Keys of `prev` that `next` no longer has.
fn removed<'a, K: Ord, V>(
    prev: &'a BTreeMap<K, V>,
    next: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = &'a K> {
    let mut n = next.keys().peekable();
    prev.keys().filter(move |k| {
        while n.next_if(|nk| *nk < *k).is_some() {}
        n.next_if(|nk| *nk == *k).is_none()
    })
}

fn rule_list(rules: &[Rule4]) -> RuleList4 {
    let mut l = RuleList4 {
        count: rules.len() as u32,
        _pad: 0,
        rules: [Rule4::default(); MAX_RULES],
    };
    l.rules[..rules.len()].copy_from_slice(rules);
    l
}

fn rule_list6(rules: &[Rule6]) -> RuleList6 {
    let mut l = RuleList6 {
        count: rules.len() as u32,
        _pad: 0,
        rules: [Rule6::default(); MAX_RULES],
    };
    l.rules[..rules.len()].copy_from_slice(rules);
    l
}

fn maglev_table(slots: &[u32]) -> MaglevTable {
    let mut t = MaglevTable {
        backends: 0,
        _pad: 0,
        slots: [0; MAGLEV_SIZE],
    };
    if slots.len() == MAGLEV_SIZE {
        t.slots.copy_from_slice(slots);
        t.backends = slots.iter().collect::<BTreeSet<_>>().len() as u32;
    }
    t
}
