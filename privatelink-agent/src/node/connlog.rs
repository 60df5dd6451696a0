//! The connection log: one record when a logged connection opens (from the datapath's `CONN_LOG`
//! ring buffer) and one when it closes (from the conntrack sweep, which finds its flow gone),
//! each naming the service, endpoint, account and link, the consumer's address and port, the NAT
//! address and port and the backend. Records go to a JSON-lines file and to a bounded in-memory
//! window the API pages through (`GET /v1/services/{id}/connections-log`). Memory is bounded at
//! every step: the ring buffer (a full one loses records, counted by the datapath), the window
//! (the oldest records go first), the file (appended; rotate it with logrotate's `copytruncate`).
use std::{
    collections::{BTreeMap, VecDeque},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use privatelink_common::{CONN_FIN_BACKEND, CONN_FIN_CONSUMER, CONN_RST, ConnOpened, PROTO_TCP};

pub use crate::control::local::ConnRecord;
use crate::{
    control::{clock::unix_ms, plane::ControlPlane, state::State},
    datapath::{
        maps::ConnEnd,
        scan::{Worker, monotonic_ns},
    },
};

/// Records kept in memory for the API, newest last.
pub const WINDOW: usize = 100_000;

/// The log: its file and its in-memory window.
pub struct ConnLog {
    inner: Mutex<Inner>,
}

struct Inner {
    file: Option<std::fs::File>,
    window: VecDeque<ConnRecord>,
    next_seq: u64,
    /// Writes to the file that failed (a full disk, say); the window still has their records.
    unwritten: u64,
}

/// Who a link is: (service id, endpoint id, account id).
type Owners = BTreeMap<u32, (String, String, String)>;

fn owners(s: &State) -> Owners {
    s.endpoints
        .values()
        .map(|e| {
            (
                e.link_id,
                (e.service_id.clone(), e.id.clone(), e.owner.clone()),
            )
        })
        .collect()
}

/// Wall-clock milliseconds of CLOCK_MONOTONIC time `mono_ns`.
fn wall_ms(mono_ns: u64) -> u64 {
    unix_ms().saturating_sub(monotonic_ns().saturating_sub(mono_ns) / 1_000_000)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn proto(p: u8) -> &'static str {
    if p == PROTO_TCP { "tcp" } else { "udp" }
}

/// An address from a record's four wire words (IPv4 in the first).
fn addr(family: u8, w: [u32; 4]) -> IpAddr {
    if family == 4 {
        Ipv4Addr::from(w[0].to_ne_bytes()).into()
    } else {
        let mut b = [0u8; 16];
        for (i, x) in w.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
        }
        Ipv6Addr::from(b).into()
    }
}

