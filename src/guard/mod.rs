//! The memory guard: knows the cgroup limit and the working set, keeps a live
//! budget of reservations, admits requests only when their estimated peak fits,
//! and hands freed memory back to the OS.
//!
//! It is a library: any tonic service can put [`AdmissionLayer`] in front of its
//! routes. memgate's binary wires it to the blob and payload services.

mod config;

pub use config::*;
