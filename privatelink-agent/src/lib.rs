//! privatelink node agent.
pub mod dataplane;
pub mod loader;
pub mod object;
