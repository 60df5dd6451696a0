//! `privatelink-agent`: the node agent's command line.
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use privatelink_agent::loader::{Datapath, Sizes};

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
    /// The embedded default: a namespace topology (two consumer networks with overlapping CIDRs, a
    /// provider with a real backend), endpoints in both, real requests through, counters printed.
    Demo {
        /// Exit after printing instead of forwarding until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
        Command::Demo { once } => privatelink_agent::demo::run(once),
    }
}
