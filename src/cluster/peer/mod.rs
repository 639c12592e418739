//! The node-to-node link (filled in by the peer-link work).
