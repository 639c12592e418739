//! The session directory on Redis (filled in by the keeper work).
