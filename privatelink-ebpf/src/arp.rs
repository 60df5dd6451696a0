//! ARP responder for endpoint IPs: a consumer resolves its endpoint's address on its own network,
//! and the node answers with the receiving interface's MAC (XDP_TX), per network, so overlapping
//! consumer CIDRs and 100k endpoints need no kernel neighbour state.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{arp::ArpHdr, eth::EthHdr};
use privatelink_common::{
    ARP_REPLIED, EndpointIpKey4, IfaceInfo, PASS_MALFORMED, PASS_NOT_ENDPOINT,
};

use crate::{
    ENDPOINT_IPS4,
    parse::{L2, ptr_at},
    verdict::Verdict,
};

const ARPHRD_ETHER: [u8; 2] = 1u16.to_be_bytes();
const ARP_PTYPE_IP: [u8; 2] = 0x0800u16.to_be_bytes();
const ARPOP_REQUEST: [u8; 2] = 1u16.to_be_bytes();
const ARPOP_REPLY: [u8; 2] = 2u16.to_be_bytes();

#[inline(always)]
pub fn respond(ctx: &XdpContext, l2: &L2, iface: &IfaceInfo) -> Verdict {
    let (Some(eth), Some(arp)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<ArpHdr>(ctx, l2.l3_off))
    else {
        return Verdict::pass(PASS_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if arp.htype != ARPHRD_ETHER
        || arp.ptype != ARP_PTYPE_IP
        || arp.hlen != 6
        || arp.plen != 4
        || arp.oper != ARPOP_REQUEST
    {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    let key = EndpointIpKey4 {
        network_id: iface.network_id,
        addr_be: u32::from_ne_bytes(arp.tpa),
    };
    // SAFETY: the value is not read.
    if unsafe { ENDPOINT_IPS4.get(key) }.is_none() {
        return Verdict::pass(PASS_NOT_ENDPOINT);
    }
    eth.dst_addr = eth.src_addr;
    eth.src_addr = iface.mac;
    arp.oper = ARPOP_REPLY;
    arp.tha = arp.sha;
    arp.sha = iface.mac;
    core::mem::swap(&mut arp.tpa, &mut arp.spa);
    Verdict {
        action: xdp_action::XDP_TX,
        outcome: ARP_REPLIED,
    }
}
