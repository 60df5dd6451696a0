//! Backend choice (Maglev), source-NAT allocation and the flow entries that record it.
use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use privatelink_common::{
    CT_OPEN, CT_SYN_SENT, DIR_FORWARD, DIR_REPLY, DROP_CONNTRACK_FULL, DROP_NAT_EXHAUSTED,
    DROP_NO_BACKEND, DROP_NO_NAT_RANGE, DatapathConfig, Flow, FlowKey, LinkInfo, MAGLEV_SIZE,
    NAT_PORT_RETRIES, NextHop, PROTO_TCP,
};

use crate::{conntrack, family::Family, mem, parse::Pkt};

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

#[inline(always)]
fn random_port(port_min: u16, port_max: u16) -> u16 {
    let span = (port_max as u32).saturating_sub(port_min as u32) + 1;
    // SAFETY: helper without preconditions.
    let rnd = unsafe { bpf_get_prandom_u32() };
    port_min + (rnd % span) as u16
}

/// Chooses a NAT address and port whose reply tuple is free, and writes both flow entries. With
/// `nh` (the backend's cached next hop), the forward entry starts out with it.
/// `flow` is written whenever this returns `Ok`, and ends as the forward entry (the translation to
/// apply now); it is built in place as the reply entry first, so one flow's worth of stack serves
/// both (the IPv6 program's 512 bytes would not hold three).
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the key and flow would be copied to the stack once more"
)]
#[inline(always)]
pub fn create_flow<A: Family>(
    req: &NewFlow<A>,
    to: &Backend<A>,
    flow: &mut MaybeUninit<Flow<A>>,
) -> Result<(), u32> {
    let NewFlow {
        key,
        p,
        link,
        link_id,
        service_port_be,
        hash,
        now,
        cfg,
    } = *req;
    let (backend_be, nh, origin) = (to.addr_be, to.nh, &to.origin);
    let (nat_addr_be, port_min, port_max) =
        A::nat_addr(link.provider_network, mix(hash ^ 0x5bd1_e995)).ok_or(DROP_NO_NAT_RANGE)?;
    let state = if p.proto == PROTO_TCP {
        CT_SYN_SENT
    } else {
        CT_OPEN
    };
    let flow = mem::write(
        flow,
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
            _pad: 0,
        },
    );
    // Keep the consumer's port when the range allows it (fewer surprises), else pick at random.
    let sport = u16::from_be(p.sport_be);
    let mut port = if sport >= port_min && sport <= port_max {
        sport
    } else {
        random_port(port_min, port_max)
    };
    for _ in 0..=NAT_PORT_RETRIES {
        let rkey = FlowKey::new(
            link.provider_network,
            backend_be,
            nat_addr_be,
            service_port_be,
            port.to_be(),
            p.proto,
        );
        let claimed = match A::ct().insert(&rkey, &*flow, BPF_NOEXIST as u64) {
            Ok(()) => true,
            Err(e) if e == -EEXIST => reclaim(&rkey, key, flow, now, cfg)?,
            Err(_) => return Err(DROP_CONNTRACK_FULL),
        };
        if claimed {
            // The reply entry is written: the same memory becomes the forward entry (link,
            // state and timestamps are the same).
            flow.saddr_be = nat_addr_be;
            flow.daddr_be = backend_be;
            flow.sport_be = port.to_be();
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
                let _ = A::ct().remove(&rkey);
                return Err(DROP_CONNTRACK_FULL);
            }
            return Ok(());
        }
        port = random_port(port_min, port_max);
    }
    Err(DROP_NAT_EXHAUSTED)
}

/// A reply tuple is taken: it may still be ours to overwrite when its flow expired or when it is
/// this very consumer flow's old entry.
#[inline(always)]
fn reclaim<A: Family>(
    rkey: &FlowKey<A>,
    key: &FlowKey<A>,
    reply: &Flow<A>,
    now: u64,
    cfg: &DatapathConfig,
) -> Result<bool, u32> {
    // SAFETY: the value is copied out at once.
    let Some(old) = (unsafe { A::ct().get(rkey) }) else {
        return Ok(false);
    };
    let ours = old.peer_network == key.network_id
        && old.daddr_be == key.saddr_be
        && old.dport_be == key.sport_be
        && old.saddr_be == key.daddr_be
        && old.sport_be == key.dport_be;
    if !ours && !conntrack::expired(old, rkey.proto, now, cfg) {
        return Ok(false);
    }
    match A::ct().insert(rkey, reply, BPF_EXIST as u64) {
        Ok(()) => Ok(true),
        Err(_) => Err(DROP_CONNTRACK_FULL),
    }
}
