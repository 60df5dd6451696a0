//! PROXY protocol v2 from the datapath: the header goes in front of the consumer's stream, as the
//! first bytes the backend receives, and the sequence numbers of the rest of the flow move by its
//! length.
//!
//! - **Where the header goes.** A flow of a PROXY link records where the consumer's stream starts
//!   (its initial sequence number + 1, the `base`) in `PROXY_PENDING4`/`PROXY_PENDING6`. Every
//!   consumer packet that starts at `base` while the backend has not acknowledged the header
//!   carries it: the handshake's final ACK (so a server that speaks first gets it although the
//!   client sends nothing), the first data segment, or a FIN. A lost header comes again the same
//!   way, byte for byte: the backend's SYN-ACK retransmission or duplicate ACK makes the consumer
//!   send from `base` again. The frame grows at its head and its layer 2-4 headers move to the
//!   front, so the header lands between the TCP header and the payload.
//! - **Sequence numbers.** Towards the backend the consumer's numbers go up by the header's
//!   length; towards the consumer the backend's acknowledgements and SACK edges go down by it (an
//!   acknowledgement inside the header maps to `base`). The backend's own numbers are untouched,
//!   as are timestamps and window scaling. An acknowledgement past the header ends the pending
//!   state: from then on a packet costs one addition and a checksum update.
//! - **MSS.** The backend's SYN-ACK advertises an MSS lowered by the header's length, so a full
//!   segment with the header in front still fits the path.
//!
//! The header: the signature, `PROXY` command, TCP over the flow's family, the consumer's address
//! and port as source, the endpoint's address and terminal port as destination, the link's TLVs
//! (endpoint id 0xE0, link id 0xE1, account id 0xE2, a NOOP pad, and a UNIQUE_ID whose last 16
//! characters are the connection id the datapath appends: the consumer's initial sequence number,
//! its port and the NAT port, in hex), then PP2_TYPE_CRC32C over the whole header.
use aya_ebpf::{
    bindings::BPF_ANY,
    cty::c_void,
    helpers::{
        bpf_loop, bpf_xdp_adjust_head,
        generated::{bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    },
    programs::XdpContext,
};
use privatelink_common::{
    DROP_PROXY_FULL, DROP_PROXY_INSERT, Flow, FlowKey, LinkInfo, PP2_TYPE_CRC32C, PROTO_TCP,
    PROXY_HEADERS_ACKED, PROXY_HEADERS_SENT, PROXY_MSS_CLAMPED, PROXY_PENDING, PROXY_TLVS_MAX,
    PROXY_TS, ProxyPending,
};

use crate::{
    PROXY_SCRATCH, PROXY_STATS, PROXY_TLVS, conntrack,
    csum::{self, Delta},
    family::Family,
    mem,
    parse::{Pkt, TCP_ACK, TCP_RST, TCP_SYN, ptr_at},
    proxy_scratch::{HDR_BUF, OPT_BUF, Scratch},
    stats,
};

const _: () = assert!(privatelink_common::PROXY_HDR_MAX <= HDR_BUF);
/// Most bytes of layer 2-4 headers a frame that carries the header may have (they move).
const MOVE_MAX: usize = 192;
const OPT_MAX: usize = 40;
/// Steps of the option walk: one per option or SACK edge, at most one per byte.
const OPT_STEPS: u32 = OPT_MAX as u32;

/// The PROXY protocol v2 signature.
const SIG: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
/// The fixed part: signature, version and command, family, length.
const FIXED: usize = 16;
/// The connection id's characters, and the CRC32C TLV (type, length, value).
const ID_LEN: usize = 16;
const CRC_TLV: usize = 7;

/// TCP option kinds the reply path reads.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_SACK: u8 = 5;
const OPT_TS: u8 = 8;
/// The shortest TCP header (in words) with any option: the 20 fixed bytes and one word.
const OPTIONS_WORDS: u8 = 6;
/// The shortest TCP header (in words) with room for a timestamp and a SACK block: 20 bytes, 10 of
/// timestamp, 10 of one block, rounded up to a word.
const TS_AND_SACK_WORDS: u8 = 10;

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU value; XDP programs do not nest on a CPU.
    PROXY_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

/// The CRC32C (Castagnoli, reflected) table, built at compile time.
static CRC32C: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// The length of the header of a new flow of `link` (0: none for this flow), with the stream's
/// start recorded. `Err`: a drop reason.
#[inline(always)]
pub fn open<A: Family>(
    ctx: &XdpContext,
    key: &FlowKey<A>,
    p: &Pkt<A>,
    link: &LinkInfo,
) -> Result<u16, u32> {
    if link.proxy_tlvs == 0 || p.proto != PROTO_TCP {
        return Ok(0);
    }
    let tlvs = link.proxy_tlvs as usize;
    if tlvs > PROXY_TLVS_MAX {
        return Err(DROP_PROXY_INSERT);
    }
    let seq = read_u32(ctx, p.l4_off, 4).ok_or(DROP_PROXY_INSERT)?;
    record::<A>(key, seq)?;
    Ok(header_len::<A>(tlvs) as u16)
}

/// Bytes of a header with `tlvs` bytes of TLVs.
#[inline(always)]
fn header_len<A: Family>(tlvs: usize) -> usize {
    FIXED + 2 * A::ADDR_LEN + 4 + tlvs + ID_LEN + CRC_TLV
}

/// Records that the stream after initial sequence number `seq` starts unacknowledged.
#[inline(always)]
fn record<A: Family>(key: &FlowKey<A>, seq: u32) -> Result<(), u32> {
    let v = ProxyPending {
        base: seq.wrapping_add(1),
        _pad: 0,
    };
    A::proxy_pending()
        .insert(key, v, BPF_ANY as u64)
        .map_err(|_| DROP_PROXY_FULL)
}

/// A consumer's packet of a PROXY flow (forward entry `flow`, at `entry` unless it came from the
/// flow cache), before its translation: the header in front when the packet starts the stream
/// and the header is pending, else the sequence number to be moved past it. `Ok`: how far the
/// translation moves the sequence number ([`crate::forward::How::stream_move`]); `Err`: a drop
/// reason.
#[inline(always)]
pub fn outbound<A: Family>(
    ctx: &XdpContext,
    network_id: u32,
    p: &Pkt<A>,
    flow: &Flow<A>,
    entry: Option<*mut Flow<A>>,
) -> Result<u32, u32> {
    let flags = p.tcp_flags;
    // The flow's key, made only where the pending state is read or written (not per packet).
    let key = || -> Result<&'static FlowKey<A>, u32> {
        let k = A::key_scratch().ok_or(DROP_PROXY_INSERT)?;
        conntrack::write_key(
            k,
            network_id,
            (&p.saddr_be, p.sport_be),
            (&p.daddr_be, p.dport_be),
            PROTO_TCP,
        );
        Ok(&*k)
    };
    // Every packet but a SYN once the header is delivered takes this, one test (the two bits
    // differ): the translation adds the length.
    const _: () = assert!(TCP_SYN & PROXY_PENDING == 0);
    if (flags & TCP_SYN) | (flow.flags & PROXY_PENDING) == 0 {
        return Ok(flow.proxy_len as u32);
    }
    if flags & TCP_SYN != 0 {
        if flags & TCP_ACK == 0 {
            // A retransmitted SYN, or the consumer reusing the tuple for a new connection: the
            // stream starts (again) after this one's sequence number.
            let seq = read_u32(ctx, p.l4_off, 4).ok_or(DROP_PROXY_INSERT)?;
            record::<A>(key()?, seq)?;
            if flow.flags & PROXY_PENDING == 0 {
                set_pending(flow, entry, true);
            }
        }
        return Ok(0);
    }
    // The header is pending.
    let seq = read_u32(ctx, p.l4_off, 4).ok_or(DROP_PROXY_INSERT)?;
    // SAFETY: copied out at once.
    match unsafe { A::proxy_pending().get(key()?) }.map(|v| v.base) {
        Some(base) if seq == base && flags & TCP_RST != 0 => return Ok(0),
        Some(base) if seq == base => {
            let s = scratch().ok_or(DROP_PROXY_INSERT)?;
            let total = build(p, flow, base, s)?;
            insert(ctx, p, total, s)?;
            stats::add_one(&PROXY_STATS, PROXY_HEADERS_SENT);
            return Ok(0);
        }
        Some(_) => {}
        // The flow came from another node (a takeover) that had sent its header: taken as
        // delivered.
        None => set_pending(flow, entry, false),
    }
    // A packet after the stream's start (a retransmission past the header, or data behind it).
    Ok(flow.proxy_len as u32)
}

