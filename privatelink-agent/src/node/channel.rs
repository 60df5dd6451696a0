//! The channel between the nodes of a high-availability group: heartbeats ("this node is alive,
//! is or is not active, does or does not reach the shared store") and flow updates (the active
//! node's conntrack, see `node::flowsync`). A forged heartbeat could keep a dead node looking
//! alive, and a forged flow would pass the datapath's admission checks, so every message is
//! authenticated and fresh before anything reads it:
//!
//! - HMAC-SHA256 over the whole message with the group's shared key (`ha.key_file`);
//! - it names the group, and the sender must be one of the configured peer addresses;
//! - `sent_at` (the sender's clock, unix ms) within `max_clock_skew` of the receiver's, and `seq`
//!   new for that sender and kind: above the highest accepted, or within the 64 below it and not
//!   seen yet (datagrams may be reordered, never accepted twice). A sender numbers its messages
//!   from its start time in milliseconds times 2^20, so a restarted sender's messages are newer
//!   and its old ones stay replays.
//!
//! Layout (byte order: network): `magic "PLHA" | version 1 | kind | group length | node length |
//! sent_at u64 | seq u64 | group | node | payload | HMAC-SHA256 (32 bytes)`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"PLHA";
const VERSION: u8 = 1;
const HEAD: usize = 4 + 1 + 1 + 1 + 1 + 8 + 8;
const MAC_LEN: usize = 32;
/// Longest group or node name carried.
pub const MAX_NAME: usize = 63;
/// How far below the highest sequence number a late message is still taken.
const WINDOW: u64 = 64;

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Beat = 1,
    Flows = 2,
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub group: String,
    pub node: String,
    /// The sender's clock when it sent this (unix milliseconds).
    pub sent_at_ms: u64,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// A heartbeat's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    pub active: bool,
    pub store: bool,
    pub draining: bool,
}

/// The sender forwards for every unit the store names it for (a node that owns nothing says so
/// too; one that stopped, fenced off from the store or drained, does not).
const FLAG_ACTIVE: u8 = 1;
/// The sender reaches the shared store.
const FLAG_STORE: u8 = 2;
/// The sender is being drained: it takes no unit (a flag an older node ignores).
const FLAG_DRAINING: u8 = 4;

impl Beat {
    pub fn payload(self) -> Vec<u8> {
        vec![
            (u8::from(self.active) * FLAG_ACTIVE)
                | (u8::from(self.store) * FLAG_STORE)
                | (u8::from(self.draining) * FLAG_DRAINING),
        ]
    }

    pub fn parse(payload: &[u8]) -> Result<Beat, Reject> {
        match payload {
            [flags] => Ok(Beat {
                active: flags & FLAG_ACTIVE != 0,
                store: flags & FLAG_STORE != 0,
                draining: flags & FLAG_DRAINING != 0,
            }),
            _ => Err(Reject::Malformed),
        }
    }
}

/// Why a received message was refused (the metrics' `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    /// Too short, a wrong magic, version or kind, lengths that do not add up, names not UTF-8.
    Malformed,
    /// The MAC does not verify: another key, or altered bytes.
    Forged,
    /// From an address that is not a configured peer.
    UnknownPeer,
    /// For another group.
    OtherGroup,
    /// Carrying this node's own name.
    OwnName,
    /// Seen already, or older than the window.
    Replayed,
    /// Its time is further from ours than the allowed clock skew.
    Stale,
}

impl Reject {
    pub const ALL: [Reject; 7] = [
        Reject::Malformed,
        Reject::Forged,
        Reject::UnknownPeer,
        Reject::OtherGroup,
        Reject::OwnName,
        Reject::Replayed,
        Reject::Stale,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Forged => "forged",
            Reject::UnknownPeer => "unknown_peer",
            Reject::OtherGroup => "other_group",
            Reject::OwnName => "own_name",
            Reject::Replayed => "replayed",
            Reject::Stale => "stale",
        }
    }
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// The first sequence number of a sender started at `start_ms` (unix ms).
pub fn first_seq(start_ms: u64) -> u64 {
    start_ms << 20
}

