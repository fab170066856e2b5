//! The kernel's clock: its timestamps (`bpf_ktime_get_ns`) are CLOCK_MONOTONIC, nanoseconds
//! since boot.

use std::time::{Duration, SystemTime};

/// Now, on the clock of kernel timestamps.
pub fn now_ns() -> u64 {
    let since_boot = since_boot();
    since_boot.as_secs() * 1_000_000_000 + u64::from(since_boot.subsec_nanos())
}

/// Wall-clock time at boot, to place kernel timestamps in real time.
pub fn boot_time() -> SystemTime {
    SystemTime::now() - since_boot()
}

fn since_boot() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_time_moves_forward_and_boot_is_in_the_past() {
        let (a, b) = (now_ns(), now_ns());
        assert!(a > 0 && b >= a);
        assert!(boot_time() < SystemTime::now());
    }
}
