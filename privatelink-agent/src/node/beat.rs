//! Heartbeats between the nodes of a high-availability group: the wire format, and the checks a
//! received one passes before it counts. A heartbeat says "this node is alive, is (or is not)
//! active for the group, and does (or does not) reach the shared store"; a forged one could keep
//! a dead node looking alive (no takeover) or make a live one look fenced, so every heartbeat is
//! authenticated and fresh:
//!
//! - HMAC-SHA256 over the whole message with the group's shared key (`ha.key_file`);
//! - it names the group, and the sender must be one of the configured peer addresses;
//! - `sent_at` (the sender's clock, unix ms) within `max_clock_skew` of the receiver's, and
//!   `(sent_at, seq)` above the last one accepted from that node: a replayed heartbeat, even one
//!   from before the sender restarted, is refused.
//!
//! Layout (byte order: network):
//! `magic "PLHA" | version 1 | flags | group length | node length | sent_at u64 | seq u64 |
//! group | node | HMAC-SHA256 (32 bytes)`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"PLHA";
const VERSION: u8 = 1;
/// The sender is active for the group.
const FLAG_ACTIVE: u8 = 1;
/// The sender reaches the shared store.
const FLAG_STORE: u8 = 2;
const HEAD: usize = 4 + 1 + 1 + 1 + 1 + 8 + 8;
const MAC_LEN: usize = 32;
/// Longest group or node name carried.
pub const MAX_NAME: usize = 63;

/// One heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beat {
    pub group: String,
    pub node: String,
    /// The sender's clock when it sent this (unix milliseconds).
    pub sent_at_ms: u64,
    /// Counts up with every heartbeat the sender sends.
    pub seq: u64,
    pub active: bool,
    pub store: bool,
}

/// Why a received heartbeat was refused (the metric's `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    /// Too short, a wrong magic or version, lengths that do not add up, names not UTF-8.
    Malformed,
    /// The MAC does not verify: another key, or altered bytes.
    Forged,
    /// From an address that is not a configured peer.
    UnknownPeer,
    /// For another group.
    OtherGroup,
    /// Carrying this node's own name.
    OwnName,
    /// Not newer than the last one accepted from that node.
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