/// The message as sent: its fields and their MAC. Names longer than [`MAX_NAME`] are the
/// caller's error (the configuration refuses them).
pub fn seal(key: &[u8], m: &Message) -> Vec<u8> {
    assert!(m.group.len() <= MAX_NAME && m.node.len() <= MAX_NAME);
    let mut out =
        Vec::with_capacity(HEAD + m.group.len() + m.node.len() + m.payload.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(m.kind as u8);
    out.push(m.group.len() as u8);
    out.push(m.node.len() as u8);
    out.extend_from_slice(&m.sent_at_ms.to_be_bytes());
    out.extend_from_slice(&m.seq.to_be_bytes());
    out.extend_from_slice(m.group.as_bytes());
    out.extend_from_slice(m.node.as_bytes());
    out.extend_from_slice(&m.payload);
    let mut h = mac(key);
    h.update(&out);
    out.extend_from_slice(&h.finalize().into_bytes());
    out
}

/// Parses and authenticates `bytes` (nothing else checked).
fn open(key: &[u8], bytes: &[u8]) -> Result<Message, Reject> {
    if bytes.len() < HEAD + MAC_LEN || &bytes[..4] != MAGIC || bytes[4] != VERSION {
        return Err(Reject::Malformed);
    }
    let kind = match bytes[5] {
        1 => Kind::Beat,
        2 => Kind::Flows,
        _ => return Err(Reject::Malformed),
    };
    let (glen, nlen) = (bytes[6] as usize, bytes[7] as usize);
    if bytes.len() < HEAD + glen + nlen + MAC_LEN || glen > MAX_NAME || nlen > MAX_NAME {
        return Err(Reject::Malformed);
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut h = mac(key);
    h.update(body);
    h.verify_slice(tag).map_err(|_| Reject::Forged)?;
    let word = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("eight bytes"));
    let text = |at: usize, len: usize| {
        std::str::from_utf8(&body[at..at + len])
            .map(str::to_string)
            .map_err(|_| Reject::Malformed)
    };
    Ok(Message {
        kind,
        group: text(HEAD, glen)?,
        node: text(HEAD + glen, nlen)?,
        sent_at_ms: word(8),
        seq: word(16),
        payload: body[HEAD + glen + nlen..].to_vec(),
    })
}

/// The sequence numbers accepted from one sender for one kind: the highest, and which of the
/// [`WINDOW`] below it were seen.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    highest: u64,
    /// Bit `i`: `highest - i` was seen.
    bits: u64,
}

impl Seen {
    fn fresh(&self, seq: u64) -> bool {
        if seq > self.highest || self.bits == 0 {
            return true;
        }
        let back = self.highest - seq;
        back < WINDOW && self.bits & (1 << back) == 0
    }

    fn mark(&mut self, seq: u64) {
        if self.bits == 0 || seq > self.highest {
            let shift = if self.bits == 0 {
                WINDOW
            } else {
                seq - self.highest
            };
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.highest = seq;
        } else {
            self.bits |= 1 << (self.highest - seq);
        }
    }
}

/// Checks received messages for one node of one group.
pub struct Verifier {
    key: Vec<u8>,
    group: String,
    me: String,
    peers: BTreeSet<IpAddr>,
    max_skew_ms: u64,
    seen: BTreeMap<(String, Kind), Seen>,
}

impl Verifier {
    pub fn new(key: &[u8], group: &str, me: &str, peers: &[SocketAddr], max_skew_ms: u64) -> Self {
        Verifier {
            key: key.to_vec(),
            group: group.to_string(),
            me: me.to_string(),
            peers: peers.iter().map(|p| p.ip()).collect(),
            max_skew_ms,
            seen: BTreeMap::new(),
        }
    }

