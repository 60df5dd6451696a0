//! What endpoint creation allocates from, kept in step with the state: the link ids in use and
//! each subnet's addresses in use, as sorted sets, so that the lowest free link id and the first
//! free address are binary searches instead of a walk over every endpoint (which took 4 ms per
//! creation with 100k endpoints in a subnet).
//!
//! The control plane owns the state and changes it in three ways only: a full load, its own
//! commits and the commits it follows. Each rebuilds or updates these sets with it
//! ([`Allocations::of`], [`Allocations::apply`]); nothing else can reach the state it holds.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use super::{
    state::State,
    types::{Change, Endpoint, Object},
};

/// A multiset of numbers, kept sorted, for "the first number from here that is not taken" by
/// binary search.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Taken {
    /// Each number taken, once, ascending (16 bytes a number: inserting moves half of them).
    sorted: Vec<u128>,
    /// Holders beyond the first of a number (a corrupt state's duplicates; normally empty).
    extra: BTreeMap<u128, u32>,
}

impl Taken {
    fn add(&mut self, n: u128) {
        match self.sorted.binary_search(&n) {
            Ok(_) => *self.extra.entry(n).or_insert(0) += 1,
            Err(i) => self.sorted.insert(i, n),
        }
    }

    fn remove(&mut self, n: u128) {
        if let Some(c) = self.extra.get_mut(&n) {
            *c -= 1;
            if *c == 0 {
                self.extra.remove(&n);
            }
        } else if let Ok(i) = self.sorted.binary_search(&n) {
            self.sorted.remove(i);
        }
    }

    fn contains(&self, n: u128) -> bool {
        self.sorted.binary_search(&n).is_ok()
    }

    fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }
}

/// The smallest number in `first..first + len` that is not in `sorted` (ascending, each number
/// once), by binary search.
pub fn first_free_in(sorted: &[u128], first: u128, len: u128) -> Option<u128> {
    let run = &sorted[sorted.partition_point(|&x| x < first)..];
    // `run` is strictly increasing from `first` on, so `run[j] == first + j` holds for a prefix
    // of it: the first `j` where it fails (or the prefix's end) is free.
    let (mut lo, mut hi) = (0, run.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if Some(run[mid]) == first.checked_add(mid as u128) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let n = first.checked_add(lo as u128)?;
    (n < first.saturating_add(len)).then_some(n)
}

/// Link ids and subnet addresses in use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocations {
    links: Taken,
    /// (subnet id, IPv6) → the addresses of that family in use in the subnet.
    addrs: BTreeMap<(String, bool), Taken>,
}