/// The heartbeat as sent: its fields and their MAC. Names longer than [`MAX_NAME`] are the
/// caller's error (the configuration refuses them).
pub fn seal(key: &[u8], b: &Beat) -> Vec<u8> {
    assert!(b.group.len() <= MAX_NAME && b.node.len() <= MAX_NAME);
    let mut out = Vec::with_capacity(HEAD + b.group.len() + b.node.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push((u8::from(b.active) * FLAG_ACTIVE) | (u8::from(b.store) * FLAG_STORE));
    out.push(b.group.len() as u8);
    out.push(b.node.len() as u8);
    out.extend_from_slice(&b.sent_at_ms.to_be_bytes());
    out.extend_from_slice(&b.seq.to_be_bytes());
    out.extend_from_slice(b.group.as_bytes());
    out.extend_from_slice(b.node.as_bytes());
    let mut m = mac(key);
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Parses and authenticates `bytes` (nothing else checked).
fn open(key: &[u8], bytes: &[u8]) -> Result<Beat, Reject> {
    if bytes.len() < HEAD + MAC_LEN || &bytes[..4] != MAGIC || bytes[4] != VERSION {
        return Err(Reject::Malformed);
    }
    let (glen, nlen) = (bytes[6] as usize, bytes[7] as usize);
    if bytes.len() != HEAD + glen + nlen + MAC_LEN || glen > MAX_NAME || nlen > MAX_NAME {
        return Err(Reject::Malformed);
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut m = mac(key);
    m.update(body);
    m.verify_slice(tag).map_err(|_| Reject::Forged)?;
    let word = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("eight bytes"));
    let text = |at: usize, len: usize| {
        std::str::from_utf8(&body[at..at + len])
            .map(str::to_string)
            .map_err(|_| Reject::Malformed)
    };
    let flags = body[5];
    Ok(Beat {
        group: text(HEAD, glen)?,
        node: text(HEAD + glen, nlen)?,
        sent_at_ms: word(8),
        seq: word(16),
        active: flags & FLAG_ACTIVE != 0,
        store: flags & FLAG_STORE != 0,
    })
}

/// Checks received heartbeats for one node of one group, remembering the newest accepted from
/// each peer.
pub struct Verifier {
    key: Vec<u8>,
    group: String,
    me: String,
    peers: BTreeSet<IpAddr>,
    max_skew_ms: u64,
    /// Node → (sent_at, seq) of the last heartbeat accepted from it.
    last: BTreeMap<String, (u64, u64)>,
}

impl Verifier {
    pub fn new(key: &[u8], group: &str, me: &str, peers: &[SocketAddr], max_skew_ms: u64) -> Self {
        Verifier {
            key: key.to_vec(),
            group: group.to_string(),
            me: me.to_string(),
            peers: peers.iter().map(|p| p.ip()).collect(),
            max_skew_ms,
            last: BTreeMap::new(),
        }
    }

    /// The heartbeat in `bytes`, received from `from` at `now_ms` (unix ms), if it passes every
    /// check; a refused one changes nothing.
    pub fn accept(&mut self, from: SocketAddr, bytes: &[u8], now_ms: u64) -> Result<Beat, Reject> {
        if !self.peers.contains(&from.ip()) {
            return Err(Reject::UnknownPeer);
        }
        let b = open(&self.key, bytes)?;
        if b.group != self.group {
            return Err(Reject::OtherGroup);
        }
        if b.node == self.me {
            return Err(Reject::OwnName);
        }
        if b.sent_at_ms.abs_diff(now_ms) > self.max_skew_ms {
            return Err(Reject::Stale);
        }
        let stamp = (b.sent_at_ms, b.seq);
        if self.last.get(&b.node).is_some_and(|last| stamp <= *last) {
            return Err(Reject::Replayed);
        }
        self.last.insert(b.node.clone(), stamp);
        Ok(b)
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

    fn beat(seq: u64) -> Beat {
        Beat {
            group: "edge".into(),
            node: "node-b".into(),
            sent_at_ms: NOW,
            seq,
            active: true,
            store: false,
        }
    }

    fn verifier() -> Verifier {
        Verifier::new(KEY, "edge", "node-a", &[peer()], 1000)
    }

    #[test]
    fn a_sealed_heartbeat_opens_to_the_same_fields() {
        let mut v = verifier();
        assert_eq!(v.accept(peer(), &seal(KEY, &beat(1)), NOW + 5), Ok(beat(1)));
    }

    #[test]
    fn forged_replayed_malformed_and_foreign_heartbeats_are_refused_and_change_nothing() {
        let mut v = verifier();
        let good = seal(KEY, &beat(7));
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        let other_key = seal(b"another key of thirty-two bytes!", &beat(7));
        let other_group = seal(
            KEY,
            &Beat {
                group: "core".into(),
                ..beat(7)
            },
        );
        let own = seal(
            KEY,
            &Beat {
                node: "node-a".into(),
                ..beat(7)
            },
        );
        let old = seal(
            KEY,
            &Beat {
                sent_at_ms: NOW - 5000,
                ..beat(7)
            },
        );
        let ahead = seal(
            KEY,
            &Beat {
                sent_at_ms: NOW + 5000,
                ..beat(7)
            },
        );
        let mut long = good.clone();
        long.push(0);
        let cases: [(&[u8], SocketAddr, Reject); 10] = [
            (&flipped, peer(), Reject::Forged),
            (&other_key, peer(), Reject::Forged),
            (&good[..good.len() - 1], peer(), Reject::Malformed),
            (&long, peer(), Reject::Malformed),
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
        // None of them counted: the genuine heartbeat is still new.
        assert_eq!(v.accept(peer(), &good, NOW), Ok(beat(7)));
        // The same bytes again, and an older one, are replays.
        assert_eq!(v.accept(peer(), &good, NOW), Err(Reject::Replayed));
        assert_eq!(
            v.accept(peer(), &seal(KEY, &beat(6)), NOW),
            Err(Reject::Replayed)
        );
        // Newer ones pass: a later sequence, or a later clock (a restarted sender).
        assert!(v.accept(peer(), &seal(KEY, &beat(8)), NOW).is_ok());
        let restarted = Beat {
            sent_at_ms: NOW + 1,
            seq: 0,
            ..beat(0)
        };
        assert!(v.accept(peer(), &seal(KEY, &restarted), NOW).is_ok());
    }
}
