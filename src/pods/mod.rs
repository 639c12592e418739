//! Agent pods on this node: discovery of their sockets (POD-LINK §1).
//!
//! [`Registry`] follows the shared socket directory (`{socket_dir}/{tenant}_{agent}`) with an
//! initial scan plus inotify, and answers "is there a pod for (tenant, agent)?" lock-free.
//! [`links`] is a shard's table of its links to pods (one per pod, multiplexing its sessions).

pub mod links;
pub mod registry;

pub use registry::{parse_pod_name, OnEvent, PodEvent, PodKey, Registry};
