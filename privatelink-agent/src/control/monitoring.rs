//! The monitoring vocabulary the API serves: the tiers a node keeps, periods to read, points and
//! their CSV form. The history store of a node runtime keeps the points; the API
//! reads them through [`super::local::NodeLocal`].
use serde::Serialize;

pub const TIERS: [(u64, u64); 3] = [(10, 3600), (3600, 7 * 86_400), (86_400, 30 * 86_400)];

/// One bucket of history: traffic within it, and the most connections seen live.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
            Some("1h") => Some(3600),
            Some("1d") => Some(86_400),
            Some(other) => return Err(format!("granularity {other:?}: use 10s, 1h or 1d")),
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
            .find(|t| t.0 == granularity)
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

    /// Seconds the period spans (never zero: parsing refuses FROM >= TO).
    pub fn duration_secs(&self) -> u64 {
        self.to - self.from
    }
}

fn granularity_name(g: u64) -> &'static str {
    match g {
        10 => "10s",
        3600 => "1h",
        _ => "1d",
    }
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
