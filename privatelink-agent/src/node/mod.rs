//! The node runtime: what runs on each network node beside the datapath. Its configuration
//! ([`config`]), the pure function from control-plane state to the node's datapath model
//! ([`sync`]), link, route and neighbour events ([`netwatch`]), backend health checks ([`health`]), the DNS
//! server ([`dns`]), Prometheus metrics ([`metrics`]), monitoring history ([`history`]), and the
//! event loop that ties them together ([`runtime`]).
pub mod announce;
pub mod channel;
pub mod config;
pub mod connlog;
pub mod dns;
pub mod flowsync;
pub mod ha;
pub mod health;
pub mod history;
pub mod interfaces;
pub mod local;
pub mod metrics;
pub mod netlink;
pub mod netwatch;
pub mod runtime;
pub mod sync;
