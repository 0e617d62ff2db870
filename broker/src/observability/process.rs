//! The `process_*` metrics that Prometheus client libraries export under the same names, so the
//! dashboards and alerts written for any other process work here too: CPU time, resident and
//! virtual memory, open and allowed file descriptors, and the start time.
//!
//! They are read from `/proc/self` at each scrape (on the admin listener's blocking pool, beside
//! the walk of the data folder), not recorded: they are the kernel's numbers at that moment. Where
//! there is no `/proc` (not Linux) they are left out rather than shown as 0.

use std::fmt::Write as _;

/// What the kernel says about this process, at one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcessStats {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors (sockets included).
    pub open_fds: u64,
    /// The soft limit on open file descriptors (`nofile`); `None` when unlimited.
    pub max_fds: Option<u64>,
    /// When the process started, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Reads this process's numbers from `/proc/self`; `None` when they cannot be read.
pub(crate) fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot_time = boot_time_seconds(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    parse_stat(
        &stat,
        Kernel {
            clock_ticks_per_second: rustix::param::clock_ticks_per_second(),
            page_size: rustix::param::page_size() as u64,
            boot_time_seconds: boot_time,
        },
        open_fds,
        nofile.current,
    )
}

/// The units `/proc/self/stat` counts in, and the boot time its start time counts from.
#[derive(Debug, Clone, Copy)]
struct Kernel {
    clock_ticks_per_second: u64,
    page_size: u64,
    boot_time_seconds: u64,
}

/// The `btime` line of `/proc/stat`: when the machine booted, seconds since the epoch.
fn boot_time_seconds(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// Parses `/proc/self/stat` (see proc(5)). The second field, the command name in parentheses,
/// may itself hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(
    stat: &str,
    kernel: Kernel,
    open_fds: u64,
    max_fds: Option<u64>,
) -> Option<ProcessStats> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // proc(5) numbers fields from 1; `fields[0]` is field 3, the state.
    let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
    let ticks = kernel.clock_ticks_per_second.max(1) as f64;
    let (user, system) = (field(14)?, field(15)?);
    Some(ProcessStats {
        cpu_seconds: (user + system) as f64 / ticks,
        start_time_seconds: kernel.boot_time_seconds as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(kernel.page_size),
        open_fds,
        max_fds,
    })
}

impl ProcessStats {
    /// Appends the `process_*` families in the Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds",
            self.cpu_seconds,
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes",
            self.resident_bytes as f64,
        );
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes",
            self.virtual_bytes as f64,
        );
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors",
            self.open_fds as f64,
        );
        if let Some(max_fds) = self.max_fds {
            family(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors (the soft nofile limit)",
                max_fds as f64,
            );
        }
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch in seconds",
            self.start_time_seconds,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KERNEL: Kernel = Kernel {
        clock_ticks_per_second: 100,
        page_size: 4096,
        boot_time_seconds: 1_700_000_000,
    };

    #[test]
    fn observability_process_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // Fields 3..=24 after the name: utime 250 and stime 50 ticks, starttime 12345 ticks,
        // vsize 3133440 bytes, rss 383 pages.
        let stat = "12598 (sw (x) y) R 1 2 3 0 -1 4194304 99 0 0 0 250 50 0 0 20 0 1 0 12345 \
                    3133440 383 18446744073709551615 0 0";
        let stats = parse_stat(stat, KERNEL, 9, Some(1024)).unwrap();
        assert_eq!(stats.cpu_seconds, 3.0);
        assert!((stats.start_time_seconds - 1_700_000_123.45).abs() < 1e-6);
        assert_eq!(stats.virtual_bytes, 3_133_440);
        assert_eq!(stats.resident_bytes, 383 * 4096);
        assert_eq!((stats.open_fds, stats.max_fds), (9, Some(1024)));
        assert_eq!(parse_stat("12598 (cut) R 1 2", KERNEL, 9, None), None);
    }

    #[test]
    fn observability_boot_time_is_the_btime_line() {
        assert_eq!(
            boot_time_seconds("cpu 1 2 3\nbtime 1796670276\nprocesses 9\n"),
            Some(1_796_670_276)
        );
        assert_eq!(boot_time_seconds("cpu 1 2 3\n"), None);
    }

    #[test]
    fn observability_process_metrics_of_this_process_are_plausible() {
        let Some(stats) = read() else {
            return; // no /proc here
        };
        let mut out = String::new();
        stats.render(&mut out);
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(out.contains(name), "{name} missing from\n{out}");
        }
        assert!(stats.resident_bytes > 0 && stats.open_fds > 0, "{stats:?}");
        assert!(stats.virtual_bytes >= stats.resident_bytes, "{stats:?}");
    }
}
