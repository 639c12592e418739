//! Where threads may run: the process's allowed CPUs and confining a thread to a list.

use crate::sys;
use std::io;

/// The CPUs this process may run on (`sched_getaffinity`; honours a cgroup cpuset).
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    sys::allowed_cpus()
}

/// Restricts the calling thread to `cpus`; every thread it spawns from then on inherits that
/// mask. A daemon calls it on its main thread before starting anything, so that its helper
/// threads stay on the CPUs its shards are pinned to, as a Kubernetes cpuset would keep
/// them.
pub fn confine_current_thread(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty CPU list",
        ));
    }
    sys::set_affinity(cpus)
}
