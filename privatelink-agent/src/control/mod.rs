//! The control plane: the PrivateLink model, its rules, a durable store and the REST API.
pub mod alloc;
pub mod api;
pub mod authlimit;
pub mod error;
pub mod etcd;
pub mod follow;
pub mod http;
pub mod local;
pub mod monitoring;
pub mod ops;
pub mod plane;
pub mod serve;
pub mod state;
pub mod store;
pub mod types;
pub mod validate;
