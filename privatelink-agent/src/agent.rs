//! `privatelink-agent run`: load (reusing pinned maps), attach through pinned links, serve the API,
//! and keep the maps in sync with the control plane (on every revision, and periodically with a
//! full comparison that repairs drift).
use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use aya::programs::xdp::XdpMode;

use crate::{
    config::Checked,
    control::{api, plane::ControlPlane, store::SqliteStore},
    dataplane::Dataplane,
    loader::Datapath,
    pins::{Attached, Pins},
    sync,
};

/// Applies the control plane's current state to the maps. With `full`, the maps are first read
/// back and compared with what was written: differences are counted as drift and repaired. A
/// refused state is logged and the maps keep the last good state.
fn reconcile(
    plane: &ControlPlane,
    dataplane: &mut Dataplane,
    cfg: &Checked,
    last_skipped: &mut Vec<String>,
    full: bool,
) {
    let state = plane.snapshot();
    let (model, skipped) = sync::model(&state, &cfg.node);
    if skipped != *last_skipped {
        for s in &skipped {
            log::warn!("sync: {s}");
        }
        *last_skipped = skipped;
    }
    let result = if full {
        dataplane.resync(&model)
    } else {
        dataplane.apply(&model)
    };
    match result {
        Ok(r) if r.drift > 0 => log::warn!(
            "sync: revision {}: {} map entries had drifted from what the agent wrote; repaired with {} map writes",
            state.revision,
            r.drift,
            r.writes
        ),
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

fn attach(dp: &mut Datapath, pins: &Pins, cfg: &Checked) -> Result<()> {
    for (name, &generic) in &cfg.attach {
        let prog = dp.program();
        let how = if generic {
            pins.attach(prog, name, XdpMode::Skb)
                .with_context(|| format!("attaching (generic) to {name}"))?
        } else {
            match pins.attach(prog, name, XdpMode::Driver) {
                Ok(a) => a,
                Err(e) => {
                    log::warn!("native XDP on {name} failed ({e:#}); falling back to generic mode");
                    pins.attach(prog, name, XdpMode::Skb)
                        .with_context(|| format!("attaching (generic) to {name}"))?
                }
            }
        };
        match how {
            Attached::Replaced => {
                log::info!("{name}: replaced the running program through its pinned link")
            }
            Attached::New => log::info!(
                "{name}: attached ({})",
                if generic {
                    "generic, as asked"
                } else {
                    "native"
                }
            ),
        }
    }
    Ok(())
}

pub fn run(cfg: Checked, detach_on_exit: bool) -> Result<()> {
    let store_path = &cfg.raw.store.path;
    if let Some(dir) = store_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("store.path: creating {}", dir.display()))?;
    }
    let store = SqliteStore::open(store_path)
        .with_context(|| format!("store.path: {}", store_path.display()))?;
    let plane = Arc::new(ControlPlane::open(Box::new(store), &cfg.admin_token)?);
    let pins = Pins::prepare(&cfg.raw.bpffs)?;
    let mut dp = Datapath::load_pinned(&cfg.sizes, &pins).context("loading the datapath")?;
    let mut dataplane = Dataplane::new(&mut dp.ebpf)?;
    let flows = dataplane.flows().len();
    if flows > 0 || !dataplane.shadow().links.is_empty() {
        log::info!(
            "reusing pinned maps: {} links, {flows} conntrack entries",
            dataplane.shadow().links.len()
        );
    }
    let mut skipped = Vec::new();
    reconcile(&plane, &mut dataplane, &cfg, &mut skipped, false);
    attach(&mut dp, &pins, &cfg)?;
    for stale in pins.stale_maps() {
        log::warn!(
            "removing {} pinned by an agent with another map layout (its state is not reused)",
            stale.display()
        );
        std::fs::remove_file(&stale).ok();
    }
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
                    reconcile(&plane, &mut dataplane, &cfg, &mut skipped, false);
                }
                _ = resync.tick() => reconcile(&plane, &mut dataplane, &cfg, &mut skipped, true),
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        server.abort();
        Ok::<(), anyhow::Error>(())
    })?;
    if detach_on_exit {
        let n = pins.remove_all()?;
        log::info!("stopped and detached: {n} pins removed");
    } else {
        log::info!(
            "stopped; forwarding continues through the pinned programs and maps (`privatelink-agent detach` removes them)"
        );
    }
    Ok(())
}
