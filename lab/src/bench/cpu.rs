//! Where a scenario's CPU goes: each process's own CPU time (herald's roles, the database
//! and broker servers, the SMTP sink, this harness) and the whole machine's busy time, read
//! from `/proc` before and after — so a throughput figure comes with the CPU it cost.

use serde_json::{json, Map, Value};

/// CPU seconds (user + system) a process has used so far.
pub fn seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The whole machine's busy CPU seconds so far (every core; idle, I/O wait and time
/// stolen by a hypervisor excluded).
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let jiffies: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user, nice, system, idle, iowait, irq, softirq (then steal and guest time).
    let total: f64 = jiffies.iter().take(7).sum();
    let idle = jiffies.get(3)? + jiffies.get(4)?;
    Some((total - idle) / 100.0)
}

/// The cores `/proc/stat` counts (the same machine its busy time covers).
fn machine_cores() -> usize {
    std::fs::read_to_string("/proc/stat")
        .map(|s| {
            s.lines()
                .filter(|l| {
                    l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                })
                .count()
        })
        .unwrap_or(0)
        .max(1)
}

/// The local process listening on TCP `port` (a server's, for its CPU time); `None` when
/// nothing local listens there or it cannot be seen.
pub fn listener(port: u16) -> Option<u32> {
    // The listening socket's inode, from the kernel's table (state 0A: LISTEN).
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening && on_port {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.to_string_lossy() == *i) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The port in a `mongodb://` or `amqp://` address (its first host's).
pub fn port_of(uri: &str) -> Option<u16> {
    uri.split("://")
        .nth(1)?
        .rsplit_once('@')
        .map_or_else(|| uri.split("://").nth(1), |(_, hosts)| Some(hosts))?
        .split(['/', '?', ','])
        .next()?
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
}

/// Processes watched over a span, and the machine's busy time at its start.
pub struct Meter {
    watched: Vec<(&'static str, u32, f64)>,
    machine: Option<f64>,
}

impl Meter {
    /// Starts the span for these processes (those whose pid is unknown are left out).
    pub fn start(processes: &[(&'static str, Option<u32>)]) -> Self {
        let watched = processes
            .iter()
            .filter_map(|(name, pid)| {
                let pid = (*pid)?;
                Some((*name, pid, seconds(pid)?))
            })
            .collect();
        Self {
            watched,
            machine: machine_busy_seconds(),
        }
    }

    /// The span's CPU per 1,000 units of work (`units` done in `secs`): per process, their
    /// sum, the machine's busy cores, and the rate the machine's cores would allow at that
    /// CPU cost (`cores` × 1,000 / CPU seconds per 1,000) — the CPU bound.
    pub fn per_1000(&self, units: usize, secs: f64) -> Budget {
        let per_1000 = |cpu: f64| cpu / units.max(1) as f64 * 1000.0;
        let mut processes = Map::new();
        let mut used = Vec::new();
        for (name, pid, before) in &self.watched {
            let Some(after) = seconds(*pid) else {
                continue;
            };
            used.push((*name, after - before));
            processes.insert((*name).to_owned(), json!(round2(per_1000(after - before))));
        }
        let watched_total: f64 = used.iter().map(|(_, s)| s).sum();
        let machine = self
            .machine
            .zip(machine_busy_seconds())
            .map(|(before, after)| after - before);
        let cores = machine_cores() as f64;
        // Unwatched processes (the kernel's own work, anything else running) count too.
        let all = machine.unwrap_or(watched_total).max(watched_total);
        Budget {
            used,
            processes,
            total_per_1000: per_1000(all),
            busy_cores: machine.map(|m| m / secs.max(1e-9)),
            cores,
        }
    }
}

/// One span's CPU account.
pub struct Budget {
    /// CPU seconds each watched process used over the span.
    used: Vec<(&'static str, f64)>,
    /// CPU seconds per 1,000 units, per watched process.
    pub processes: Map<String, Value>,
    /// The whole machine's busy CPU seconds per 1,000 units.
    pub total_per_1000: f64,
    /// Cores busy on average over the span.
    pub busy_cores: Option<f64>,
    pub cores: f64,
}

impl Budget {
    /// The CPU seconds process `name` used over the span (`None`: not seen).
    pub fn seconds(&self, name: &str) -> Option<f64> {
        self.used.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
    }

    /// Units per second the machine's cores allow at this CPU cost.
    pub fn bound_per_sec(&self) -> f64 {
        self.cores * 1000.0 / self.total_per_1000.max(1e-9)
    }

    pub fn line(&self) -> String {
        let parts: Vec<String> = self
            .processes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!(
            "CPU s per 1,000: {} (machine {:.2}); {} of {:.0} cores busy; the CPU allows {:.0}/s at this cost",
            parts.join(", "),
            self.total_per_1000,
            self.busy_cores
                .map_or("unseen".to_owned(), |b| format!("{b:.2}")),
            self.cores,
            self.bound_per_sec()
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "per_1000": self.processes,
            "machine_per_1000": round2(self.total_per_1000),
            "busy_cores": self.busy_cores.map(round2),
            "cores": self.cores,
            "bound_per_sec": self.bound_per_sec().round(),
        })
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_either_kind_of_address() {
        assert_eq!(
            port_of("mongodb://127.0.0.1:47017/?directConnection=true"),
            Some(47017)
        );
        assert_eq!(port_of("amqp://guest:guest@127.0.0.1:5672/%2f"), Some(5672));
        assert_eq!(port_of("mongodb://a:1,b:2/db"), Some(1));
        assert_eq!(port_of("mongodb://localhost/db"), None);
    }

    #[test]
    fn this_process_uses_cpu() {
        let me = std::process::id();
        let meter = Meter::start(&[("harness", Some(me)), ("gone", None)]);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let b = meter.per_1000(1000, 0.1);
        assert!(b.processes.contains_key("harness"));
        assert!(!b.processes.contains_key("gone"));
        assert!(b.seconds("harness").is_some() && b.seconds("gone").is_none());
    }
}