/// A backend's packet of a PROXY flow (reply entry `flow`), before its translation: SACK edges
/// moved back over the header, the SYN-ACK's MSS lowered (the header pending), and how far the
/// acknowledgement is to move. An acknowledgement past the header ends its pending state. `Ok`:
/// how far the translation moves the acknowledgement ([`crate::forward::How::stream_move`];
/// option changes are made here); `Err`: a drop reason.
#[inline(always)]
pub fn inbound<A: Family>(
    ctx: &XdpContext,
    p: &Pkt<A>,
    flow: &Flow<A>,
    entry: Option<*mut Flow<A>>,
) -> Result<u32, u32> {
    let flags = p.tcp_flags;
    let len = flow.proxy_len as u32;
    // An acknowledgement once the header is delivered: every later packet takes this, one test
    // (the two bits differ), a look at the options only where a SACK option may be (a header with
    // options; with timestamps in use, one long enough for a timestamp and a SACK block) and the
    // translation's subtraction. Linux sends a timestamp on every segment: its usual 8-word
    // header is decided on here without a read of the frame. No MSS is lowered here: only a flow
    // whose header is still to be sent needs room for it (a SYN-ACK comes while it is).
    const _: () = assert!(TCP_ACK & PROXY_PENDING == 0);
    if (flags & TCP_ACK) | (flow.flags & PROXY_PENDING) == TCP_ACK {
        let shortest = if flow.flags & PROXY_TS != 0 {
            TS_AND_SACK_WORDS
        } else {
            OPTIONS_WORDS
        };
        if p.tcp_doff >= shortest {
            options(ctx, p, 0, len, false, false)?;
        }
        return Ok(len.wrapping_neg());
    }
    if flags & TCP_ACK == 0 {
        return Ok(0);
    }
    // The header is pending.
    let mut pending = true;
    let mut base = 0;
    let ack = read_u32(ctx, p.l4_off, 8).ok_or(DROP_PROXY_INSERT)?;
    {
        // The forward entry's key, as `Flow::twin_key` makes it.
        let fwd = A::key_scratch().ok_or(DROP_PROXY_INSERT)?;
        conntrack::write_key(
            fwd,
            flow.peer_network,
            (&flow.daddr_be, flow.dport_be),
            (&flow.saddr_be, flow.sport_be),
            PROTO_TCP,
        );
        let fwd: &FlowKey<A> = fwd;
        // SAFETY: copied out at once.
        match unsafe { A::proxy_pending().get(fwd) }.map(|v| v.base) {
            Some(b) => base = b,
            None => {
                pending = false;
                set_pending(flow, entry, false);
            }
        }
        if pending && (ack.wrapping_sub(base) as i32) >= len as i32 {
            set_pending(flow, entry, false);
            let _ = A::proxy_pending().remove(fwd);
            stats::add_one(&PROXY_STATS, PROXY_HEADERS_ACKED);
        }
    }
    let syn = flags & TCP_SYN != 0;
    let ts = options(ctx, p, base, len, pending, syn)?;
    // Whether timestamps are in use is settled by the SYN-ACK, also for a tuple used again.
    if syn && let Some(e) = entry {
        put_flag(e, PROXY_TS, ts);
    }
    Ok(back(ack, base, len, pending).wrapping_sub(ack))
}

