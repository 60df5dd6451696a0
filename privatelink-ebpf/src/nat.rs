//! Backend choice (Maglev), source-NAT allocation and the flow entries that record it.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_EXIST, BPF_NOEXIST},
    cty::c_void,
    helpers::bpf_loop,
};
use privatelink_common::{
    CT_OPEN, CT_SYN_SENT, DIR_FORWARD, DIR_REPLY, DROP_CONNTRACK_FULL, DROP_NAT_EXHAUSTED,
    DROP_NO_BACKEND, DROP_NO_NAT_RANGE, DatapathConfig, FLOW_LOGGED, Flow, FlowKey, LinkInfo,
    MAGLEV_SIZE, NAT_PORT_PROBES, NextHop, PROTO_TCP, PROXY_PENDING,
};

use crate::{
    conntrack,
    family::Family,
    mem,
    parse::Pkt,
    probe::{CLAIMED, Ports},
};

const ENOENT: i32 = 2;
const EEXIST: i32 = 17;

/// Where the consumer's frame came from, for the reply entry (no FIB lookup on the way back:
/// consumer networks overlap, so the way back is the way in).
pub struct Origin {
    pub ifindex: u32,
    pub vlan_id: u16,
    /// The node's MAC as the consumer addressed it, and the consumer's (or its router's) MAC.
    pub node_mac: [u8; 6],
    pub peer_mac: [u8; 6],
}

/// A new flow as admission leaves it: its key and packet, the link and service port it is for,
/// its hash, and the clock and configuration it is created by.
pub struct NewFlow<'a, A> {
    pub key: &'a FlowKey<A>,
    pub p: &'a Pkt<A>,
    pub link: &'a LinkInfo,
    pub link_id: u32,
    pub service_port_be: u16,
    /// Bytes of the flow's PROXY header (0: none).
    pub proxy_len: u16,
    /// The link logs its connections.
    pub logged: bool,
    pub hash: u32,
    pub now: u64,
    pub cfg: &'a DatapathConfig,
}

/// Where the new flow goes: the backend's address, its next hop when one is cached, and where
/// the consumer's frame came from (for the reply entry).
pub struct Backend<'a, A> {
    pub addr_be: A,
    pub nh: Option<&'a NextHop>,
    pub origin: Origin,
}

#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow's consumer-side tuple (stable: Maglev needs the same backend for the same flow).
#[inline(always)]
pub fn flow_hash<A: Family>(k: &FlowKey<A>) -> u32 {
    let ports = ((k.sport_be as u32) << 16) | k.dport_be as u32;
    let h = mix(k.saddr_be.fold() ^ 0x9e37_79b9);
    let h = mix(h ^ k.daddr_be.fold());
    let h = mix(h ^ ports);
    mix(h ^ (k.proto as u32) ^ (k.network_id << 8))
}

/// The backend for a new flow of the service, by Maglev table: its slot and address.
#[inline(always)]
pub fn pick_backend<A: Family>(service_slot: u32, hash: u32) -> Result<(u32, A), u32> {
    let table = A::maglev().get(service_slot).ok_or(DROP_NO_BACKEND)?;
    if table.backends == 0 {
        return Err(DROP_NO_BACKEND);
    }
    let bucket = (hash % MAGLEV_SIZE as u32) as usize;
    // LLVM knows bucket < MAGLEV_SIZE and would drop this check, but the verifier cannot see through
    // the multiply-shift that replaced the modulo: launder the value so the check stays.
    // SAFETY: reading a local.
    let bucket = unsafe { core::ptr::read_volatile(&bucket) };
    let slot = *table.slots.get(bucket).ok_or(DROP_NO_BACKEND)?;
    Ok((slot, A::backend(slot).ok_or(DROP_NO_BACKEND)?))
}

/// One try of the search (a `bpf_loop` callback). Returns 1 to end the loop.
extern "C" fn probe_next<A: Family>(_i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = A::nat_probe() else {
        return 1;
    };
    let port = s.ports.next();
    s.rkey.dport_be = port.to_be();
    // SAFETY: `create_flow` wrote the reply entry before the search.
    let reply = unsafe { s.flow.assume_init_ref() };
    match claim(&s.rkey, reply, false, s.now, &s.cfg) {
        Ok(false) => 0,
        Ok(true) => {
            s.result = CLAIMED;
            1
        }
        Err(reason) => {
            s.result = reason;
            1
        }
    }
}

