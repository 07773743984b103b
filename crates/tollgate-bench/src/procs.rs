//! Contender processes: started pinned to a core, waited for, measured from `/proc`, and killed
//! (with everything they started) when dropped.

use anyhow::{bail, Context};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process the harness started; it and its descendants are killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `program args` pinned to `core` (`None`: anywhere), logging to `log`.
    pub fn start(
        name: &str,
        core: Option<usize>,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {log:?}"))?;
        let mut command = match core {
            Some(core) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(core.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {program:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }

    /// Stops the process (and its children) with SIGTERM, then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) {
        let pids = tree(self.pid());
        signal("TERM", &pids);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pids = tree(self.pid());
        signal("KILL", &pids);
        let _ = self.child.wait();
    }
}

fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// `pid` and all its descendants, found from each process's parent in `/proc/*/stat`.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(fields) = stat_fields(p) {
                if let Some(ppid) = fields.get(1).and_then(|f| f.parse::<u32>().ok()) {
                    parents.push((p, ppid));
                }
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found
}

/// The fields of `/proc/<pid>/stat` after the command name (so index 0 is the state, field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// Clock ticks a second, as `/proc` counts CPU time.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// CPU time (user + system) used so far by these processes and their descendants, in
/// microseconds.
pub fn cpu_micros(roots: &[u32], ticks_per_second: u64) -> u64 {
    let ticks: u64 = roots
        .iter()
        .flat_map(|root| tree(*root))
        .filter_map(stat_fields)
        // utime and stime are fields 14 and 15: indexes 11 and 12 after the name.
        .map(|f| {
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum();
    ticks * 1_000_000 / ticks_per_second.max(1)
}

/// Waits until these processes are quiet (at most one clock tick of CPU in a quarter of a
/// second), for at most `limit`; returns their CPU time then, as [`cpu_micros`]. Work that a
/// load run leaves behind (a queue of ledger writes still being committed) is part of what its
/// requests cost: without this it would be counted in whichever run came next, or in none.
pub async fn cpu_micros_when_quiet(roots: &[u32], ticks_per_second: u64, limit: Duration) -> u64 {
    let tick = 1_000_000 / ticks_per_second.max(1);
    let deadline = Instant::now() + limit;
    let mut last = cpu_micros(roots, ticks_per_second);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = cpu_micros(roots, ticks_per_second);
        if now.saturating_sub(last) <= tick || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Resident memory of these processes and their descendants, in KiB.
pub fn rss_kib(roots: &[u32]) -> u64 {
    roots
        .iter()
        .flat_map(|root| tree(*root))
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Waits until `url` answers with a success, or fails after `timeout`.
pub async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    proc: &mut Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_alive()?;
        if let Ok(response) = http.get(url).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not answer {url} within {timeout:?}", proc.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free loopback port (bound and released; the harness is the only one picking ports).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
