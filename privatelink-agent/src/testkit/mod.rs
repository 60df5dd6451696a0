//! Test support, not part of what ships: the embedded demo topology and network-namespace
//! helpers. Compiled for the crate's own unit tests and with the `testkit` feature (the tests
//! crate and the demo binary enable it).
pub mod demo;
pub mod netns;
