//! The memory guard: knows the cgroup limit and the working set, keeps a live
//! budget of reservations, admits requests only when their estimated peak fits,
//! and hands freed memory back to the OS.
//!
//! It is a library: any tonic service can put [`AdmissionLayer`] in front of its
//! routes. memgate's binary wires it to the blob and payload services.
//!
//! - [`discover`] and [`cgroup`]: where the limit and the working set come from;
//! - [`sampler`]: reads them every `poll_interval` and publishes a snapshot;
//! - [`budget`]: the admission rule, reservations, queue and pressure levels;
//! - [`layer`] and [`estimate`]: the tower layer and what each call needs;
//! - [`watch`]: cutting calls whose client stops sending or reading;
//! - [`reclaim`]: taking memory back from quiet calls while others wait;
//! - [`jemalloc`] and [`purge`]: handing freed memory back.

mod body;
pub mod budget;
pub mod cgroup;
mod config;
pub mod discover;
pub mod estimate;
mod fair;
mod handle;
pub mod jemalloc;
pub mod layer;
pub mod metered;
pub mod purge;
pub mod reclaim;
pub mod sampler;
pub mod watch;

pub use config::*;
pub use handle::{Guard, limits_for};
pub use layer::{AdmissionLayer, ClientKey, Reservation};
