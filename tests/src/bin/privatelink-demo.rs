//! `privatelink-demo`: the embedded demo that `cargo xtask build-and-load` runs. A namespace
//! topology (two consumer networks with overlapping CIDRs, a provider with a real backend),
//! endpoints in both, real requests through the real agent, counters printed. Test support: it
//! lives beside the tests, not in what ships.
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "privatelink demo: overlapping consumer networks through one node"
)]
struct Cli {
    /// Exit after printing instead of forwarding until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Also write what the run did as JSON to this file (for programs and tests).
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(
        "info,hickory_server=warn,hickory_resolver=warn,hickory_net=warn,hickory_proto=warn",
    ))
    .init();
    let cli = Cli::parse();
    let report = privatelink_agent::testkit::demo::run(cli.once)?;
    if let Some(path) = cli.report {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
