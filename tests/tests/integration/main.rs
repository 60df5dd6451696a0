//! Every integration test in one binary (one link of the whole agent instead of fifteen), a
//! module per area, as aya's integration tests are laid out. Kernel state (namespaces, pinned maps)
//! is shared, so `cargo xtask test` runs them one at a time.
mod acceptance;
mod agent;
mod api;
mod bench_programs;
mod cli;
mod connlog;
mod console;
mod contract;
mod datapath;
mod datapath6;
mod demo;
mod dns;
mod etcd;
mod families;
mod faults;
mod flowsync;
mod ha;
mod hardening;
mod malformed;
mod namespace;
mod nat_ports;
mod netns;
mod object;
mod proxy;
mod store_crash;