impl ConnLog {
    /// A log appending to `path` (created 0600 if missing), or in memory only without one.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt as _;
                Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(p)?,
                )
            }
            None => None,
        };
        Ok(ConnLog {
            inner: Mutex::new(Inner {
                file,
                window: VecDeque::new(),
                next_seq: 1,
                unwritten: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends records (their `seq` assigned here) to the file and the window.
    fn push(&self, records: impl IntoIterator<Item = ConnRecord>) {
        let mut g = self.lock();
        let mut lines = Vec::new();
        for mut r in records {
            r.seq = g.next_seq;
            g.next_seq += 1;
            if let Ok(mut l) = serde_json::to_vec(&r) {
                l.push(b'\n');
                lines.extend_from_slice(&l);
            }
            if g.window.len() == WINDOW {
                g.window.pop_front();
            }
            g.window.push_back(r);
        }
        if let Some(f) = g.file.as_mut()
            && !lines.is_empty()
            && f.write_all(&lines).is_err()
        {
            g.unwritten += 1;
            // Said in the log at the 1st, 2nd, 4th, 8th ... failure: a full disk does not flood it.
            if g.unwritten.is_power_of_two() {
                log::warn!(
                    "connection log: {} writes to the file failed so far (the API still has the records)",
                    g.unwritten
                );
            }
        }
    }

    /// Records of `service_id` with a sequence number above `after`, oldest first, at most
    /// `limit`.
    pub fn page(&self, service_id: &str, after: u64, limit: usize) -> Vec<ConnRecord> {
        self.lock()
            .window
            .iter()
            .filter(|r| r.seq > after && r.service_id == service_id)
            .take(limit)
            .cloned()
            .collect()
    }

    fn opened(o: &ConnOpened, who: &Owners) -> ConnRecord {
        let (svc, ep, acct) = who.get(&o.link_id).cloned().unwrap_or_default();
        let at = |w, port_be: u16| SocketAddr::new(addr(o.family, w), u16::from_be(port_be));
        let ms = wall_ms(o.time_ns);
        ConnRecord {
            seq: 0,
            event: "opened",
            time: rfc3339(ms),
            time_ms: ms,
            service_id: svc,
            endpoint_id: ep,
            account_id: acct,
            link_id: o.link_id,
            protocol: proto(o.proto),
            consumer: at(o.consumer_be, o.consumer_port_be).to_string(),
            endpoint: at(o.endpoint_be, o.endpoint_port_be).to_string(),
            nat: at(o.nat_be, o.nat_port_be).to_string(),
            backend: at(o.backend_be, o.backend_port_be).to_string(),
            duration_ms: None,
            packets_in: None,
            bytes_in: None,
            packets_out: None,
            bytes_out: None,
            ended: None,
        }
    }

    fn closed(e: &ConnEnd, who: &Owners) -> ConnRecord {
        let (svc, ep, acct) = who.get(&e.link_id).cloned().unwrap_or_default();
        let now = unix_ms();
        let opened = wall_ms(e.opened_ns);
        ConnRecord {
            seq: 0,
            event: "closed",
            time: rfc3339(now),
            time_ms: now,
            service_id: svc,
            endpoint_id: ep,
            account_id: acct,
            link_id: e.link_id,
            protocol: proto(e.proto),
            consumer: e.consumer.to_string(),
            endpoint: e.endpoint.to_string(),
            nat: e.nat.to_string(),
            backend: e.backend.to_string(),
            duration_ms: Some(now.saturating_sub(opened)),
            packets_in: Some(e.fwd_packets),
            bytes_in: Some(e.fwd_bytes),
            packets_out: Some(e.rev_packets),
            bytes_out: Some(e.rev_bytes),
            ended: Some(if e.ended & CONN_RST != 0 {
                "rst"
            } else if e.ended & (CONN_FIN_CONSUMER | CONN_FIN_BACKEND) != 0 {
                "fin"
            } else {
                "timeout"
            }),
        }
    }

    /// Closing records of connections the sweep found ended.
    pub fn ended(&self, plane: &ControlPlane, ended: &[ConnEnd]) {
        if ended.is_empty() {
            return;
        }
        let who = plane.read(owners);
        self.push(ended.iter().map(|e| Self::closed(e, &who)));
    }
}

/// How often the reader drains the ring buffer.
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// The ring buffer's reader: drains it every [`DRAIN_EVERY`] into `log`; stops when dropped.
pub struct Reader(#[allow(dead_code, reason = "held for its Drop")] Worker);

impl Reader {
    pub fn start(
        mut ring: RingBuf<MapData>,
        log: Arc<ConnLog>,
        plane: Arc<ControlPlane>,
    ) -> std::io::Result<Self> {
        Worker::start("conn-log", DRAIN_EVERY, move || {
            let mut opened = Vec::new();
            while let Some(item) = ring.next() {
                if let Ok(o) = bytemuck::try_pod_read_unaligned::<ConnOpened>(&item) {
                    opened.push(o);
                }
            }
            if !opened.is_empty() {
                let who = plane.read(owners);
                log.push(opened.iter().map(|o| ConnLog::opened(o, &who)));
            }
        })
        .map(Reader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(link: u32, port: u16) -> ConnOpened {
        let w = |a: Ipv4Addr| [u32::from_ne_bytes(a.octets()), 0, 0, 0];
        ConnOpened {
            time_ns: monotonic_ns(),
            link_id: link,
            family: 4,
            proto: PROTO_TCP,
            _pad: 0,
            consumer_be: w(Ipv4Addr::new(198, 18, 0, 10)),
            endpoint_be: w(Ipv4Addr::new(198, 18, 0, 100)),
            nat_be: w(Ipv4Addr::new(198, 19, 128, 1)),
            backend_be: w(Ipv4Addr::new(198, 18, 100, 10)),
            consumer_port_be: port.to_be(),
            endpoint_port_be: 80u16.to_be(),
            nat_port_be: 40_000u16.to_be(),
            backend_port_be: 8080u16.to_be(),
        }
    }

    #[test]
    fn records_name_the_owners_page_by_service_and_land_in_the_file_as_json_lines() {
        let dir = std::env::temp_dir().join(format!("pl-connlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.jsonl");
        let log = ConnLog::open(Some(&path)).unwrap();
        let who: Owners = BTreeMap::from([
            (1, ("svc-a".into(), "ep-1".into(), "1000000001".into())),
            (2, ("svc-b".into(), "ep-2".into(), "1000000002".into())),
        ]);
        log.push([
            ConnLog::opened(&opened(1, 5000), &who),
            ConnLog::opened(&opened(2, 5001), &who),
            ConnLog::opened(&opened(1, 5002), &who),
        ]);
        let a = log.page("svc-a", 0, 10);
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].seq, a[1].seq), (1, 3));
        assert_eq!(a[0].consumer, "198.18.0.10:5000");
        assert_eq!(a[0].nat, "198.19.128.1:40000");
        assert_eq!(a[0].backend, "198.18.100.10:8080");
        assert_eq!(
            (a[0].endpoint_id.as_str(), a[0].account_id.as_str()),
            ("ep-1", "1000000001")
        );
        assert_eq!(log.page("svc-a", 1, 10).len(), 1, "after seq 1");
        assert_eq!(log.page("svc-a", 0, 1).len(), 1, "limit");
        let end = ConnEnd {
            link_id: 2,
            proto: PROTO_TCP,
            consumer: "198.18.0.10:5001".parse().unwrap(),
            endpoint: "198.18.0.100:80".parse().unwrap(),
            nat: "198.19.128.1:40000".parse().unwrap(),
            backend: "198.18.100.10:8080".parse().unwrap(),
            opened_ns: monotonic_ns().saturating_sub(2_000_000_000),
            fwd_packets: 5,
            fwd_bytes: 500,
            rev_packets: 4,
            rev_bytes: 4000,
            ended: CONN_FIN_CONSUMER,
        };
        log.push([ConnLog::closed(&end, &who)]);
        let b = log.page("svc-b", 0, 10);
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].event, "closed");
        assert_eq!(b[1].ended, Some("fin"));
        assert!(
            b[1].duration_ms
                .is_some_and(|d| (1_900..5_000).contains(&d))
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[3]["bytes_out"], 4000);
        assert_eq!(lines[3]["event"], "closed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
