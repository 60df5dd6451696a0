//! `privatelink-agent`: the node agent's command line.
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use privatelink_agent::datapath::loader::{Datapath, Sizes};

#[derive(Parser)]
#[command(version, about = "privatelink node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath into the kernel (verifier included) with default map sizes, report, unload.
    Check,
    /// Run the node: load and attach the datapath on the configured interfaces, serve the API, and
    /// keep the maps in sync with the control plane.
    Run {
        /// The node's agent.toml.
        #[arg(long, env = "PRIVATELINK_CONFIG")]
        config: std::path::PathBuf,
        /// Remove programs and pins on exit (by default forwarding continues without the agent).
        #[arg(long)]
        detach_on_exit: bool,
        #[command(flatten)]
        overrides: privatelink_agent::node::config::Overrides,
    },
    /// Hand this node's high-availability group to a peer after syncing its flows, and keep it
    /// standing by (for maintenance); `--undo` ends the drain.
    Drain {
        /// The node's agent.toml (its group, name and etcd).
        #[arg(long, env = "PRIVATELINK_CONFIG")]
        config: std::path::PathBuf,
        #[arg(long)]
        undo: bool,
    },
    /// Remove the programs, links and pinned maps of a node (forwarding stops).
    Detach {
        /// The bpffs directory the agent pinned under.
        #[arg(long, default_value = "/sys/fs/bpf/privatelink")]
        bpffs: std::path::PathBuf,
    },
    /// Serve the control-plane REST API (and /openapi.json) without a datapath.
    Api {
        /// Listen address (loopback by default).
        #[arg(long, env = "PRIVATELINK_API_LISTEN", default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// SQLite state file (created if missing).
        #[arg(
            long,
            env = "PRIVATELINK_STORE",
            default_value = "/var/lib/privatelink/state.db"
        )]
        store: std::path::PathBuf,
        /// File holding the admin token (at least 16 characters).
        #[arg(long, env = "PRIVATELINK_ADMIN_TOKEN_FILE")]
        admin_token_file: std::path::PathBuf,
        /// Region in service names and endpoint DNS names (the same on every node and API server).
        #[arg(long, env = "PRIVATELINK_REGION", default_value = "local-1")]
        region: String,
        /// Zone of generated endpoint DNS names.
        #[arg(
            long,
            env = "PRIVATELINK_DNS_ZONE",
            default_value = "privatelink.internal"
        )]
        dns_zone: String,
        /// etcd endpoints (http://host:port), comma-separated: the state lives there instead of
        /// the SQLite file.
        #[arg(long, env = "PRIVATELINK_ETCD", value_delimiter = ',')]
        etcd: Vec<String>,
        /// Key prefix in etcd.
        #[arg(long, env = "PRIVATELINK_ETCD_PREFIX", default_value = "/privatelink")]
        etcd_prefix: String,
        /// PEM certificate chain (leaf first): with --tls-key, the API is served over TLS.
        #[arg(long, env = "PRIVATELINK_API_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, env = "PRIVATELINK_API_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// Seconds a request's header (or TLS handshake) may take to arrive.
        #[arg(long, default_value_t = 10)]
        header_read_timeout_secs: u64,
        /// Seconds a request's body may take to arrive.
        #[arg(long, default_value_t = 10)]
        body_read_timeout_secs: u64,
        /// Seconds a connection may stay without a request before it is closed.
        #[arg(long, default_value_t = 60)]
        idle_timeout_secs: u64,
        /// Connections at once; more wait until one closes.
        #[arg(long, default_value_t = 4096)]
        max_connections: usize,
        /// Failed authentications a client address may have per minute before it is refused
        /// (429) for the rest of that minute; 0: no limit.
        #[arg(long, default_value_t = 20)]
        auth_failures_per_minute: u32,
    },
}

