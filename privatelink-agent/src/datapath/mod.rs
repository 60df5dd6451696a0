//! The datapath as the node drives it: loading the eBPF object and attaching it ([`loader`]),
//! pinning programs and maps so forwarding outlives the agent ([`pins`]), the model of one node
//! ([`model`]) compiled into exact map contents ([`compile`]) and written as differences
//! ([`maps`]), and reads of conntrack ([`batch`]).
pub mod batch;
pub mod compile;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod object;
pub mod pins;
pub mod scan;

pub use compile::{CompileError, MapState, compile};
pub use maps::{
    Dataplane, DataplaneError, FlowEventKey, FlowSync, FlowTables, FlowView, StatsReader,
};
pub use model::*;
