//! tcpdump in a namespace, its packets a line each in a file, and what those lines say about how
//! TCP connections ended.
//!
//! A reset is not always a connection broken: when packets are held back long enough (reordering,
//! a busy host), a segment can arrive after both ends have closed; the end in TIME_WAIT
//! acknowledges it and the end that already forgot the connection answers that with a reset.
//! [`resets_before_close`] tells the resets that ended a connection from those.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use privatelink_agent::testkit::netns::Netns;

use crate::world::Proc;

/// The tcpdump filter of the packets that open and end TCP connections (SYN, FIN, RST).
pub const ENDS: &str = "tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0";

/// tcpdump on a namespace's `eth0`, a line per packet in `<root>/<name>.txt`; stopped on drop.
pub struct Watch {
    _tcpdump: Proc,
    file: PathBuf,
}

impl Watch {
    /// Starts tcpdump with `filter` and returns once it is capturing.
    pub fn start(ns: &Netns, root: &Path, name: &str, filter: &str) -> Watch {
        let file = root.join(format!("{name}.txt"));
        let out = std::fs::File::create(&file).unwrap();
        let err = root.join(format!("{name}.err"));
        let mut child = ns
            .command("tcpdump")
            .args(["-i", "eth0", "-n", "-l", "--immediate-mode", filter])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
            .spawn()
            .expect("tcpdump");
        // Capturing once it says so.
        let t = Instant::now();
        while !std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("listening on")
        {
            if let Ok(Some(s)) = child.try_wait() {
                panic!(
                    "tcpdump ended: {s}\n{}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "tcpdump did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Watch {
            _tcpdump: Proc(child),
            file,
        }
    }

    /// The packets seen so far, a line each.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

/// A packet line's ends and TCP flags: `IP a.b.c.d.P > e.f.g.h.Q: Flags [F.], ...` (or `IP6`).
fn parse(line: &str) -> Option<(&str, &str, &str)> {
    let (_, rest) = line
        .split_once(" IP ")
        .or_else(|| line.split_once(" IP6 "))?;
    let (from, rest) = rest.split_once(" > ")?;
    let (to, rest) = rest.split_once(": Flags [")?;
    let (flags, _) = rest.split_once(']')?;
    Some((from, to, flags))
}

/// The destination port of a packet line (`... > e.f.g.h.PORT: Flags ...`).
pub fn dst_port(line: &str) -> Option<u16> {
    let (_, to, _) = parse(line)?;
    to.rsplit_once('.')?.1.parse().ok()
}

/// How the connections in `lines` (from a [`Watch`] with [`ENDS`]) went so far.
#[derive(Debug, Default, PartialEq)]
pub struct Ends {
    /// Connections both ends of which have sent a FIN.
    pub closed: usize,
    /// Resets that came while a connection was open (before one end or the other had sent its
    /// FIN): a connection broken.
    pub before_close: Vec<String>,
    /// Resets after both FINs: an end answering a late segment of a connection it has forgotten.
    pub after_close: Vec<String>,
}

/// Reads `lines` in order. A SYN without ACK starts its connection afresh (a reused tuple).
pub fn ends(lines: &[String]) -> Ends {
    // Per connection (its two ends, ordered): which ends have sent a FIN.
    let mut fins: HashMap<(String, String), [bool; 2]> = HashMap::new();
    let mut e = Ends::default();
    for line in lines {
        let Some((from, to, flags)) = parse(line) else {
            continue;
        };
        let (key, side) = if from < to {
            ((from.to_string(), to.to_string()), 0)
        } else {
            ((to.to_string(), from.to_string()), 1)
        };
        let f = fins.entry(key).or_default();
        if flags.contains('S') && !flags.contains('.') {
            *f = [false; 2];
        }
        if flags.contains('F') && !f[side] {
            f[side] = true;
            if f[1 - side] {
                e.closed += 1;
            }
        }
        if flags.contains('R') {
            if f[0] && f[1] {
                e.after_close.push(line.clone());
            } else {
                e.before_close.push(line.clone());
            }
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(|l| l.trim().to_string()).collect()
    }

    #[test]
    fn a_reset_after_both_fins_is_told_from_one_that_breaks_a_connection() {
        // What a 50 MB transfer under reordering showed: the backend's late segments reach the
        // client in TIME_WAIT, whose acknowledgement the closed backend answers with a reset.
        let l = lines(
            "06:16:40.533413 IP 198.18.0.10.55544 > 198.18.0.111.80: Flags [S], seq 1, win 64240, length 0
             06:16:40.533509 IP 198.18.0.111.80 > 198.18.0.10.55544: Flags [S.], seq 7, ack 2, win 65160, length 0
             06:16:41.677365 IP 198.18.0.10.55544 > 198.18.0.111.80: Flags [F.], seq 80, ack 52429049, win 10879, length 0
             06:16:41.678846 IP 198.18.0.111.80 > 198.18.0.10.55544: Flags [F.], seq 52429049, ack 81, win 64, length 0
             06:16:41.704534 IP 198.18.0.111.80 > 198.18.0.10.55544: Flags [R], seq 776431137, win 0, length 0
             06:16:41.800000 IP6 2001:db8::10.41000 > 2001:db8::111.80: Flags [S], seq 1, win 64240, length 0
             06:16:41.800100 IP6 2001:db8::10.41000 > 2001:db8::111.80: Flags [F.], seq 5, ack 9, win 64, length 0
             06:16:41.800200 IP6 2001:db8::111.80 > 2001:db8::10.41000: Flags [R.], seq 9, ack 6, win 0, length 0
             06:16:41.900000 IP 198.18.0.10.55544 > 198.18.0.111.80: Flags [S], seq 99, win 64240, length 0
             06:16:41.900100 IP 198.18.0.111.80 > 198.18.0.10.55544: Flags [R.], seq 0, ack 100, win 0, length 0",
        );
        let e = ends(&l);
        assert_eq!(e.closed, 1);
        assert_eq!(e.after_close, vec![l[4].clone()]);
        // One FIN is not a close; a reused tuple starts afresh.
        assert_eq!(e.before_close, vec![l[7].clone(), l[9].clone()]);
    }

    #[test]
    fn a_lines_destination_port_is_read_for_both_families() {
        let l = "04:12:01.123456 IP 198.18.0.100.81 > 198.18.1.10.45678: Flags [R], seq 1, win 0, \
                 length 0";
        assert_eq!(dst_port(l), Some(45678));
        assert_eq!(
            dst_port("04:12:01.1 IP6 2001:db8::100.81 > 2001:db8::10.81: Flags [R.], seq 9"),
            Some(81)
        );
        assert_eq!(dst_port("tcpdump: listening on eth0"), None);
        assert_eq!(dst_port("04:12:01.1 IP 198.18.0.100.81 > garbage"), None);
    }

    #[test]
    fn lines_that_are_no_tcp_packet_are_skipped() {
        let l = lines(
            "tcpdump: verbose output suppressed
             06:16:41.704534 ARP, Request who-has 198.18.0.111 tell 198.18.0.10, length 28",
        );
        assert_eq!(ends(&l), Ends::default());
    }
}
