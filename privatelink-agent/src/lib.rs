//! privatelink node agent.
pub mod cli;
pub mod control;
pub mod dataplane;
pub mod demo;
pub mod loader;
pub mod netns;
pub mod object;
