//! Built-in monitoring history (for users without a Prometheus server): every 10 s the agent
//! records each link's traffic since the last sample; samples roll up into hourly and daily
//! buckets as they arrive. Durable (SQLite next to the state) and bounded:
//!
//! | tier | granularity | kept | rows per object |
//! |---|---|---|---|
//! | realtime | 10 s | 1 hour | 360 |
//! | hourly | 1 h | 7 days | 168 |
//! | daily | 1 d | 30 days | 30 |
//!
//! so at most 558 rows (about 60 KiB) per endpoint or service.
use std::path::Path;

use rusqlite::{Connection, params};

pub use crate::control::monitoring::{Period, Point, TIERS};

/// Cumulative counters of one object at one moment (as the maps hold them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub fwd_bytes: u64,
    pub rev_bytes: u64,
    pub fwd_packets: u64,
    pub rev_packets: u64,
    pub new_conns: u64,
    pub drops: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("history store: creating the file: {0}")]
    Create(#[from] std::io::Error),
}

pub struct History {
    conn: Connection,
}

impl History {
    pub fn open(path: &Path) -> Result<Self, HistoryError> {
        crate::control::store::create_private(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS points (
                kind TEXT NOT NULL, id TEXT NOT NULL, granularity INTEGER NOT NULL, ts INTEGER NOT NULL,
                fwd_bytes INTEGER NOT NULL, rev_bytes INTEGER NOT NULL, fwd_packets INTEGER NOT NULL,
                rev_packets INTEGER NOT NULL, new_conns INTEGER NOT NULL, drops INTEGER NOT NULL,
                max_active INTEGER NOT NULL,
                PRIMARY KEY (kind, id, granularity, ts));
             CREATE TABLE IF NOT EXISTS cursors (
                kind TEXT NOT NULL, id TEXT NOT NULL,
                fwd_bytes INTEGER NOT NULL, rev_bytes INTEGER NOT NULL, fwd_packets INTEGER NOT NULL,
                rev_packets INTEGER NOT NULL, new_conns INTEGER NOT NULL, drops INTEGER NOT NULL,
                PRIMARY KEY (kind, id));",
        )?;
        Ok(History { conn })
    }

