//! The store survives SIGKILL at any moment: every acknowledged commit is there after reopening,
//! and the state is consistent (one group per revision after the account's).
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};
use privatelink_agent::control::store::{SqliteStore, Store as _};

#[test]
fn acknowledged_commits_survive_sigkill() {
    let db = std::env::temp_dir().join(format!("privatelink-crash-{}.db", std::process::id()));
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    let writer = env!("CARGO_BIN_EXE_store_writer");
    let mut acked: Vec<String> = Vec::new();
    let mut last_rev = 0u64;
    for round in 0..20u64 {
        let mut child = Command::new(writer)
            .arg(&db)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start writer");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // Kill after a varying number of acknowledgements (so some kills land mid-commit).
        let wanted = 1 + (round * 7) % 23;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = 0;
        while seen < wanted && Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            let mut parts = line.split_whitespace().skip(1);
            let rev: u64 = parts.next().and_then(|r| r.parse().ok()).expect("revision");
            assert!(rev > last_rev, "revisions increase: {rev} after {last_rev}");
            last_rev = rev;
            acked.push(parts.next().expect("id").to_string());
            seen += 1;
        }
        signal::kill(Pid::from_raw(child.id() as i32), signal::Signal::SIGKILL).expect("kill");
        child.wait().expect("reap");
        assert_eq!(
            seen, wanted,
            "round {round}: the writer stopped acknowledging"
        );

        let state = SqliteStore::open(&db)
            .expect("reopen after SIGKILL")
            .load()
            .expect("load");
        assert!(
            state.revision >= last_rev,
            "round {round}: revision {} < acknowledged {last_rev}",
            state.revision
        );
        for id in &acked {
            assert!(
                state.security_groups.contains_key(id),
                "round {round}: acknowledged {id} lost"
            );
        }
        // Revision 1 made the account and its token; every later revision made exactly one group.
        assert_eq!(state.accounts.len(), 1);
        assert_eq!(
            state
                .tokens
                .values()
                .filter(|t| state.accounts.contains_key(&t.account_id))
                .count(),
            state.tokens.len()
        );
        assert_eq!(
            state.security_groups.len() as u64,
            state.revision - 1,
            "round {round}: half-applied commit"
        );
        last_rev = state.revision;
    }
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
}
