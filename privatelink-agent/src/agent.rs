//! `privatelink-agent run`: load, attach, serve the API, and keep the maps in sync with the
//! control plane (on every revision, and periodically).
use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use aya::programs::xdp::XdpMode;

use crate::{
    config::Checked,
    control::{api, plane::ControlPlane, store::SqliteStore},
    dataplane::Dataplane,
    loader::Datapath,
    sync,
};

/// Applies the control plane's current state to the maps; logs and keeps the last good state on
/// refusal.
fn reconcile(
    plane: &ControlPlane,
    dataplane: &mut Dataplane,
    cfg: &Checked,
    last_skipped: &mut Vec<String>,
) {
    let state = plane.snapshot();
    let (model, skipped) = sync::model(&state, &cfg.node);
    if skipped != *last_skipped {
        for s in &skipped {
            log::warn!("sync: {s}");
        }
        *last_skipped = skipped;
    }
    match dataplane.apply(&model) {
        Ok(r) if r.writes > 0 || r.flows_cut > 0 => {
            log::info!(
                "sync: revision {}: {} map writes, {} flows cut",
                state.revision,
                r.writes,
                r.flows_cut
            )
        }
        Ok(_) => log::debug!("sync: revision {}: maps up to date", state.revision),
        Err(e) => log::error!(
            "sync: revision {} refused, maps keep the last good state: {e}",
            state.revision
        ),
    }
}

fn attach(dp: &mut Datapath, cfg: &Checked) -> Result<()> {
    for (name, &generic) in &cfg.attach {
        let prog = dp.program();
        if generic {
            prog.attach(name, XdpMode::Skb)
                .with_context(|| format!("attaching (generic) to {name}"))?;
            log::info!("attached to {name} in generic mode (asked for)");
            continue;
        }
        match prog.attach(name, XdpMode::Driver) {
            Ok(_) => log::info!("attached to {name} in native mode"),
            Err(e) => {
                log::warn!("native XDP on {name} failed ({e}); falling back to generic mode");
                prog.attach(name, XdpMode::Skb)
                    .with_context(|| format!("attaching (generic) to {name}"))?;
            }
        }
    }
    Ok(())
}

pub fn run(cfg: Checked) -> Result<()> {
    let store_path = &cfg.raw.store.path;
    if let Some(dir) = store_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("store.path: creating {}", dir.display()))?;
    }
    let store = SqliteStore::open(store_path)
        .with_context(|| format!("store.path: {}", store_path.display()))?;
    let plane = Arc::new(ControlPlane::open(Box::new(store), &cfg.admin_token)?);
    let mut dp = Datapath::load(&cfg.sizes).context("loading the datapath")?;
    let mut dataplane = Dataplane::new(&mut dp.ebpf)?;
    let mut skipped = Vec::new();
    reconcile(&plane, &mut dataplane, &cfg, &mut skipped);
    attach(&mut dp, &cfg)?;
    log::info!(
        "node {}: datapath on {} interfaces, state revision {}",
        cfg.raw.node,
        cfg.attach.len(),
        plane.revision()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.raw.api.listen)
            .await
            .with_context(|| format!("api.listen: binding {}", cfg.raw.api.listen))?;
        log::info!("control-plane API on http://{}", cfg.raw.api.listen);
        let server = tokio::spawn(api::serve(listener, plane.clone()));
        let mut revisions = plane.subscribe();
        let mut resync = tokio::time::interval(Duration::from_secs(cfg.raw.resync_interval));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                changed = revisions.changed() => {
                    if changed.is_err() { break; }
                    reconcile(&plane, &mut dataplane, &cfg, &mut skipped);
                }
                _ = resync.tick() => reconcile(&plane, &mut dataplane, &cfg, &mut skipped),
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        server.abort();
        log::info!(
            "stopping: the programs are detached with the agent (pinning is not in place yet)"
        );
        Ok(())
    })
}