    /// Records a sample of cumulative counters (and live connections) for each object at `now`.
    /// The first sample of an object only sets its baseline.
    pub fn record(
        &mut self,
        now: u64,
        samples: &[(&str, &str, Counters, u64)],
    ) -> Result<(), HistoryError> {
        let tx = self.conn.transaction()?;
        for (kind, id, c, active) in samples {
            let last: Option<Counters> = tx
                .query_row(
                    "SELECT fwd_bytes, rev_bytes, fwd_packets, rev_packets, new_conns, drops FROM cursors WHERE kind = ?1 AND id = ?2",
                    params![kind, id],
                    |r| {
                        Ok(Counters {
                            fwd_bytes: r.get::<_, i64>(0)? as u64,
                            rev_bytes: r.get::<_, i64>(1)? as u64,
                            fwd_packets: r.get::<_, i64>(2)? as u64,
                            rev_packets: r.get::<_, i64>(3)? as u64,
                            new_conns: r.get::<_, i64>(4)? as u64,
                            drops: r.get::<_, i64>(5)? as u64,
                        })
                    },
                )
                .ok();
            tx.execute(
                "INSERT OR REPLACE INTO cursors VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    kind,
                    id,
                    c.fwd_bytes as i64,
                    c.rev_bytes as i64,
                    c.fwd_packets as i64,
                    c.rev_packets as i64,
                    c.new_conns as i64,
                    c.drops as i64
                ],
            )?;
            let Some(last) = last else { continue };
            // A counter that went backwards was reset (a reused link id): count from zero.
            let d = |now: u64, then: u64| if now >= then { now - then } else { now };
            let delta = [
                d(c.fwd_bytes, last.fwd_bytes),
                d(c.rev_bytes, last.rev_bytes),
                d(c.fwd_packets, last.fwd_packets),
                d(c.rev_packets, last.rev_packets),
                d(c.new_conns, last.new_conns),
                d(c.drops, last.drops),
            ];
            for (g, _) in TIERS {
                let ts = now - now % g;
                tx.execute(
                    "INSERT INTO points VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (kind, id, granularity, ts) DO UPDATE SET
                       fwd_bytes = fwd_bytes + excluded.fwd_bytes, rev_bytes = rev_bytes + excluded.rev_bytes,
                       fwd_packets = fwd_packets + excluded.fwd_packets, rev_packets = rev_packets + excluded.rev_packets,
                       new_conns = new_conns + excluded.new_conns, drops = drops + excluded.drops,
                       max_active = max(max_active, excluded.max_active)",
                    params![
                        kind,
                        id,
                        g as i64,
                        ts as i64,
                        delta[0] as i64,
                        delta[1] as i64,
                        delta[2] as i64,
                        delta[3] as i64,
                        delta[4] as i64,
                        delta[5] as i64,
                        *active as i64
                    ],
                )?;
            }
        }
        for (g, kept) in TIERS {
            tx.execute(
                "DELETE FROM points WHERE granularity = ?1 AND ts <= ?2",
                params![g as i64, now.saturating_sub(kept) as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets objects that no longer exist (their points age out by themselves).
    pub fn retain_cursors(
        &mut self,
        keep: &dyn Fn(&str, &str) -> bool,
    ) -> Result<(), HistoryError> {
        let all: Vec<(String, String)> = {
            let mut st = self.conn.prepare("SELECT kind, id FROM cursors")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        for (k, i) in all.iter().filter(|(k, i)| !keep(k, i)) {
            self.conn.execute(
                "DELETE FROM cursors WHERE kind = ?1 AND id = ?2",
                params![k, i],
            )?;
        }
        Ok(())
    }

    /// Points of one object over a period, one per bucket that has data (the bucket holding `to`,
    /// still filling, included).
    pub fn query(&self, kind: &str, id: &str, p: &Period) -> Result<Vec<Point>, HistoryError> {
        let mut st = self.conn.prepare(
            "SELECT ts, fwd_bytes, rev_bytes, fwd_packets, rev_packets, new_conns, drops, max_active FROM points
             WHERE kind = ?1 AND id = ?2 AND granularity = ?3 AND ts >= ?4 AND ts <= ?5 ORDER BY ts",
        )?;
        let from = p.from - p.from % p.granularity;
        let rows = st.query_map(
            params![kind, id, p.granularity as i64, from as i64, p.to as i64],
            |r| {
                Ok(Point {
                    ts: r.get::<_, i64>(0)? as u64,
                    fwd_bytes: r.get::<_, i64>(1)? as u64,
                    rev_bytes: r.get::<_, i64>(2)? as u64,
                    fwd_packets: r.get::<_, i64>(3)? as u64,
                    rev_packets: r.get::<_, i64>(4)? as u64,
                    new_connections: r.get::<_, i64>(5)? as u64,
                    drops: r.get::<_, i64>(6)? as u64,
                    max_active_connections: r.get::<_, i64>(7)? as u64,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::monitoring::csv;

    #[test]
    fn the_history_file_is_created_for_its_owner_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("pl-history-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("history.db");
        let _h = History::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn c(bytes: u64) -> Counters {
        Counters {
            fwd_bytes: bytes,
            rev_bytes: 2 * bytes,
            fwd_packets: bytes / 100,
            rev_packets: bytes / 100,
            new_conns: 1,
            drops: 0,
        }
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("plhist-{name}-{}.db", std::process::id()));
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", p.display()));
        }
        p
    }

    #[test]
    fn samples_roll_up_and_survive_a_reopen() {
        let path = temp("rollup");
        let t0 = 1_795_000_000 - 1_795_000_000 % 86_400; // a day boundary
        {
            let mut h = History::open(&path).unwrap();
            h.record(t0, &[("endpoint", "ep-1", c(0), 0)]).unwrap(); // baseline
            // 2 hours of samples every 10 s, 1000 bytes each interval, 3 live connections.
            for i in 1..=720u64 {
                h.record(t0 + i * 10, &[("endpoint", "ep-1", c(1000 * i), 3)])
                    .unwrap();
            }
        }
        let h = History::open(&path).unwrap();
        let now = t0 + 7200;
        let rt = h
            .query(
                "endpoint",
                "ep-1",
                &Period::parse("realtime", None, now).unwrap(),
            )
            .unwrap();
        assert_eq!(
            rt.len(),
            360,
            "the last hour at 10 s (older points were pruned)"
        );
        assert!(
            rt.iter().all(|p| p.fwd_bytes == 1000
                && p.rev_bytes == 2000
                && p.max_active_connections == 3)
        );
        let day = h
            .query(
                "endpoint",
                "ep-1",
                &Period::parse("24h", None, now).unwrap(),
            )
            .unwrap();
        assert_eq!(
            day.iter().map(|p| p.ts).collect::<Vec<_>>(),
            [t0, t0 + 3600, t0 + 7200]
        );
        assert_eq!(
            day[0].fwd_bytes,
            359 * 1000,
            "the first hour: 359 intervals (t0 was the baseline)"
        );
        assert_eq!(day[1].fwd_bytes, 360 * 1000);
        let d = h
            .query(
                "endpoint",
                "ep-1",
                &Period::parse(&format!("{t0}..{}", now + 1), Some("1d"), now).unwrap(),
            )
            .unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].fwd_bytes, 720 * 1000, "the day holds everything");
        assert_eq!(
            d[0].new_connections, 0,
            "new_conns did not change after the baseline"
        );
    }

    #[test]
    fn resets_and_bounds() {
        let path = temp("bounds");
        let mut h = History::open(&path).unwrap();
        let t = 1_795_000_000;
        h.record(t, &[("endpoint", "ep-1", c(5000), 0)]).unwrap();
        h.record(t + 10, &[("endpoint", "ep-1", c(200), 0)])
            .unwrap();
        let p = h
            .query(
                "endpoint",
                "ep-1",
                &Period::parse("realtime", None, t + 10).unwrap(),
            )
            .unwrap();
        assert_eq!(
            p[0].fwd_bytes, 200,
            "a counter that went backwards was reset: count from zero"
        );
        // Granularities are kept for their tier only; bad periods are refused clearly.
        assert!(
            Period::parse(&format!("{}..{}", t - 2 * 3600, t), Some("10s"), t)
                .unwrap_err()
                .contains("kept for 1 hour")
        );
        assert!(Period::parse("1w", None, t).is_err());
        assert!(
            Period::parse(&format!("{t}..{}", t - 1), None, t)
                .unwrap_err()
                .contains("before")
        );
        assert!(
            Period::parse(
                "2026-11-23T00:00:00Z..2026-11-23T06:00:00Z",
                Some("1h"),
                1_795_478_400
            )
            .is_ok()
        );
    }

    #[test]
    fn csv_round_trips_with_a_comparison() {
        let a = vec![
            Point {
                ts: 10,
                fwd_bytes: 1,
                ..Default::default()
            },
            Point {
                ts: 20,
                fwd_bytes: 2,
                ..Default::default()
            },
        ];
        let b = vec![Point {
            ts: 86_410,
            fwd_bytes: 7,
            ..Default::default()
        }];
        let text = csv(&a, Some(&b));
        let mut r = csv::Reader::from_reader(text.as_bytes());
        assert_eq!(r.headers().unwrap().len(), 16);
        let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(
            (&rows[0][0], &rows[0][1], &rows[0][8], &rows[0][9]),
            ("10", "1", "86410", "7")
        );
        assert_eq!(
            (&rows[1][1], &rows[1][8]),
            ("2", ""),
            "the shorter series leaves cells empty"
        );
    }
}
