//! `cargo xtask setup`: brings a fresh machine to the point where everything builds and every test
//! runs. Idempotent: each step checks first and prints one line with what it found or did.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use privatelink_common::toolchain::{BPF_LINKER_VERSION, EBPF_TOOLCHAIN};

use crate::cmd::{output, run};

/// Debian packages the tests and benchmarks use (the binary each provides, to check cheaply).
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iperf3",
    "nftables",
    "haproxy",
    "nginx-light",
    "socat",
    "redis-server",
    "redis-tools",
    "mariadb-server",
    "mariadb-client",
    "etcd-server",
    "etcd-client",
    "prometheus",
    "xdp-tools",
    "bpftool",
    "curl",
    "python3",
    "bind9-dnsutils",
    "dnsmasq-base",
    "protobuf-compiler",
    "libprotobuf-dev",
    "chromium",
    "chromium-driver",
    "tcpdump",
    "fonts-dejavu-core",
];

fn step(name: &str, what: impl std::fmt::Display) {
    println!("setup: {name:<12} {what}");
}

pub fn setup(with_packages: bool) -> Result<()> {
    ensure_rustup()?;
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()?;
    if with_packages {
        ensure_packages()?;
        ensure_schemathesis()?;
        ensure_proxy_tools()?;
    }
    Ok(())
}

/// The schemathesis release the API contract test runs (pinned: its checks change between
/// releases).
pub const SCHEMATHESIS: &str = "4.32.5";

/// Where setup puts the virtualenv with schemathesis (the contract test looks there too).
pub fn schemathesis_venv() -> PathBuf {
    cargo_home().join("privatelink/schemathesis")
}

/// A Python of at least 3.12 (schemathesis 4 crashes under this image's 3.11): one on PATH, or one
/// pyenv has installed, else the system's `python3`.
fn python() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = ["python3.13", "python3.12", "python3"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let pyenv = env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    if let Some(Ok(dir)) = pyenv.map(|p| fs::read_dir(p.join("versions"))) {
        let mut versions: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|v| v.join("bin/python3")));
    }
    let recent = |p: &PathBuf| {
        output(Command::new(p).args(["-c", "import sys, venv; print(sys.version_info >= (3, 12))"]))
            .is_ok_and(|o| o.trim() == "True")
    };
    if let Some(p) = candidates.iter().find(|p| recent(p)) {
        return Ok(p.clone());
    }
    step(
        "python",
        "no Python 3.12 or newer found: using python3 (schemathesis may not run)",
    );
    Ok(PathBuf::from("python3"))
}

fn ensure_schemathesis() -> Result<()> {
    let venv = schemathesis_venv();
    let bin = venv.join("bin/schemathesis");
    if output(Command::new(&bin).arg("--version")).is_ok_and(|v| v.contains(SCHEMATHESIS)) {
        step(
            "schemathesis",
            format!("{SCHEMATHESIS} in {}", venv.display()),
        );
        return Ok(());
    }
    let py = python()?;
    step(
        "schemathesis",
        format!(
            "installing {SCHEMATHESIS} into {} with {}",
            venv.display(),
            py.display()
        ),
    );
    let _ = fs::remove_dir_all(&venv);
    run(Command::new(&py).args(["-m", "venv"]).arg(&venv))
        .context("creating the schemathesis virtualenv (Debian: apt-get install python3-venv)")?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("schemathesis=={SCHEMATHESIS}")))
    .context("installing schemathesis from PyPI")?;
    step("schemathesis", format!("installed {}", bin.display()));
    Ok(())
}

/// Debian's release whose nginx and HAProxy read PROXY v2 TLVs into their logs (nginx 1.23.2's
/// `$proxy_protocol_tlv_*`, HAProxy 2.9's `fc_pp_tlv`); this machine's Debian 12 has nginx 1.22
/// and HAProxy 2.6.
pub const PROXY_TOOLS_SUITE: &str = "trixie";

/// The packages unpacked for them: the two servers and the libraries they load, HAProxy's C
/// library among them (it needs glibc 2.38; Debian 12 has 2.36).
const PROXY_TOOLS_PACKAGES: &[&str] = &[
    "nginx",
    "haproxy",
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "libcrypt1",
    "libpcre2-8-0",
    "libssl3t64",
    "libzstd1",
    "zlib1g",
    "libjemalloc2",
    "liblua5.4-0",
    "libopentracing-c-wrapper0t64",
    "libopentracing1",
];