/// A backend sequence number `x` of the consumer's stream as the consumer numbers it.
#[inline(always)]
fn back(x: u32, base: u32, len: u32, pending: bool) -> u32 {
    let d = x.wrapping_sub(base) as i32;
    if !pending || d >= len as i32 {
        x.wrapping_sub(len)
    } else if d > 0 {
        base
    } else {
        x
    }
}

/// Sets (`on`) or clears flag `bit` of the conntrack entry at `f`, leaving its other flags as
/// they are.
#[inline(always)]
fn put_flag<A>(f: *mut Flow<A>, bit: u8, on: bool) {
    // SAFETY: pointer from a successful lookup; a plain field, benign races.
    unsafe { (*f).flags = ((*f).flags & !bit) | if on { bit } else { 0 } };
}

/// Sets or clears the pending bit of the flow's entry (when it has one) and its twin's, leaving
/// their other flags as they are.
#[inline(always)]
fn set_pending<A: Family>(flow: &Flow<A>, entry: Option<*mut Flow<A>>, pending: bool) {
    if let Some(e) = entry {
        put_flag(e, PROXY_PENDING, pending);
    }
    if let Some(t) = A::ct().get_ptr_mut(flow.twin_key(PROTO_TCP)) {
        put_flag(t, PROXY_PENDING, pending);
    }
}

