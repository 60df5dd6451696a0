//! Crash-test helper: commits security groups through the control plane in a loop and prints
//! `ack <revision> <id>` after each commit returns. The test kills it with SIGKILL at random.
use std::io::Write as _;

use privatelink_agent::control::{
    ops::{Caller, accounts, groups},
    plane::ControlPlane,
    store::SqliteStore,
};

fn main() {
    let db = std::env::args().nth(1).expect("usage: store_writer DB");
    let store = SqliteStore::open(std::path::Path::new(&db)).expect("open store");
    let plane = ControlPlane::open(Box::new(store), "admin").expect("load");
    if plane.read(|s| s.accounts.is_empty()) {
        let req = accounts::CreateAccount {
            id: "writer".into(),
            name: "writer".into(),
        };
        plane
            .mutate(&Caller::Admin, |s, cx| {
                accounts::create_account(s, cx, req, "t".into())
            })
            .expect("account");
    }
    let me = Caller::Account("writer".into());
    let mut out = std::io::stdout().lock();
    // Bounded: the test kills it long before this ends.
    for i in 0..100_000 {
        let req = groups::CreateGroup {
            name: format!("g{i}"),
            rules: Vec::new(),
            tags: Vec::new(),
        };
        let g = plane
            .mutate(&me, |s, cx| groups::create(s, cx, req))
            .expect("commit");
        writeln!(out, "ack {} {}", plane.revision(), g.id).expect("stdout");
        out.flush().expect("flush");
    }
}