/// Where setup unpacks them; `bin/nginx` and `bin/haproxy` there run them (the PROXY tests look
/// there too).
pub fn proxy_tools_dir() -> PathBuf {
    cargo_home().join("privatelink/proxy-tools")
}

/// nginx and HAProxy from [`PROXY_TOOLS_SUITE`], unpacked into [`proxy_tools_dir`] with their
/// libraries and run through that release's own loader: nothing is installed into the system,
/// whose packages stay Debian 12's.
fn ensure_proxy_tools() -> Result<()> {
    let dir = proxy_tools_dir();
    let bins = [dir.join("bin/nginx"), dir.join("bin/haproxy")];
    let versions = || -> Result<String> {
        // nginx prints its version on stderr.
        let nginx = Command::new(&bins[0]).arg("-v").output()?;
        if !nginx.status.success() {
            bail!("{} -v: {}", bins[0].display(), nginx.status);
        }
        let nginx = String::from_utf8_lossy(&nginx.stderr).into_owned();
        let haproxy = output(Command::new(&bins[1]).arg("-v"))?;
        Ok(format!(
            "{}, {}",
            nginx.trim(),
            haproxy.lines().next().unwrap_or("").trim()
        ))
    };
    if let Ok(v) = versions() {
        step("proxy-tools", format!("{v} in {}", dir.display()));
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "the PROXY protocol tests need nginx and HAProxy from Debian {PROXY_TOOLS_SUITE}: run `cargo xtask setup` as root"
        );
    }
    step(
        "proxy-tools",
        format!(
            "unpacking nginx and HAProxy from Debian {PROXY_TOOLS_SUITE} into {}",
            dir.display()
        ),
    );
    let _ = fs::remove_dir_all(&dir);
    let apt = dir.join("apt");
    let debs = dir.join("debs");
    let root = dir.join("root");
    for d in [
        apt.join("lists/partial"),
        apt.join("cache/archives/partial"),
        debs.clone(),
        root.clone(),
        dir.join("bin"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let sources = apt.join("debian.sources");
    fs::write(
        &sources,
        format!(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {PROXY_TOOLS_SUITE}\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    let apt_get = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.current_dir(&debs)
            .arg("-q")
            .arg(format!("-oDir::Etc::SourceList={}", sources.display()))
            .arg("-oDir::Etc::SourceParts=-")
            .arg(format!(
                "-oDir::State::Lists={}",
                apt.join("lists").display()
            ))
            .arg(format!("-oDir::Cache={}", apt.join("cache").display()))
            .arg("-oAPT::Get::List-Cleanup=0")
            .arg("-oAPT::Sandbox::User=root")
            .args(args);
        c
    };
    run(&mut apt_get(&["update"])).context("reading Debian's package lists")?;
    run(apt_get(&["download"]).args(PROXY_TOOLS_PACKAGES))
        .context("downloading nginx and HAProxy")?;
    for deb in fs::read_dir(&debs)?.flatten() {
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb.path())
            .arg(&root))
        .with_context(|| format!("unpacking {}", deb.path().display()))?;
    }
    let r = root.display();
    for (bin, exe) in bins.iter().zip(["nginx", "haproxy"]) {
        fs::write(
            bin,
            format!(
                "#!/bin/sh\n# {exe} from Debian {PROXY_TOOLS_SUITE}, on its own libraries (cargo xtask setup)\n\
                 exec {r}/usr/lib64/ld-linux-x86-64.so.2 --library-path {r}/usr/lib/x86_64-linux-gnu \
                 {r}/usr/sbin/{exe} \"$@\"\n"
            ),
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(bin, fs::Permissions::from_mode(0o755))?;
    }
    let _ = fs::remove_dir_all(&debs);
    let v = versions().context("running the unpacked nginx and HAProxy")?;
    step("proxy-tools", format!("installed {v}"));
    Ok(())
}

fn ensure_rustup() -> Result<()> {
    match output(Command::new("rustup").arg("--version")) {
        Ok(v) => {
            step("rustup", v.lines().next().unwrap_or("").trim());
            Ok(())
        }
        Err(_) => bail!(
            "rustup is missing: install it (https://rustup.rs, or Debian's `rustup` package) and run \
             `cargo xtask setup` again"
        ),
    }
}

fn sysroot() -> Result<PathBuf> {
    let out = output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .args(["--print", "sysroot"]),
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure_ebpf_toolchain() -> Result<()> {
    let have = output(Command::new("rustup").args(["toolchain", "list"]))?
        .lines()
        .any(|l| {
            l.starts_with(&format!("{EBPF_TOOLCHAIN}-"))
                || l.split_whitespace().next() == Some(EBPF_TOOLCHAIN)
        });
    if !have {
        step(
            "toolchain",
            format!("{EBPF_TOOLCHAIN} missing: installing with rustup"),
        );
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let version = output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .arg("--version"),
    )?;
    step(
        "toolchain",
        format!("eBPF toolchain `{EBPF_TOOLCHAIN}`: {}", version.trim()),
    );
    let lock = sysroot()?.join("lib/rustlib/src/rust/library/Cargo.lock");
    if lock.exists() {
        step("rust-src", "present");
    } else {
        step("rust-src", "missing: adding the component");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
    }
    Ok(())
}

/// The nightly's own libLLVM: (file name, LLVM major version).
fn nightly_llvm(sysroot: &Path) -> Result<(String, u32)> {
    let lib = sysroot.join("lib");
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // e.g. libLLVM.so.22.1-rust-1.97.0-nightly
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            let major = rest.split(['.', '-']).next().unwrap_or("");
            if let Ok(major) = major.parse() {
                return Ok((name, major));
            }
        }
    }
    bail!(
        "no libLLVM.so.<version> in {}: the {EBPF_TOOLCHAIN} toolchain looks incomplete",
        lib.display()
    )
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn ensure_bpf_linker() -> Result<()> {
    let sysroot = sysroot()?;
    let (llvm_file, major) = nightly_llvm(&sysroot)?;
    let llvm_path = sysroot.join("lib").join(&llvm_file);
    // What the installed bpf-linker was built against; it must match or it fails cryptically.
    let wanted = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm={}\n",
        llvm_path.display()
    );
    let state = cargo_home().join("privatelink");
    let stamp = state.join("bpf-linker.stamp");
    let linker = cargo_home().join("bin/bpf-linker");
    let runs = output(Command::new(&linker).arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION));
    let recorded = fs::read_to_string(&stamp).unwrap_or_default();
    if runs && recorded == wanted {
        step(
            "bpf-linker",
            format!("{BPF_LINKER_VERSION}, built against {llvm_file}"),
        );
        return Ok(());
    }
    let why = if !runs {
        "missing or not runnable".to_string()
    } else if recorded.is_empty() {
        "built against an unknown LLVM".to_string()
    } else {
        format!("stale (was {})", recorded.trim())
    };
    step(
        "bpf-linker",
        format!(
            "{why}: building {BPF_LINKER_VERSION} against {llvm_file} (LLVM {major}), a few minutes"
        ),
    );
    // bpf-linker links libLLVM dynamically and records this directory as its RUNPATH, so it lives
    // under CARGO_HOME (persistent), one directory per libLLVM file.
    let prefix = state.join("llvm").join(&llvm_file);
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", llvm_file.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_path, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm_path.display()))?;
    }
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]))
    .context("building bpf-linker against the nightly's libLLVM")?;
    fs::create_dir_all(&state)?;
    fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    step("bpf-linker", format!("installed {}", linker.display()));
    Ok(())
}

fn is_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|s| s.trim() == "install ok installed")
}

fn ensure_packages() -> Result<()> {
    if output(Command::new("dpkg-query").arg("--version")).is_err() {
        bail!(
            "no dpkg on this machine: install these packages with its package manager: {}",
            PACKAGES.join(" ")
        );
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        step("packages", format!("all {} present", PACKAGES.len()));
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "missing Debian packages: {}; as root run: apt-get update && apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step("packages", format!("installing {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
    .context("apt-get install")?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if !still.is_empty() {
        bail!("apt-get did not install: {}", still.join(" "));
    }
    step("packages", format!("installed {}", missing.len()));
    Ok(())
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0")
}