/// The 32-bit field `at` (4: the sequence number, 8: the acknowledgement) of the TCP header at
/// `l4_off`, host order: one load.
#[inline(always)]
fn read_u32(ctx: &XdpContext, l4_off: usize, at: usize) -> Option<u32> {
    let tcp = ptr_at::<[u8; 20]>(ctx, l4_off)?;
    // SAFETY: a bounds-checked pointer to 20 bytes; `at` + 4 is within them.
    Some(u32::from_be(unsafe {
        mem::load_u32(tcp.cast::<u8>().add(at))
    }))
}

/// Writes byte `v` at `off` of the header buffer (masked into it).
#[inline(always)]
fn put(s: &mut Scratch, off: usize, v: u8) {
    let h = s.hdr.as_mut_ptr().cast::<u8>();
    // SAFETY: the mask keeps the offset inside the buffer. Volatile: stored in order, so an
    // unrolled loop of these does not compute every byte first (and spill them to the stack).
    unsafe { core::ptr::write_volatile(h.add(off & (HDR_BUF - 1)), v) };
}

/// Builds the header of the flow's packet `p` (the consumer's, untranslated) in `s`. Returns its
/// length; `s.sum` is the one's-complement sum of its 16-bit words.
#[inline(always)]
fn build<A: Family>(p: &Pkt<A>, flow: &Flow<A>, base: u32, s: &mut Scratch) -> Result<usize, u32> {
    // SAFETY: copied out word by word below, before anything else runs.
    let tlvs = unsafe { PROXY_TLVS.get(flow.link_id) }.ok_or(DROP_PROXY_INSERT)?;
    let n = tlvs.len as usize;
    let total = header_len::<A>(n);
    if n > PROXY_TLVS_MAX || total != flow.proxy_len as usize || !total.is_multiple_of(4) {
        return Err(DROP_PROXY_INSERT);
    }
    // Whole words: a byte array iterated here would be copied to the stack first.
    s.hdr[0] = u32::from_ne_bytes([SIG[0], SIG[1], SIG[2], SIG[3]]);
    s.hdr[1] = u32::from_ne_bytes([SIG[4], SIG[5], SIG[6], SIG[7]]);
    s.hdr[2] = u32::from_ne_bytes([SIG[8], SIG[9], SIG[10], SIG[11]]);
    let [hi, lo] = ((total - FIXED) as u16).to_be_bytes();
    s.hdr[3] = u32::from_ne_bytes([V2_PROXY, A::PP2_TCP, hi, lo]);
    // Addresses and ports: whole words at fixed offsets.
    let words = A::ADDR_LEN / 4;
    for i in 0..words {
        s.hdr[FIXED / 4 + i] = p.saddr_be.word(i);
        s.hdr[FIXED / 4 + words + i] = p.daddr_be.word(i);
    }
    let (sp, dp) = (p.sport_be.to_ne_bytes(), p.dport_be.to_ne_bytes());
    s.hdr[FIXED / 4 + 2 * words] = u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]);
    // The link's TLVs: every word of the entry (what lies past `n` is overwritten or past the end).
    let at = FIXED / 4 + 2 * words + 1;
    // SAFETY: both are `PROXY_TLVS_MAX` bytes, 4-aligned (`bytes` is at offset 8 of a map value;
    // `at` words into the buffer), plain integers.
    unsafe {
        let src = &*tlvs.bytes.as_ptr().cast::<[u32; PROXY_TLVS_MAX / 4]>();
        let dst = &mut *s
            .hdr
            .as_mut_ptr()
            .add(at)
            .cast::<[u32; PROXY_TLVS_MAX / 4]>();
        mem::copy(dst, src);
    }
    // The connection id, in hex: initial sequence number, consumer port, NAT port.
    s.id = (u64::from(base.wrapping_sub(1)) << 32)
        | (u64::from(u16::from_be(p.sport_be)) << 16)
        | u64::from(u16::from_be(flow.sport_be));
    let u = at * 4 + n;
    for k in 0..ID_LEN {
        // Read back each time (volatile, like `put`'s store): the digits are made one by one,
        // not all at once in registers that spill to the stack.
        // SAFETY: reading a field just written.
        let id = unsafe { core::ptr::read_volatile(&s.id) };
        let nib = ((id >> (60 - 4 * k)) & 0xf) as u8;
        put(
            s,
            u + k,
            if nib < 10 {
                b'0' + nib
            } else {
                b'a' - 10 + nib
            },
        );
    }
    let c = u + ID_LEN;
    put(s, c, PP2_TYPE_CRC32C);
    put(s, c + 1, 0);
    put(s, c + 2, 4);
    // `total` is a multiple of 4, so the CRC's four bytes are a whole word.
    let crc_at = c + 3;
    let crc_word = (crc_at / 4) & (HDR_BUF / 4 - 1);
    s.hdr[crc_word] = 0;
    s.crc = !0;
    s.sum = 0;
    s.words = (total / 4) as u32;
    // SAFETY: the callback matches bpf_loop's signature and takes no context.
    unsafe {
        bpf_loop(
            s.words.div_ceil(CRC_WORDS_PER_STEP),
            crc_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let crc = (!s.crc).to_be_bytes();
    s.hdr[crc_word] = u32::from_ne_bytes(crc);
    s.sum += csum::sum(&crc);
    Ok(total)
}

/// Header words one step of the CRC pass takes (fewer steps: each costs a call).
const CRC_WORDS_PER_STEP: u32 = 4;

/// Up to [`CRC_WORDS_PER_STEP`] words of the header into the CRC and the checksum sum (a
/// `bpf_loop` callback).
extern "C" fn crc_step(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    for k in 0..CRC_WORDS_PER_STEP {
        let n = i as u32 * CRC_WORDS_PER_STEP + k;
        if n >= s.words {
            break;
        }
        let w = s.hdr[(n as usize) & (HDR_BUF / 4 - 1)].to_ne_bytes();
        let mut c = s.crc;
        for b in w {
            c = CRC32C[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        s.crc = c;
        s.sum += csum::sum(&w);
    }
    0
}

/// Puts the `total` bytes built in `s` between the TCP header and the payload of the frame: the
/// frame grows at its head, its headers move to the front, the header goes where they were. IP
/// length and checksums follow.
#[inline(always)]
fn insert<A: Family>(
    ctx: &XdpContext,
    p: &Pkt<A>,
    total: usize,
    s: &mut Scratch,
) -> Result<(), u32> {
    let tcp = ptr_at::<[u8; 20]>(ctx, p.l4_off).ok_or(DROP_PROXY_INSERT)?;
    // SAFETY: bounds checked by ptr_at.
    let doff = ((unsafe { (*tcp)[12] } >> 4) as usize) * 4;
    // Laundered: LLVM knows both are above zero and would drop that check, which the verifier
    // needs to see before the helpers take them as lengths.
    // SAFETY: reading locals.
    let (hdrs, total) = unsafe {
        (
            core::ptr::read_volatile(&(p.l4_off + doff)),
            core::ptr::read_volatile(&total),
        )
    };
    if doff < 20 || hdrs == 0 || hdrs > MOVE_MAX || total == 0 || total > HDR_BUF {
        return Err(DROP_PROXY_INSERT);
    }
    let seg = (p.tot_len as usize).saturating_sub(p.l4_off - p.l3_off) as u16;
    // SAFETY: the helpers check the offsets against the frame; the buffers hold the lengths.
    unsafe {
        if bpf_xdp_load_bytes(ctx.ctx, 0, s.moved.as_mut_ptr().cast(), hdrs as u32) != 0
            || bpf_xdp_adjust_head(ctx.ctx, -(total as i32)) != 0
        {
            return Err(DROP_PROXY_INSERT);
        }
        if bpf_xdp_store_bytes(ctx.ctx, 0, s.moved.as_mut_ptr().cast(), hdrs as u32) != 0
            || bpf_xdp_store_bytes(
                ctx.ctx,
                hdrs as u32,
                s.hdr.as_mut_ptr().cast(),
                total as u32,
            ) != 0
        {
            return Err(DROP_PROXY_INSERT);
        }
    }
    A::grow_l3(ctx, p.l3_off, total as u16).ok_or(DROP_PROXY_INSERT)?;
    let tcp = ptr_at::<[u8; 20]>(ctx, p.l4_off).ok_or(DROP_PROXY_INSERT)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &mut *tcp };
    // The pseudo-header's TCP length grows, and the header's words are new.
    let grown = seg.wrapping_add(total as u16);
    let check = Delta::new()
        .u16(
            u16::from_ne_bytes(seg.to_be_bytes()),
            u16::from_ne_bytes(grown.to_be_bytes()),
        )
        .added(s.sum)
        .apply(u16::from_ne_bytes([h[16], h[17]]));
    [h[16], h[17]] = check.to_ne_bytes();
    Ok(())
}

/// Rewrites the TCP options of a backend's segment: SACK edges moved back over the header, and a
/// SYN-ACK's MSS lowered by its length. `Ok`: whether the options hold a timestamp (read for a
/// SYN-ACK, whose walk covers every option).
#[inline(always)]
fn options<A: Family>(
    ctx: &XdpContext,
    p: &Pkt<A>,
    base: u32,
    len: u32,
    pending: bool,
    syn: bool,
) -> Result<bool, u32> {
    // The header's length as parsed (the frame is unchanged since).
    let doff = p.tcp_doff as usize * 4;
    if doff <= 20 {
        return Ok(false);
    }
    let optlen = doff - 20;
    if optlen > OPT_MAX {
        return Ok(false);
    }
    let s = scratch().ok_or(DROP_PROXY_INSERT)?;
    let at = (p.l4_off + 20) as u32;
    // SAFETY: the helper checks the read against the frame; the buffer holds 40 bytes.
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, at, s.opts.as_mut_ptr().cast(), optlen as u32) } != 0 {
        return Ok(false);
    }
    s.at = 0;
    s.edges = 0;
    s.optlen = optlen as u32;
    s.base = base;
    s.len = len;
    // Volatile: where `pending` and `syn` are constants, the last four fields would be zeroes
    // side by side, which LLVM merges into a `memset` call (see `mem`).
    // SAFETY: plain fields of a valid, exclusive reference.
    unsafe {
        core::ptr::write_volatile(&mut s.pending, u32::from(pending));
        core::ptr::write_volatile(&mut s.syn, u32::from(syn));
        core::ptr::write_volatile(&mut s.changed, 0);
        core::ptr::write_volatile(&mut s.ts, 0);
        core::ptr::write_volatile(&mut s.delta, Delta::new());
    }
    // SAFETY: the callback matches bpf_loop's signature and takes no context.
    unsafe {
        bpf_loop(
            OPT_STEPS,
            option_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let ts = s.ts != 0;
    if s.changed == 0 {
        return Ok(ts);
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_store_bytes(ctx.ctx, at, s.opts.as_mut_ptr().cast(), optlen as u32) } != 0 {
        return Err(DROP_PROXY_INSERT);
    }
    let tcp = ptr_at::<[u8; 20]>(ctx, p.l4_off).ok_or(DROP_PROXY_INSERT)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &mut *tcp };
    [h[16], h[17]] = s
        .delta
        .apply(u16::from_ne_bytes([h[16], h[17]]))
        .to_ne_bytes();
    if syn {
        stats::add_one(&PROXY_STATS, PROXY_MSS_CLAMPED);
    }
    Ok(ts)
}

/// The option byte at `off` (masked into the buffer).
#[inline(always)]
fn opt(s: &Scratch, off: usize) -> u8 {
    let o = s.opts.as_ptr().cast::<u8>();
    // SAFETY: the mask keeps the offset inside the buffer.
    unsafe { *o.add(off & (OPT_BUF - 1)) }
}

#[inline(always)]
fn set_opt(s: &mut Scratch, off: usize, v: u8) {
    let o = s.opts.as_mut_ptr().cast::<u8>();
    // SAFETY: the mask keeps the offset inside the buffer.
    unsafe { *o.add(off & (OPT_BUF - 1)) = v };
}

/// The 32-bit value at option offset `off` (any alignment), host order.
#[inline(always)]
fn opt_u32(s: &Scratch, off: usize) -> u32 {
    u32::from_be_bytes([
        opt(s, off),
        opt(s, off + 1),
        opt(s, off + 2),
        opt(s, off + 3),
    ])
}

/// Replaces the `n`-byte (2 or 4) value at option offset `off`, `old` by `new` (host order),
/// adding the change to the checksum delta. Options start on a word boundary, so a value at an
/// odd offset is a byte-swapped word.
#[inline(always)]
fn replace(s: &mut Scratch, off: usize, n: usize, old: u32, new: u32) {
    // The values as wire words read natively (little endian: swapped).
    let d = if n == 4 {
        Delta::new().u32(old.to_be(), new.to_be())
    } else {
        Delta::new().u16((old as u16).to_be(), (new as u16).to_be())
    };
    s.delta = s.delta.plus(if off % 2 == 1 { d.swapped() } else { d });
    for i in 0..4 {
        if i < n {
            set_opt(s, off + i, (new >> (8 * (n - 1 - i))) as u8);
        }
    }
    s.changed = 1;
}

/// One step of the option walk (a `bpf_loop` callback): one SACK edge while a SACK option's
/// edges last, else the next option. Returns 1 to end the loop. One edge a step keeps the
/// callback's frame small (it stacks on the IPv6 program's).
extern "C" fn option_step(_i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    if s.edges != 0 {
        let off = s.edge_at as usize;
        let old = opt_u32(s, off);
        let new = back(old, s.base, s.len, s.pending != 0);
        if new != old {
            replace(s, off, 4, old, new);
        }
        s.edges -= 1;
        s.edge_at += 4;
        return 0;
    }
    let at = s.at as usize;
    let end = s.optlen as usize;
    if at >= end {
        return 1;
    }
    let kind = opt(s, at);
    if kind == OPT_END {
        return 1;
    }
    if kind == OPT_NOP {
        s.at += 1;
        return 0;
    }
    let len = opt(s, at + 1) as usize;
    if len < 2 || at + len > end {
        return 1;
    }
    if kind == OPT_SACK && s.syn == 0 {
        // Blocks of two edges; a malformed length leaves the spare bytes alone.
        s.edges = (((len - 2) / 8) * 2) as u32;
        s.edge_at = (at + 2) as u32;
    } else if kind == OPT_TS && len == 10 {
        s.ts = 1;
    } else if kind == OPT_MSS && len == 4 && s.syn != 0 {
        let mss = u32::from(opt(s, at + 2)) << 8 | u32::from(opt(s, at + 3));
        if mss > s.len {
            replace(s, at + 2, 2, mss, mss - s.len);
        }
    }
    s.at += len as u32;
    0
}
