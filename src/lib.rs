//! memgate: a gRPC server for large payloads that streams every byte, knows its
//! cgroup memory limit and admits work only when the memory it needs fits.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod guard;
pub mod proto;
pub mod server;
pub mod store;
pub mod tls;
