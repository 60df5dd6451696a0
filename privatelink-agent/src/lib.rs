//! privatelink: the control plane, the node runtime, the datapath driver and the CLI.
//!
//! What gets deployed where (docs/ARCHITECTURE.md):
//! - [`control`]: the PrivateLink model, its rules, the store and the REST API. It runs in every
//!   API server (`privatelink-agent api`) and in every node agent, and imports nothing from
//!   the node side.
//! - [`node`]: the node runtime (`privatelink-agent run`) on each network node.
//! - [`datapath`]: loading the eBPF object, pins, and the map writer the node runtime drives.
//! - [`cli`]: the `privatelink` REST client, which builds on its own (feature `cli`).
//! - [`wire`]: the API's request bodies, shared by the server (`control`) and the CLI.
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "control")]
pub mod control;
#[cfg(feature = "node")]
pub mod datapath;
#[cfg(feature = "node")]
pub mod node;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
#[cfg(any(feature = "control", feature = "cli"))]
pub mod wire;
