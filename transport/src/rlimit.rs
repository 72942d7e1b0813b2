//! The process's limit on open files.
//!
//! Every connection a coordinator listener holds and every connection a
//! sandbox makes to its runner's token socket is a descriptor; the default
//! soft limit (1024 under systemd) is far below what the caps allow, and a
//! process out of descriptors cannot open its store or its sandboxes' files
//! either. Both raise the soft limit to what they need at start.

use std::io;

/// Raises this process's soft limit on open files towards `wanted` (never
/// above the hard limit, never lowering it); returns the soft limit now in
/// force. Each connection a listener holds is a descriptor, and a process
/// out of descriptors cannot open its store or artifacts either.
pub fn raise_open_files_limit(wanted: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // `rlim_t` is a u64 on the 64-bit Linux targets miren runs on.
    let (soft, hard): (u64, u64) = (lim.rlim_cur, lim.rlim_max);
    let target = wanted.min(hard);
    if target <= soft {
        return Ok(soft);
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}
