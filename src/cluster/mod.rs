//! ClawRoam: a cluster of clawtermd nodes.
//!
//! * [`keeper`]: the session directory on Redis (nodes, sessions, fencing epochs, node
//!   ordinals for cluster-unique session ids), on a thread of its own — never on a shard.
//! * [`peer`]: the authenticated node-to-node link that carries hand-overs (and relay).
//!
//! See docs/CLUSTER.md.

pub mod keeper;
pub mod peer;
