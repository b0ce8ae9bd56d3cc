//! `--writer-cpu`: the writers get one CPU to themselves; everything else (the leader's server
//! thread, the confirmer, the follower processes) runs on the others.
//!
//! On one machine the followers compete with the writer for CPU time, which they do not when
//! they run on other machines. With the writers alone on a CPU, what `append()` costs them is
//! ferry's own cost: its lock, the cache lines it shares with the sessions, its wake-ups.

use std::io;

/// CPUs a `cpu_set_t` can name.
const CPUS_MAX: usize = libc::CPU_SETSIZE as usize;

fn check(cpu: usize) -> io::Result<()> {
    if cpu >= CPUS_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond the {CPUS_MAX} a CPU set can name"),
        ));
    }
    Ok(())
}

fn current() -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; pid 0 is this thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

fn apply(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs in `set`.
fn members(set: &libc::cpu_set_t) -> Vec<usize> {
    (0..CPUS_MAX)
        // SAFETY: `c` is below CPU_SETSIZE, so the bit is inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, set) })
        .collect()
}

/// The CPUs this thread may run on.
pub fn allowed() -> io::Result<Vec<usize>> {
    Ok(members(&current()?))
}

/// Keeps this thread, and every thread and process it starts from now on, off `cpu`. Fails
/// when `cpu` is not one this process may run on, or is the only one.
pub fn keep_off(cpu: usize) -> anyhow::Result<()> {
    check(cpu)?;
    let mut set = current()?;
    let allowed = members(&set);
    if !allowed.contains(&cpu) {
        anyhow::bail!("--writer-cpu {cpu}: this process may only run on CPUs {allowed:?}");
    }
    if allowed.len() < 2 {
        anyhow::bail!("--writer-cpu needs at least 2 CPUs; this process may only use {allowed:?}");
    }
    // SAFETY: `check` kept `cpu` below CPU_SETSIZE, so the bit is inside `set`.
    unsafe { libc::CPU_CLR(cpu, &mut set) };
    apply(&set)?;
    Ok(())
}

/// Runs this thread on `cpu` only.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    check(cpu)?;
    // SAFETY: as in `current`: all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `check` kept `cpu` below CPU_SETSIZE, so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    apply(&set)
}
