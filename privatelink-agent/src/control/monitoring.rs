//! The monitoring vocabulary the API serves: the tiers a node keeps, periods to read, points and
//! their CSV form. The history store of a node runtime keeps the points; the API
//! reads them through [`super::local::NodeLocal`].
use serde::{Deserialize, Serialize};

pub const TIERS: [(u64, u64); 3] = [(10, 3600), (3600, 7 * 86_400), (86_400, 30 * 86_400)];

/// One bucket of history: traffic within it, and the most connections seen live.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Point {
    /// Bucket start, unix seconds.
    pub ts: u64,
    pub fwd_bytes: u64,
    pub rev_bytes: u64,
    pub fwd_packets: u64,
    pub rev_packets: u64,
    pub new_connections: u64,
    pub drops: u64,
    pub max_active_connections: u64,
}

/// A period to read: `realtime`, `24h`, `7d`, or `FROM..TO` (unix seconds or RFC 3339), at a
/// granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub from: u64,
    pub to: u64,
    pub granularity: u64,
}

/// Parses a time: unix seconds or RFC 3339.
fn time(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?}: {e}; use unix seconds or RFC 3339 (2026-11-23T10:00:00Z)"))?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|e| e.to_string())
}

impl Period {
    /// `period` and optional `granularity` (`1h`, `1d`) as the API and CLI take them.
    pub fn parse(period: &str, granularity: Option<&str>, now: u64) -> Result<Period, String> {
        let g = match granularity {
            None => None,
            Some("10s") => Some(10),
            Some("1m") => Some(60),
            Some("1h") => Some(3600),
            Some("1d") => Some(86_400),
            Some(other) => return Err(format!("granularity {other:?}: use 10s, 1m, 1h or 1d")),
        };
        let (from, to, default_g) = match period {
            // Windows hold whole buckets: the one starting a full window ago has aged out.
            "realtime" => (now.saturating_sub(3600 - 10), now, 10),
            "24h" => (now.saturating_sub(86_400 - 3600), now, 3600),
            "7d" => (now.saturating_sub(7 * 86_400 - 3600), now, 3600),
            custom => {
                let (a, b) = custom.split_once("..").ok_or_else(|| {
                    format!("period {custom:?}: use realtime, 24h, 7d or FROM..TO")
                })?;
                let (from, to) = (time(a)?, time(b)?);
                if from >= to {
                    return Err(format!("period {custom:?}: FROM must be before TO"));
                }
                (from, to, if to - from > 7 * 86_400 { 86_400 } else { 3600 })
            }
        };
        let granularity = g.unwrap_or(default_g);
        let kept = TIERS
            .iter()
            .find(|t| t.0 == Self::tier_of(granularity))
            .map(|t| t.1)
            .unwrap_or(0);
        if from <= now.saturating_sub(kept) {
            return Err(format!(
                "{} granularity is kept for {}: ask for a later FROM or a coarser granularity",
                granularity_name(granularity),
                match kept {
                    3600 => "1 hour",
                    604_800 => "7 days",
                    _ => "30 days",
                }
            ));
        }
        Ok(Period {
            from,
            to,
            granularity,
        })
    }

    /// The stored tier a granularity is read from (1 min is six 10 s buckets).
    fn tier_of(granularity: u64) -> u64 {
        if granularity == 60 { 10 } else { granularity }
    }

    /// The same period at the granularity a node stores: what to read before [`roll_up`].
    pub fn stored(&self) -> Period {
        Period {
            granularity: Self::tier_of(self.granularity),
            ..*self
        }
    }

    /// The granularity's name as the API takes it.
    pub fn granularity_name(&self) -> &'static str {
        granularity_name(self.granularity)
    }

    /// Where a comparison with this period starts, from `compare_to`: a time (Unix seconds or
    /// RFC 3339), a period `FROM..TO` (its FROM), or how long before this period (`24h`, `7d`,
    /// `1w`).
    pub fn compare_start(&self, spec: &str) -> Result<u64, String> {
        let spec = spec.trim();
        if let Some((from, _)) = spec.split_once("..") {
            return time(from);
        }
        if let Ok(t) = time(spec) {
            return Ok(t);
        }
        match humantime::parse_duration(spec) {
            Ok(d) if d.as_secs() > 0 => Ok(self.from.saturating_sub(d.as_secs())),
            _ => Err(format!(
                "compare_to {spec:?}: use Unix seconds, RFC 3339, FROM..TO, or how long before \
                 the period (24h, 7d)"
            )),
        }
    }

    /// Seconds the period spans (never zero: parsing refuses FROM >= TO).
    pub fn duration_secs(&self) -> u64 {
        self.to - self.from
    }
}

fn granularity_name(g: u64) -> &'static str {
    match g {
        10 => "10s",
        60 => "1m",
        3600 => "1h",
        _ => "1d",
    }
}

impl Point {
    /// Adds `p`'s traffic to this bucket's; the most connections become `peak` of the two.
    fn absorb(&mut self, p: &Point, peak: fn(u64, u64) -> u64) {
        self.fwd_bytes += p.fwd_bytes;
        self.rev_bytes += p.rev_bytes;
        self.fwd_packets += p.fwd_packets;
        self.rev_packets += p.rev_packets;
        self.new_connections += p.new_connections;
        self.drops += p.drops;
        self.max_active_connections = peak(self.max_active_connections, p.max_active_connections);
    }
}