fn serve_api(
    serving: &privatelink_agent::control::serve::Serving,
    store: &privatelink_agent::node::config::StoreConfig,
    token_file: &std::path::Path,
    cluster: privatelink_agent::control::types::Cluster,
) -> Result<()> {
    use privatelink_agent::control::{api, plane::ControlPlane};
    let token = privatelink_agent::node::config::read_admin_token(token_file)?;
    let store_cfg = store;
    let store = store_cfg.open()?;
    let plane = std::sync::Arc::new(ControlPlane::open(store, &token)?.with_cluster(cluster));
    plane
        .auth_limiter()
        .set_max_failures(serving.auth_failures_per_minute);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (listener, tls) = serving.bind().await?;
        log::info!("state revision {}", plane.revision());
        // A shared store: follow what other servers commit, so reads are current too.
        let _follower = store_cfg.etcd().map(|e| {
            tokio::spawn(privatelink_agent::control::follow::follow_store(
                e,
                plane.clone(),
                Default::default(),
                None,
            ))
        });
        tokio::select! {
            r = api::serve_with(listener, plane.clone(), serving.limits.clone(), tls) => {
                r.context("serving the API")
            }
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(
        "info,hickory_server=warn,hickory_resolver=warn,hickory_net=warn,hickory_proto=warn",
    ))
    .init();
    match Cli::parse().command {
        Command::Check => {
            let mut dp = Datapath::load(&Sizes::default()).context("loading the datapath")?;
            let info = dp.program().info().context("reading program info")?;
            println!(
                "datapath loaded: program {} ({} bytes JITed), {} maps",
                info.name_as_str().unwrap_or("?"),
                info.size_jitted(),
                dp.ebpf.maps().count()
            );
            Ok(())
        }
        Command::Run {
            config,
            detach_on_exit,
            overrides,
        } => {
            let checked = privatelink_agent::node::config::load_with(&config, &overrides)?;
            use privatelink_agent::node::runtime::{OnExit, run};
            run(
                checked,
                if detach_on_exit {
                    OnExit::Detach
                } else {
                    OnExit::KeepForwarding
                },
            )
        }
        Command::Drain { config, undo } => {
            let checked = privatelink_agent::node::config::load(&config)?;
            let (Some(ha), Some(e)) = (checked.ha, checked.raw.store.etcd()) else {
                anyhow::bail!("{}: no [ha] group to drain", config.display());
            };
            privatelink_agent::node::ha::drain(&e, &ha.group.group, &ha.group.node, !undo)
        }
        Command::Detach { bpffs } => {
            if !bpffs.exists() {
                println!("nothing pinned under {}", bpffs.display());
                return Ok(());
            }
            let n = privatelink_agent::datapath::pins::Pins::prepare(&bpffs)?.remove_all()?;
            println!("removed {n} pins under {}", bpffs.display());
            Ok(())
        }
        Command::Api {
            listen,
            store,
            admin_token_file,
            region,
            dns_zone,
            etcd,
            etcd_prefix,
            tls_cert,
            tls_key,
            header_read_timeout_secs,
            body_read_timeout_secs,
            idle_timeout_secs,
            max_connections,
            auth_failures_per_minute,
        } => {
            let serving = privatelink_agent::node::config::ApiConfig {
                listen,
                tls_cert,
                tls_key,
                header_read_timeout_secs,
                body_read_timeout_secs,
                idle_timeout_secs,
                max_connections,
                auth_failures_per_minute,
                // Not a node: it reports nothing, so nothing to advertise.
                advertise: None,
            }
            .serving("api")?;
            let cluster = privatelink_agent::control::types::Cluster { region, dns_zone };
            privatelink_agent::node::config::check_cluster(&cluster)?;
            let store = privatelink_agent::node::config::StoreConfig {
                path: store,
                etcd,
                prefix: etcd_prefix,
                ..Default::default()
            };
            serve_api(&serving, &store, &admin_token_file, cluster)
        }
    }
}