/// Chooses a NAT address and port whose reply tuple is free, and writes both flow entries. With
/// `nh` (the backend's cached next hop), the forward entry starts out with it. Returns the
/// forward entry (the translation to apply now), built in this CPU's
/// [`Probe`](crate::probe::Probe) where the reply entry was built first.
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the key and flow would be copied to the stack once more"
)]
#[inline(always)]
pub fn create_flow<A: Family>(req: &NewFlow<A>, to: &Backend<A>) -> Result<&'static Flow<A>, u32> {
    let NewFlow {
        key,
        p,
        link,
        link_id,
        service_port_be,
        proxy_len,
        logged,
        hash,
        now,
        cfg,
    } = *req;
    let (backend_be, nh, origin) = (to.addr_be, to.nh, &to.origin);
    let (nat_addr_be, port_min, port_max) =
        A::nat_addr(link.nat_slot, mix(hash ^ 0x5bd1_e995)).ok_or(DROP_NO_NAT_RANGE)?;
    let state = if p.proto == PROTO_TCP {
        CT_SYN_SENT
    } else {
        CT_OPEN
    };
    let s = A::nat_probe().ok_or(DROP_NAT_EXHAUSTED)?;
    let flow = mem::write(
        &mut s.flow,
        Flow {
            last_seen_ns: now,
            saddr_be: p.daddr_be,
            daddr_be: p.saddr_be,
            sport_be: p.dport_be,
            dport_be: p.sport_be,
            link_id,
            peer_network: key.network_id,
            egress_ifindex: origin.ifindex,
            src_mac: origin.node_mac,
            dst_mac: origin.peer_mac,
            vlan_id: origin.vlan_id,
            dir: DIR_REPLY,
            tcp_state: state,
            nh_generation: 0,
            proxy_len,
            flags: if proxy_len != 0 { PROXY_PENDING } else { 0 }
                | if logged { FLOW_LOGGED } else { 0 },
            _pad: 0,
        },
    );
    s.rkey = FlowKey::new(
        link.provider_network,
        backend_be,
        nat_addr_be,
        service_port_be,
        0,
        p.proto,
    );
    s.ports = Ports {
        state: 0,
        span: (port_max as u32).saturating_sub(port_min as u32) + 1,
        min: port_min,
        _pad: 0,
    };
    // Keep the consumer's port when the range allows it (fewer surprises), else one at random.
    // This first try inserts at once: at low occupancy it is free, and one map operation is all.
    let sport = u16::from_be(p.sport_be);
    let first = if sport >= port_min && sport <= port_max {
        sport
    } else {
        s.ports.seed();
        s.ports.next()
    };
    s.rkey.dport_be = first.to_be();
    if !claim(&s.rkey, &*flow, true, now, cfg)? {
        // Taken: independent random ports, each looked at before it is written (no bucket lock
        // for a taken one), at most `NAT_PORT_PROBES` in all. In a `bpf_loop` callback, so the
        // verifier checks one try instead of every one of them.
        if s.ports.state == 0 {
            s.ports.seed();
        }
        s.now = now;
        s.cfg = *cfg;
        s.result = DROP_NAT_EXHAUSTED;
        // SAFETY: the callback matches bpf_loop's signature and takes no context.
        unsafe {
            bpf_loop(
                NAT_PORT_PROBES - 1,
                probe_next::<A> as *mut c_void,
                core::ptr::null_mut(),
                0,
            )
        };
        if s.result != CLAIMED {
            return Err(s.result);
        }
    }
    let port_be = s.rkey.dport_be;
    // The reply entry is written: the same memory becomes the forward entry (link, state and
    // timestamps are the same).
    flow.saddr_be = nat_addr_be;
    flow.daddr_be = backend_be;
    flow.sport_be = port_be;
    flow.dport_be = service_port_be;
    flow.peer_network = link.provider_network;
    match nh {
        Some(nh) => {
            flow.egress_ifindex = nh.ifindex;
            mem::copy_mac(&mut flow.src_mac, &nh.src_mac);
            mem::copy_mac(&mut flow.dst_mac, &nh.dst_mac);
            flow.nh_generation = nh.generation;
        }
        None => {
            flow.egress_ifindex = 0;
            mem::zero_mac(&mut flow.src_mac);
            mem::zero_mac(&mut flow.dst_mac);
        }
    }
    flow.vlan_id = 0;
    flow.dir = DIR_FORWARD;
    if A::ct().insert(key, &*flow, BPF_ANY as u64).is_err() {
        let _ = A::ct().remove(&s.rkey);
        return Err(DROP_CONNTRACK_FULL);
    }
    Ok(flow)
}

/// Claims the reply tuple `rkey` for the new flow by writing its reply entry: when it is free, when
/// its flow expired, or when it is this very consumer flow's old entry (the same consumer tuple
/// and network as `reply`'s). `Ok(false)`: taken.
#[inline(always)]
fn claim<A: Family>(
    rkey: &FlowKey<A>,
    reply: &Flow<A>,
    insert_first: bool,
    now: u64,
    cfg: &DatapathConfig,
) -> Result<bool, u32> {
    if insert_first {
        match A::ct().insert(rkey, reply, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(true),
            Err(e) if e == -EEXIST => {}
            Err(_) => return Err(DROP_CONNTRACK_FULL),
        }
    }
    // SAFETY: the value is read at once.
    let flags = match unsafe { A::ct().get(rkey) } {
        None => BPF_NOEXIST,
        Some(old) => {
            let ours = old.peer_network == reply.peer_network
                && old.daddr_be == reply.daddr_be
                && old.dport_be == reply.dport_be
                && old.saddr_be == reply.saddr_be
                && old.sport_be == reply.sport_be;
            if !ours && !conntrack::expired(old, rkey.proto, now, cfg) {
                return Ok(false);
            }
            BPF_EXIST
        }
    };
    match A::ct().insert(rkey, reply, flags as u64) {
        Ok(()) => Ok(true),
        // Another CPU took or freed the tuple between the look and the write: try the next one.
        Err(e) if e == -EEXIST || e == -ENOENT => Ok(false),
        Err(_) => Err(DROP_CONNTRACK_FULL),
    }
}
