//! Helpers shared by the benchmarks.

use anyhow::Context;

/// Returns the largest divisor of `seq_len` not above its square root: the first axial factor.
pub fn axial_rows(seq_len: usize) -> usize {
    (1..=seq_len.isqrt()).rev().find(|d| seq_len % d == 0).unwrap_or(1)
}

/// Returns this process's peak resident set size in MiB.
pub fn peak_rss_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("peak memory is read from /proc/self/status, which this system lacks (Linux only)")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("/proc/self/status has no VmHWM line")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("unreadable VmHWM line {line:?}"))?;
    Ok(kib / 1024.0)
}

/// Samples GPU memory with `nvidia-smi` while a measurement runs, because the peak resident
/// set covers only host memory. Vulkan processes are not always listed among compute
/// processes, so it reads the first GPU's `memory.used` and reports the peak above the value
/// at the start: correct when the measurement is the only GPU user, as in gpu-check.sh.
pub struct GpuMemorySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<f64>>,
}

impl GpuMemorySampler {
    /// Starts sampling every 100 ms when `device` is wgpu and `nvidia-smi` runs; `None`
    /// otherwise.
    pub fn start(device: &str) -> Option<Self> {
        if device != "wgpu" {
            return None;
        }
        let baseline = gpu_memory_used_mib()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = baseline;
            loop {
                if let Some(mib) = gpu_memory_used_mib() {
                    peak = peak.max(mib);
                }
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    return Some(peak - baseline);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        Some(Self { stop, thread })
    }

    /// Stops sampling and returns the peak GPU memory above the start, in MiB.
    pub fn finish(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().ok().flatten()
    }
}

/// Returns the first GPU's used memory in MiB, or `None` when `nvidia-smi` cannot run.
fn gpu_memory_used_mib() -> Option<f64> {
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).lines().next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axial_rows_factor_the_length() {
        assert_eq!(axial_rows(16384), 128);
        assert_eq!(axial_rows(65536), 256);
        assert_eq!(axial_rows(192), 12);
        assert_eq!(axial_rows(7), 1);
    }
}
