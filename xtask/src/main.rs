//! Project tasks: `cargo xtask <setup|build-and-load|test|clippy|bench>`.
mod cli_alone;
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
    /// Build and run: the embedded demo without arguments (or `-- demo [--once]`), else the agent
    /// with the given arguments (e.g. `-- run --config agent.toml`).
    BuildAndLoad {
        /// `demo [--once]` (the default), or arguments for the agent binary.
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
    /// Build the `privatelink` CLI alone (feature `cli`) with bpf-linker and protoc hidden.
    CliAlone,
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
            // The library, the agent's object and the benchmark object.
            "--lib",
            "--bins",
            "--features",
            "bench",
        ])
        .args(["--", "-D", "warnings"]))
}

fn test(args: &[String]) -> Result<()> {
    setup::setup(true)?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    clippy()?;
    // The control plane alone: it compiles without the node side (no import of it).
    run(cargo().args([
        "check",
        "--package",
        "privatelink-agent",
        "--lib",
        "--no-default-features",
        "--features",
        "control",
    ]))?;
    cli_alone::check(&workspace_root())?;
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
    // The demo is test support (the tests crate); anything else is the agent's command line.
    let (package, bin, args) = match args.split_first() {
        None => ("privatelink-tests", "privatelink-demo", args),
        Some((first, rest)) if first == "demo" => ("privatelink-tests", "privatelink-demo", rest),
        Some(_) => ("privatelink-agent", "privatelink-agent", args),
    };
    run(cargo().args(["build", "--release", "--package", package, "--bin", bin]))?;
    run(Command::new(workspace_root().join("target/release").join(bin)).args(args))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { no_packages } => setup::setup(!no_packages),
        Task::BuildAndLoad { args } => build_and_load(&args),
        Task::Test { args } => test(&args),
        Task::Clippy => clippy(),
        Task::CliAlone => cli_alone::check(&workspace_root()),
        Task::Bench => {
            setup::setup(true)?;
            // The failover benchmark runs the real agents.
            run(cargo().args([
                "build",
                "--release",
                "--package",
                "privatelink-agent",
                "--bins",
            ]))?;
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
