//! Project tasks: `cargo xtask <setup|build-and-load|test|clippy|bench>`.
mod cmd;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::Result;
use clap::{Parser, Subcommand};
use privatelink_common::toolchain::EBPF_TOOLCHAIN;

use crate::cmd::run;

#[derive(Parser)]
#[command(about = "privatelink project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: nightly + rust-src, bpf-linker built against the
    /// nightly's LLVM, and (as root) the Debian packages tests and benchmarks use.
    Setup {
        /// Only the toolchain and bpf-linker, no Debian packages.
        #[arg(long)]
        no_packages: bool,
    },
    /// Build everything and run the agent: the embedded demo without arguments, or the given agent
    /// arguments (e.g. `-- run --config agent.toml`).
    BuildAndLoad {
        /// Arguments for the agent binary (default: `demo`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Every check and test: rustfmt, clippy (userspace and eBPF), unit, packet-fixture and namespace
    /// integration tests.
    Test {
        /// Passed to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Clippy on the userspace crates, then separately on the eBPF crate.
    Clippy,
    /// Datapath benchmarks (ratios to a floor program measured in the same run), map memory, a
    /// real-traffic cross-check, then privatelink against nftables, HAProxy and direct routing in
    /// alternating rounds; prints Markdown for docs/BENCHMARKS.md.
    Bench,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root());
    c
}

fn clippy() -> Result<()> {
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo()
        .current_dir(workspace_root().join("privatelink-ebpf"))
        .args([
            &format!("+{EBPF_TOOLCHAIN}"),
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--", "-D", "warnings"]))
}

fn test(args: &[String]) -> Result<()> {
    setup::setup(true)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    clippy()?;
    // The agent integration tests run the real binaries (privatelink-agent, privatelink).
    run(cargo().args(["build", "--package", "privatelink-agent", "--bins"]))?;
    // Kernel state (namespaces, pinned maps) is shared, so tests run one at a time.
    run(cargo()
        .args(["test", "--no-fail-fast", "--"])
        .arg("--test-threads=1")
        .args(args))
}

fn build_and_load(args: &[String]) -> Result<()> {
    setup::setup(true)?;
    run(cargo().args(["build", "--release", "--package", "privatelink-agent"]))?;
    let agent = workspace_root().join("target/release/privatelink-agent");
    let args: Vec<String> = if args.is_empty() {
        vec!["demo".into()]
    } else {
        args.to_vec()
    };
    run(Command::new(agent).args(&args))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { no_packages } => setup::setup(!no_packages),
        Task::BuildAndLoad { args } => build_and_load(&args),
        Task::Test { args } => test(&args),
        Task::Clippy => clippy(),
        Task::Bench => {
            setup::setup(true)?;
            for bin in ["bench", "compare"] {
                run(cargo().args([
                    "run",
                    "--release",
                    "--package",
                    "privatelink-tests",
                    "--bin",
                    bin,
                ]))?;
            }
            Ok(())
        }
    }
}
