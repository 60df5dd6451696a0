//! Turning the agent's model of the node into BPF map contents, and writing them.
pub mod batch;
pub mod compile;
pub mod maglev;
pub mod maps;
pub mod model;

pub use compile::{CompileError, MapState, compile};
pub use maps::{Dataplane, DataplaneError, FlowView, StatsReader};
pub use model::*;
