//! Memory and disk alarms, as RabbitMQ has them: above the memory high-watermark, or below the
//! free-disk limit, connections that publish are told `connection.blocked` and are not read
//! from until the alarm clears (`connection.unblocked`); consumers keep draining meanwhile.
//!
//! Memory is what the process has in use: the allocator's count of bytes in pages holding live
//! data when the binary registered a way to read it ([`set_memory_probe`]), resident memory otherwise. Resident
//! memory keeps what the allocator freed but has not given back, so an alarm read from it may
//! never clear after a burst of connections or messages is over.
//!
//! Free disk is checked on a timer, and also as the stores write: the flusher reports the bytes
//! of each round, and a check runs once half of the room left above the limit has been written,
//! so a fast publisher cannot fill the disk between two ticks.

use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// Which alarms are on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmState {
    pub memory: bool,
    pub disk: bool,
}

impl AlarmState {
    pub fn any(&self) -> bool {
        self.memory || self.disk
    }

    /// The reason `connection.blocked` gives, as RabbitMQ words it.
    pub fn reason(&self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory and disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// What the alarms last measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readings {
    pub memory_used: u64,
    pub memory_limit: u64,
    pub disk_free: u64,
    pub disk_free_limit: u64,
}

/// Checks of free disk space are never further apart than this many bytes written once the
/// room above the limit is small.
const DISK_CHECK_MIN_BYTES: u64 = 1024 * 1024;

pub struct Alarms {
    data_dir: PathBuf,
    memory_limit: AtomicU64,
    disk_free_limit: AtomicU64,
    state: watch::Sender<AlarmState>,
    readings: Mutex<Readings>,
    /// Bytes the stores have written since start.
    written: AtomicU64,
    /// When `written` reaches this, free disk is checked again.
    next_disk_check: AtomicU64,
    /// Checks come from the monitor and from the flusher: one at a time, so that an older
    /// reading never overwrites a newer one.
    checking: Mutex<()>,
    /// Reads free disk space instead of the data directory's file system (tests feed in
    /// what they want the disk to look like).
    free_disk_probe: Mutex<Option<FreeDiskProbe>>,
}

/// Reads the free disk space, in bytes.
pub type FreeDiskProbe = Box<dyn Fn() -> Option<u64> + Send + Sync>;

impl std::fmt::Debug for Alarms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alarms")
            .field("data_dir", &self.data_dir)
            .field("state", &self.state())
            .field("readings", &self.readings())
            .finish()
    }
}

/// The allocator's count of bytes in use, if the binary registered one.
static MEMORY_PROBE: OnceLock<fn() -> Option<u64>> = OnceLock::new();

/// Registers how to read the bytes the allocator has handed out and not had back (the binary
/// does, for the allocator it installs). Later registrations are ignored.
pub fn set_memory_probe(probe: fn() -> Option<u64>) {
    let _ = MEMORY_PROBE.set(probe);
}

/// The memory this process has in use, in bytes: the allocator's count when one is
/// registered, else resident memory.
pub fn memory_in_use() -> u64 {
    MEMORY_PROBE
        .get()
        .and_then(|probe| probe())
        .unwrap_or_else(resident_memory)
}

/// Resident memory of this process, in bytes.
pub fn resident_memory() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

/// The memory this process may use, in bytes (0 if unknown): the machine's, or the container's
/// cgroup limit when lower (in a Kubernetes pod the limit is what the OOM killer enforces).
pub fn total_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let machine = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let limit = cgroup_memory_limit(
        read("/sys/fs/cgroup/memory.max").as_deref(),
        read("/sys/fs/cgroup/memory/memory.limit_in_bytes").as_deref(),
    );
    match limit {
        Some(l) if machine == 0 || l < machine => l,
        _ => machine,
    }
}

/// The cgroup memory limit from cgroup v2's `memory.max` (`max` when unlimited) or v1's
/// `memory.limit_in_bytes` (a huge number when unlimited).
fn cgroup_memory_limit(v2: Option<&str>, v1: Option<&str>) -> Option<u64> {
    let parse = |s: &str| s.trim().parse::<u64>().ok().filter(|&n| n > 0);
    match v2 {
        Some(v) => parse(v),
        None => v1.and_then(parse).filter(|&n| n < (1 << 62)),
    }
}

