//! privatelink node agent.
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod demo;
pub mod dns;
pub mod health;
pub mod history;
pub mod linkwatch;
pub mod loader;
pub mod metrics;
pub mod netns;
pub mod object;
pub mod pins;
pub mod sync;