/// Points of a finer granularity gathered into buckets of `granularity` seconds: traffic summed,
/// the most connections the largest seen in any of them.
pub fn roll_up(points: &[Point], granularity: u64) -> Vec<Point> {
    let mut out: Vec<Point> = Vec::new();
    for p in points {
        let ts = p.ts - p.ts % granularity;
        match out.last_mut() {
            Some(last) if last.ts == ts => last.absorb(p, u64::max),
            _ => out.push(Point { ts, ..p.clone() }),
        }
    }
    out
}

/// Another node's points for the same buckets added in: traffic summed, and the most connections
/// summed too (each node's peak in the bucket: at most the cluster's peak, never less than any
/// node's).
pub fn add(into: &mut Vec<Point>, other: &[Point]) {
    let mut by_ts: std::collections::BTreeMap<u64, Point> =
        into.drain(..).map(|p| (p.ts, p)).collect();
    for p in other {
        let q = by_ts.entry(p.ts).or_insert_with(|| Point {
            ts: p.ts,
            ..Point::default()
        });
        q.absorb(p, |a, b| a + b);
    }
    into.extend(by_ts.into_values());
}

/// CSV of points (RFC 4180, header first); with `compare`, the second period's points side by
/// side, aligned by position.
pub fn csv(points: &[Point], compare: Option<&[Point]>) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    let fields = [
        "ts",
        "fwd_bytes",
        "rev_bytes",
        "fwd_packets",
        "rev_packets",
        "new_connections",
        "drops",
        "max_active_connections",
    ];
    let mut header: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
    if compare.is_some() {
        header.extend(fields.iter().map(|f| format!("compare_{f}")));
    }
    let row = |p: &Point| {
        [
            p.ts,
            p.fwd_bytes,
            p.rev_bytes,
            p.fwd_packets,
            p.rev_packets,
            p.new_connections,
            p.drops,
            p.max_active_connections,
        ]
        .map(|v| v.to_string())
        .to_vec()
    };
    let _ = w.write_record(&header);
    let n = points.len().max(compare.map_or(0, <[Point]>::len));
    for i in 0..n {
        let mut r = points
            .get(i)
            .map(row)
            .unwrap_or_else(|| vec![String::new(); fields.len()]);
        if let Some(c) = compare {
            r.extend(
                c.get(i)
                    .map(row)
                    .unwrap_or_else(|| vec![String::new(); fields.len()]),
            );
        }
        let _ = w.write_record(&r);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(ts: u64, bytes: u64, active: u64) -> Point {
        Point {
            ts,
            fwd_bytes: bytes,
            rev_bytes: 2 * bytes,
            fwd_packets: 1,
            rev_packets: 1,
            new_connections: 1,
            drops: 0,
            max_active_connections: active,
        }
    }

    #[test]
    fn a_minute_is_six_ten_second_buckets_and_nodes_add_up() {
        let now = 1_800_000_000;
        let p = Period::parse("realtime", Some("1m"), now).unwrap();
        assert_eq!((p.granularity, p.stored().granularity), (60, 10));
        assert_eq!(p.granularity_name(), "1m");
        assert!(
            Period::parse("24h", Some("1m"), now).is_err(),
            "10 s points are kept an hour"
        );
        assert!(Period::parse("realtime", Some("5m"), now).is_err());
        let tens: Vec<Point> = (0..9).map(|i| pt(600 + i * 10, 100, i)).collect();
        let mins = roll_up(&tens, 60);
        assert_eq!(mins.len(), 2);
        assert_eq!(
            (mins[0].ts, mins[0].fwd_bytes, mins[0].rev_bytes),
            (600, 600, 1200)
        );
        assert_eq!(
            (mins[0].new_connections, mins[0].max_active_connections),
            (6, 5)
        );
        assert_eq!(
            (
                mins[1].ts,
                mins[1].fwd_bytes,
                mins[1].max_active_connections
            ),
            (660, 300, 8)
        );
        let mut a = vec![pt(600, 1, 2), pt(660, 1, 1)];
        add(&mut a, &[pt(660, 5, 3), pt(720, 7, 1)]);
        let got: Vec<(u64, u64, u64)> = a
            .iter()
            .map(|p| (p.ts, p.fwd_bytes, p.max_active_connections))
            .collect();
        assert_eq!(got, [(600, 1, 2), (660, 6, 4), (720, 7, 1)]);
    }

    #[test]
    fn a_comparison_starts_at_a_time_a_period_or_a_while_before() {
        let now = 1_800_000_000;
        let p = Period::parse("24h", None, now).unwrap();
        assert_eq!(p.compare_start("1799000000"), Ok(1_799_000_000));
        assert_eq!(p.compare_start("2026-11-23T10:00:00Z"), Ok(1_795_428_000));
        assert_eq!(p.compare_start("1799000000..1799086400"), Ok(1_799_000_000));
        assert_eq!(p.compare_start("24h"), Ok(p.from - 86_400));
        assert_eq!(p.compare_start("7d"), Ok(p.from - 7 * 86_400));
        for bad in ["realtime", "", "0s", "yesterday", "x..y"] {
            assert!(p.compare_start(bad).is_err(), "{bad}");
        }
    }
}