/// Free space, in bytes, for unprivileged writers in the file system holding `path`.
pub fn free_disk(path: &std::path::Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

impl Alarms {
    pub fn new(data_dir: PathBuf, memory_limit: u64, disk_free_limit: u64) -> Arc<Self> {
        let (state, _) = watch::channel(AlarmState::default());
        Arc::new(Self {
            data_dir,
            memory_limit: AtomicU64::new(memory_limit),
            disk_free_limit: AtomicU64::new(disk_free_limit),
            state,
            readings: Mutex::new(Readings::default()),
            written: AtomicU64::new(0),
            next_disk_check: AtomicU64::new(0),
            checking: Mutex::new(()),
            free_disk_probe: Mutex::new(None),
        })
    }

    /// Reads free disk space with `probe` from now on, instead of from the file system.
    pub fn set_free_disk_probe(&self, probe: FreeDiskProbe) {
        *self.free_disk_probe.lock() = Some(probe);
        self.check();
    }

    /// Bytes the stores have written since start.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Counts bytes written to the data directory, checking free space again when enough
    /// were written since the last check for the disk to be near its limit.
    pub fn disk_written(&self, bytes: u64) {
        let total = self.written.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total >= self.next_disk_check.load(Ordering::Relaxed) {
            // Disk only: the writer is the flusher, and memory can wait for the timer.
            self.check_some(false);
        }
    }

    pub fn state(&self) -> AlarmState {
        *self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.state.subscribe()
    }

    pub fn readings(&self) -> Readings {
        *self.readings.lock()
    }

    pub fn set_memory_limit(&self, bytes: u64) {
        self.memory_limit.store(bytes, Ordering::Relaxed);
        self.check();
    }

    pub fn set_disk_free_limit(&self, bytes: u64) {
        self.disk_free_limit.store(bytes, Ordering::Relaxed);
        self.check();
    }

    /// Measures memory and disk and raises or clears the alarms.
    pub fn check(&self) {
        self.check_some(true);
    }

    /// Measures disk, and memory too with `memory` (else its last reading stands), and
    /// raises or clears the alarms.
    fn check_some(&self, memory: bool) {
        let _one = self.checking.lock();
        let memory_used = if memory {
            memory_in_use()
        } else {
            self.readings.lock().memory_used
        };
        let memory_limit = self.memory_limit.load(Ordering::Relaxed);
        let disk_free_limit = self.disk_free_limit.load(Ordering::Relaxed);
        let written = self.written.load(Ordering::Relaxed);
        let disk_free = match &*self.free_disk_probe.lock() {
            Some(probe) => probe(),
            None => free_disk(&self.data_dir),
        }
        .unwrap_or(u64::MAX);
        // Half the room left: the next check comes before the limit can be passed by much.
        let room = disk_free.saturating_sub(disk_free_limit) / 2;
        self.next_disk_check.store(
            written.saturating_add(room.max(DISK_CHECK_MIN_BYTES)),
            Ordering::Relaxed,
        );
        *self.readings.lock() = Readings {
            memory_used,
            memory_limit,
            disk_free,
            disk_free_limit,
        };
        let next = AlarmState {
            memory: memory_limit > 0 && memory_used > memory_limit,
            disk: disk_free < disk_free_limit,
        };
        let before = self.state();
        if next != before {
            if next.memory != before.memory {
                tracing::warn!(
                    alarm = next.memory,
                    used = memory_used,
                    limit = memory_limit,
                    "memory alarm"
                );
            }
            if next.disk != before.disk {
                tracing::warn!(
                    alarm = next.disk,
                    free = disk_free,
                    limit = disk_free_limit,
                    "disk alarm"
                );
            }
            self.state.send_replace(next);
        }
    }

    /// Checks every `period` until the returned task is dropped or aborted.
    pub fn spawn_monitor(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.check();
            }
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_container_limit_below_the_machine_is_the_memory_there_is() {
        assert_eq!(
            cgroup_memory_limit(Some("2147483648\n"), None),
            Some(2 << 30)
        );
        assert_eq!(cgroup_memory_limit(Some("max\n"), None), None);
        assert_eq!(
            cgroup_memory_limit(None, Some("1073741824\n")),
            Some(1 << 30)
        );
        assert_eq!(
            cgroup_memory_limit(None, Some("9223372036854771712\n")),
            None,
            "cgroup v1 says unlimited with a huge number"
        );
        assert_eq!(cgroup_memory_limit(None, None), None);
    }

    use super::*;

    #[test]
    fn readings_are_plausible() {
        assert!(resident_memory() > 1024 * 1024);
        assert!(total_memory() > resident_memory());
        assert!(free_disk(std::path::Path::new("/")).is_some());
    }

    #[test]
    fn limits_raise_and_clear_alarms() {
        let alarms = Alarms::new(std::env::temp_dir(), 0, 0);
        alarms.check();
        assert_eq!(alarms.state(), AlarmState::default());
        alarms.set_disk_free_limit(u64::MAX);
        assert_eq!(alarms.state().reason(), "low on disk");
        alarms.set_memory_limit(1);
        assert!(alarms.state().memory);
        alarms.set_memory_limit(0);
        alarms.set_disk_free_limit(0);
        assert!(!alarms.state().any());
    }
}
