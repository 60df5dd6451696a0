//! Proof that the `privatelink` CLI installs on a laptop: it is built with only the `cli`
//! feature, on the stable toolchain, with bpf-linker and protoc hidden from PATH and the
//! environment, into a target directory of its own, and then run.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{output, run};

/// Tools the CLI must not need.
const HIDDEN: [&str; 2] = ["bpf-linker", "protoc"];

/// A directory of links to every program on PATH except [`HIDDEN`], in PATH order.
fn path_without_hidden(dir: &Path) -> Result<OsString> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let link = dir.join(&name);
            if HIDDEN.iter().any(|h| name == *h) || link.exists() {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(dir.as_os_str().to_owned())
}

pub fn check(root: &Path) -> Result<()> {
    let scratch = root.join("target/cli-alone");
    let path = path_without_hidden(&scratch.join("path"))?;
    for tool in HIDDEN {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .env("PATH", &path)
            .output()?;
        if found.status.success() {
            bail!("{tool} is still on the reduced PATH");
        }
    }
    let target: PathBuf = scratch.join("target");
    let toolchain = std::env::var("CLI_ALONE_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    run(Command::new("cargo")
        .current_dir(root)
        .env("PATH", &path)
        .env("RUSTUP_TOOLCHAIN", &toolchain)
        .env_remove("PROTOC")
        .env_remove("PROTOC_INCLUDE")
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "--locked",
            "--package",
            "privatelink-agent",
            "--bin",
            "privatelink",
            "--no-default-features",
            "--features",
            "cli",
        ]))?;
    let out = Command::new(target.join("debug/privatelink"))
        .arg("--help")
        .output()
        .context("running the CLI built alone")?;
    let help = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !help.contains("privatelink control-plane client") {
        bail!("the CLI built alone does not describe itself:\n{help}");
    }
    // What it linked: nothing of the node side (aya) nor of the stores (etcd, SQLite).
    let tree = output(
        Command::new("cargo")
            .current_dir(root)
            .env("PATH", &path)
            .env("RUSTUP_TOOLCHAIN", &toolchain)
            .args([
                "tree",
                "--package",
                "privatelink-agent",
                "--no-default-features",
                "--features",
                "cli",
                "--edges",
                "normal",
                "--prefix",
                "none",
            ]),
    )?;
    for heavy in ["aya ", "etcd-client", "rusqlite", "tonic"] {
        if tree.lines().any(|l| l.starts_with(heavy)) {
            bail!("the CLI alone depends on {heavy}:\n{tree}");
        }
    }
    eprintln!("the CLI builds and runs without bpf-linker, protoc or the node side");
    Ok(())
}