/// An address as a number (IPv4 in the low 32 bits).
fn number(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

/// How many addresses of a subnet an automatic assignment searches.
pub const CANDIDATES: u128 = 65_536;

impl Allocations {
    /// The allocations of `state`.
    pub fn of(state: &State) -> Self {
        let mut a = Allocations::default();
        for e in state.endpoints.values() {
            a.add(e);
        }
        a
    }

    fn add(&mut self, e: &Endpoint) {
        self.links.add(e.link_id.into());
        for ip in e.all_ips() {
            self.addrs
                .entry((e.subnet_id.clone(), ip.is_ipv6()))
                .or_default()
                .add(number(ip));
        }
    }

    fn remove(&mut self, e: &Endpoint) {
        self.links.remove(e.link_id.into());
        for ip in e.all_ips() {
            let key = (e.subnet_id.clone(), ip.is_ipv6());
            if let Some(t) = self.addrs.get_mut(&key) {
                t.remove(number(ip));
                // A subnet without endpoints leaves nothing behind, as if it never had any.
                if t.is_empty() {
                    self.addrs.remove(&key);
                }
            }
        }
    }

    /// Takes in `changes` as they are applied to `before` (call it before `State::apply`: a put
    /// replaces the endpoint `before` holds under its id, a delete removes it).
    pub fn apply(&mut self, before: &State, changes: &[Change]) {
        // An id may change more than once in one commit: what it held last counts.
        let mut held: BTreeMap<&str, Option<&Endpoint>> = BTreeMap::new();
        for c in changes {
            let (id, new) = match c {
                Change::Put(Object::Endpoint(e)) => (e.id.as_str(), Some(e)),
                Change::Delete { kind, id } if *kind == "endpoint" => (id.as_str(), None),
                _ => continue,
            };
            let old = held
                .get(id)
                .copied()
                .unwrap_or_else(|| before.endpoints.get(id));
            if let Some(old) = old {
                self.remove(old);
            }
            if let Some(new) = new {
                self.add(new);
            }
            held.insert(id, new);
        }
    }

    /// The lowest link id from 1 that no endpoint holds, below `limit`.
    pub fn lowest_link(&self, limit: u32) -> Option<u32> {
        let n = first_free_in(&self.links.sorted, 1, u128::from(limit).saturating_sub(1))?;
        u32::try_from(n).ok()
    }

    /// Whether an endpoint of `subnet` has `ip`.
    pub fn addr_taken(&self, subnet: &str, ip: IpAddr) -> bool {
        self.addrs
            .get(&(subnet.to_string(), ip.is_ipv6()))
            .is_some_and(|t| t.contains(number(ip)))
    }

    /// The first of `cidr`'s first [`CANDIDATES`] assignable addresses that no endpoint of
    /// `subnet` has: an IPv4 range's hosts (neither its network nor its broadcast address, but
    /// both of a /31 or /32), an IPv6 range's addresses after its network address.
    pub fn first_free(&self, subnet: &str, cidr: &IpNet) -> Option<IpAddr> {
        let (first, len) = match cidr {
            IpNet::V4(n) if n.prefix_len() >= 31 => (
                u32::from(n.network()).into(),
                1u128 << (32 - n.prefix_len()),
            ),
            IpNet::V4(n) => (
                u128::from(u32::from(n.network())) + 1,
                (1u128 << (32 - n.prefix_len())) - 2,
            ),
            IpNet::V6(n) => {
                let size = 1u128.checked_shl(128 - u32::from(n.prefix_len()));
                // A /128 has no address after its network address (which may be the last).
                (
                    u128::from(n.network()).wrapping_add(1),
                    size.map_or(u128::MAX, |s| s - 1),
                )
            }
        };
        let len = len.min(CANDIDATES);
        if len == 0 {
            return None;
        }
        let n = match self.addrs.get(&(subnet.to_string(), cidr.addr().is_ipv6())) {
            Some(t) => first_free_in(&t.sorted, first, len)?,
            None => first,
        };
        Some(match cidr {
            IpNet::V4(_) => IpAddr::V4((n as u32).into()),
            IpNet::V6(_) => IpAddr::V6(n.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::control::types::Account;

    /// A small deterministic generator (xorshift), so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn endpoint(r: &mut Rng) -> Endpoint {
        let ip = IpAddr::V4([198, 18, 0, r.below(16) as u8].into());
        let ipv6 = (r.below(2) == 0)
            .then(|| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, r.below(8) as u16));
        Endpoint::for_test(
            &format!("ep-{}", r.below(20)),
            r.below(12) as u32 + 1,
            ["a", "b"][r.below(2) as usize],
            ip,
            ipv6,
        )
    }

    /// What the allocations must answer, by looking at every endpoint (the way validation
    /// worked before them).
    fn scanned_free(s: &State, subnet: &str, cidr: &IpNet) -> Option<IpAddr> {
        let used: Vec<IpAddr> = s
            .endpoints
            .values()
            .filter(|e| e.subnet_id == subnet)
            .flat_map(|e| e.all_ips())
            .collect();
        let candidates: Vec<IpAddr> = match cidr {
            IpNet::V4(n) => n.hosts().map(IpAddr::V4).collect(),
            IpNet::V6(n) => n.hosts().map(IpAddr::V6).skip(1).collect(),
        };
        candidates.into_iter().find(|a| !used.contains(a))
    }

    fn scanned_link(s: &State) -> u32 {
        (1..)
            .find(|n| !s.endpoints.values().any(|e| e.link_id == *n))
            .unwrap()
    }

    #[test]
    fn kept_in_step_with_the_state_they_answer_as_a_walk_over_every_endpoint_would() {
        let cidrs: Vec<IpNet> = [
            "198.18.0.0/28",
            "198.18.0.0/30",
            "198.18.0.4/31",
            "198.18.0.9/32",
            "2001:db8::/125",
            "2001:db8::/127",
        ]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut state = State::default();
        let mut alloc = Allocations::of(&state);
        for revision in 1..=2_000u64 {
            let changes: Vec<Change> = (0..=r.below(3))
                .map(|_| match r.below(5) {
                    0 => Change::Delete {
                        kind: "endpoint",
                        id: format!("ep-{}", r.below(20)),
                    },
                    1 => Change::Put(Object::Account(Account {
                        id: "acc".into(),
                        number: 1,
                        name: "a".into(),
                        created_at: 0,
                    })),
                    _ => Change::Put(Object::Endpoint(endpoint(&mut r))),
                })
                .collect();
            alloc.apply(&state, &changes);
            state.apply(revision, &changes);
            assert_eq!(
                alloc,
                Allocations::of(&state),
                "revision {revision}: {changes:?}"
            );
            assert_eq!(alloc.lowest_link(u32::MAX), Some(scanned_link(&state)));
            for subnet in ["a", "b", "c"] {
                for cidr in &cidrs {
                    assert_eq!(
                        alloc.first_free(subnet, cidr),
                        scanned_free(&state, subnet, cidr),
                        "revision {revision}, subnet {subnet}, {cidr}"
                    );
                }
                for e in state.endpoints.values() {
                    for ip in e.all_ips() {
                        assert_eq!(
                            alloc.addr_taken(subnet, ip),
                            state
                                .endpoints
                                .values()
                                .any(|o| o.subnet_id == subnet && o.all_ips().any(|a| a == ip)),
                            "revision {revision}: {ip} in subnet {subnet}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_lowest_link_keeps_below_its_limit() {
        let mut t = Allocations::default();
        for id in [1u32, 2] {
            t.links.add(id.into());
        }
        assert_eq!(t.lowest_link(4), Some(3));
        assert_eq!(t.lowest_link(3), None, "1 and 2 taken, 3 is the limit");
        let mut far = Allocations::default();
        far.links.add(u128::from(u32::MAX - 1));
        assert_eq!(far.lowest_link(u32::MAX), Some(1));
    }

    #[test]
    fn the_ends_of_the_address_space_do_not_overflow() {
        // Values only, never sent anywhere: the last IPv6 addresses.
        let mut a = Allocations::default();
        let top: IpNet = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"
            .parse()
            .unwrap();
        assert_eq!(
            a.first_free("s", &top),
            None,
            "a /128 has nothing to assign"
        );
        let last4: IpNet = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffc/126"
            .parse()
            .unwrap();
        let t = a.addrs.entry(("s".into(), true)).or_default();
        for n in 1..=3 {
            t.add(u128::MAX - 3 + n);
        }
        assert_eq!(
            a.first_free("s", &last4),
            None,
            "all three taken, up to the last"
        );
        a.addrs
            .get_mut(&("s".into(), true))
            .unwrap()
            .remove(u128::MAX - 1);
        assert_eq!(
            a.first_free("s", &last4),
            Some("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe".parse().unwrap())
        );
    }

    #[test]
    fn only_the_first_candidates_are_searched() {
        let mut a = Allocations::default();
        let t = a.addrs.entry(("s".into(), false)).or_default();
        let first = u128::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1)));
        for n in 0..CANDIDATES {
            t.add(first + n);
        }
        let cidr: IpNet = "198.18.0.0/15".parse().unwrap();
        assert_eq!(a.first_free("s", &cidr), None, "the first 65,536 are taken");
        a.addrs
            .get_mut(&("s".into(), false))
            .unwrap()
            .remove(first + 70);
        assert_eq!(
            a.first_free("s", &cidr),
            Some("198.18.0.71".parse().unwrap())
        );
    }
}