    /// The message in `bytes`, received from `from` at `now_ms` (unix ms), if it passes every
    /// check; a refused one changes nothing.
    pub fn accept(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<Message, Reject> {
        if !self.peers.contains(&from.ip()) {
            return Err(Reject::UnknownPeer);
        }
        let m = open(&self.key, bytes)?;
        if m.group != self.group {
            return Err(Reject::OtherGroup);
        }
        if m.node == self.me {
            return Err(Reject::OwnName);
        }
        if m.sent_at_ms.abs_diff(now_ms) > self.max_skew_ms {
            return Err(Reject::Stale);
        }
        let seen = self.seen.entry((m.node.clone(), m.kind)).or_default();
        if !seen.fresh(m.seq) {
            return Err(Reject::Replayed);
        }
        seen.mark(m.seq);
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000_000;

    fn peer() -> SocketAddr {
        "198.18.250.2:7946".parse().unwrap()
    }

    fn msg(seq: u64) -> Message {
        Message {
            kind: Kind::Beat,
            group: "edge".into(),
            node: "node-b".into(),
            sent_at_ms: NOW,
            seq,
            payload: Beat {
                active: true,
                store: false,
                draining: false,
            }
            .payload(),
        }
    }

    fn verifier() -> Verifier {
        Verifier::new(KEY, "edge", "node-a", &[peer()], 1000)
    }

    #[test]
    fn a_sealed_message_opens_to_the_same_fields() {
        let mut v = verifier();
        let m = v.accept(peer(), &seal(KEY, &msg(1)), NOW + 5).unwrap();
        assert_eq!(m, msg(1));
        assert_eq!(
            Beat::parse(&m.payload),
            Ok(Beat {
                active: true,
                store: false,
                draining: false
            })
        );
    }

    #[test]
    fn forged_replayed_malformed_and_foreign_messages_are_refused_and_change_nothing() {
        let mut v = verifier();
        let good = seal(KEY, &msg(7));
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        let other_key = seal(b"another key of thirty-two bytes!", &msg(7));
        let other_group = seal(
            KEY,
            &Message {
                group: "core".into(),
                ..msg(7)
            },
        );
        let own = seal(
            KEY,
            &Message {
                node: "node-a".into(),
                ..msg(7)
            },
        );
        let old = seal(
            KEY,
            &Message {
                sent_at_ms: NOW - 5000,
                ..msg(7)
            },
        );
        let ahead = seal(
            KEY,
            &Message {
                sent_at_ms: NOW + 5000,
                ..msg(7)
            },
        );
        let mut kind = good.clone();
        kind[5] = 9;
        let cases: [(&[u8], SocketAddr, Reject); 10] = [
            (&flipped, peer(), Reject::Forged),
            (&other_key, peer(), Reject::Forged),
            (&good[..good.len() - 1], peer(), Reject::Forged),
            (&kind, peer(), Reject::Malformed),
            (&good[..10], peer(), Reject::Malformed),
            (&other_group, peer(), Reject::OtherGroup),
            (&own, peer(), Reject::OwnName),
            (&old, peer(), Reject::Stale),
            (&ahead, peer(), Reject::Stale),
            (
                &good,
                "198.18.250.9:7946".parse().unwrap(),
                Reject::UnknownPeer,
            ),
        ];
        for (bytes, from, want) in cases {
            assert_eq!(v.accept(from, bytes, NOW), Err(want));
        }
        // None of them counted: the genuine message is still new.
        assert_eq!(v.accept(peer(), &good, NOW), Ok(msg(7)));
        // The same bytes again are a replay; an older one not seen yet is late, and taken once.
        assert_eq!(v.accept(peer(), &good, NOW), Err(Reject::Replayed));
        assert!(v.accept(peer(), &seal(KEY, &msg(6)), NOW).is_ok());
        assert_eq!(
            v.accept(peer(), &seal(KEY, &msg(6)), NOW),
            Err(Reject::Replayed)
        );
        // Far below the window: refused.
        assert!(v.accept(peer(), &seal(KEY, &msg(1000)), NOW).is_ok());
        assert_eq!(
            v.accept(peer(), &seal(KEY, &msg(900)), NOW),
            Err(Reject::Replayed)
        );
        // Each kind has its own numbering.
        let flows = Message {
            kind: Kind::Flows,
            ..msg(5)
        };
        assert!(v.accept(peer(), &seal(KEY, &flows), NOW).is_ok());
        // A restarted sender numbers from its new start: newer.
        let restarted = Message {
            seq: first_seq(NOW),
            ..msg(0)
        };
        assert!(v.accept(peer(), &seal(KEY, &restarted), NOW).is_ok());
    }
}
