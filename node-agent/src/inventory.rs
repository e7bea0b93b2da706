//! What this host offers: CPUs, memory, disk and GPUs, detected for
//! enrolment and every heartbeat.
//!
//! GPUs come from `nvidia-smi` when it is installed (a host without it has
//! none as far as Keel is concerned); the model is normalised to a name
//! flavors can match (`NVIDIA A100-SXM4-80GB` → `nvidia-a100-sxm4-80gb`).

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The node's resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Logical CPUs available to this process.
    pub vcpus: u32,
    /// Total memory, in MiB.
    pub memory_mib: u64,
    /// The size of the file system that holds the state directory (and so
    /// the workloads' directories), in GiB. Its size, not its free space:
    /// the control plane reserves disk per allocation, and free space would
    /// count what workloads wrote twice.
    pub disk_gib: u64,
    /// The GPU model, if any.
    pub gpu_model: Option<String>,
    /// How many GPUs.
    pub gpu_count: u32,
}

/// How long `nvidia-smi` may take before the host counts as GPU-less.
const GPU_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Detects the capacity; `state_dir` is where workloads keep their files.
pub async fn detect(state_dir: &Path) -> Result<Capacity, String> {
    let vcpus = std::thread::available_parallelism()
        .map_err(|error| format!("CPU count: {error}"))?
        .get();
    let vcpus = u32::try_from(vcpus).unwrap_or(u32::MAX);
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|error| format!("/proc/meminfo: {error}"))?;
    let memory_mib = memory_total_mib(&meminfo).ok_or("/proc/meminfo has no MemTotal line")?;
    let disk_gib = disk_size_gib(state_dir);
    let (gpu_model, gpu_count) = gpus().await;
    Ok(Capacity {
        vcpus,
        memory_mib,
        disk_gib,
        gpu_model,
        gpu_count,
    })
}

/// `MemTotal` from the text of `/proc/meminfo`, converted from KiB to MiB.
pub fn memory_total_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib / 1024)
    })
}

/// The size of the file system of `dir` (or of its nearest existing
/// parent), GiB.
fn disk_size_gib(dir: &Path) -> u64 {
    let existing = dir
        .ancestors()
        .find(|ancestor| ancestor.exists())
        .unwrap_or(Path::new("/"));
    nix::sys::statvfs::statvfs(existing)
        .map(|stats| stats.blocks().saturating_mul(stats.fragment_size()) / (1024 * 1024 * 1024))
        .unwrap_or(0)
}

/// What `nvidia-smi` said last, and how many queries failed since.
type LastKnown = Option<((Option<String>, u32), u32)>;

/// The GPUs last listed by `nvidia-smi`: a query that fails or hangs (a
/// busy driver) repeats them rather than telling the control plane the host
/// lost its GPUs — for [`GPU_FAILURES_TOLERATED`] queries in a row; after
/// that the GPUs are taken to be gone. A fact of the host, so one per
/// process.
static LAST_KNOWN_GPUS: Mutex<LastKnown> = Mutex::new(None);

/// Failed queries in a row that still report the GPUs last seen (two
/// minutes of heartbeats).
const GPU_FAILURES_TOLERATED: u32 = 8;

/// The GPUs `nvidia-smi` lists: the (first) model and how many.
async fn gpus() -> (Option<String>, u32) {
    let query = tokio::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .kill_on_drop(true)
        .output();
    let answer = match tokio::time::timeout(GPU_QUERY_TIMEOUT, query).await {
        Ok(Ok(output)) if output.status.success() => {
            Some(parse_gpu_names(&String::from_utf8_lossy(&output.stdout)))
        }
        Ok(Ok(output)) => {
            tracing::warn!(status = %output.status, "nvidia-smi failed");
            None
        }
        // Not installed: no GPUs.
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => Some((None, 0)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not run nvidia-smi");
            None
        }
        Err(_) => {
            tracing::warn!("nvidia-smi did not answer in time");
            None
        }
    };
    remember_gpus(&LAST_KNOWN_GPUS, answer)
}

/// A fresh answer replaces what is remembered; without one, the last answer
/// stands for a while (none yet, or too many failures: no GPUs).
fn remember_gpus(
    last_known: &Mutex<LastKnown>,
    answer: Option<(Option<String>, u32)>,
) -> (Option<String>, u32) {
    let mut last_known = last_known.lock().unwrap_or_else(PoisonError::into_inner);
    match (answer, last_known.as_mut()) {
        (Some(answer), _) => {
            *last_known = Some((answer.clone(), 0));
            answer
        }
        (None, Some((kept, failures))) if *failures < GPU_FAILURES_TOLERATED => {
            *failures += 1;
            tracing::warn!(model = ?kept.0, count = kept.1, "keeping the GPUs last detected");
            kept.clone()
        }
        (None, _) => {
            tracing::warn!("GPUs cannot be queried: counting none");
            (None, 0)
        }
    }
}

/// One GPU name per line → the normalised model of the first and the count.
pub fn parse_gpu_names(text: &str) -> (Option<String>, u32) {
    let names: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let model = names.first().map(|name| {
        name.to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .split('-')
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("-")
            .chars()
            .take(64)
            .collect::<String>()
    });
    let count = u32::try_from(names.len()).unwrap_or(u32::MAX);
    match model {
        Some(model) if !model.is_empty() => (Some(model), count),
        _ => (None, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_the_memtotal_line_in_mib() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(memory_total_mib(meminfo), Some(24_000));
        assert_eq!(memory_total_mib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn gpu_names_are_normalised_and_counted() {
        assert_eq!(
            parse_gpu_names("NVIDIA A100-SXM4-80GB\nNVIDIA A100-SXM4-80GB\n"),
            (Some("nvidia-a100-sxm4-80gb".to_owned()), 2)
        );
        assert_eq!(parse_gpu_names(""), (None, 0));
        assert_eq!(
            parse_gpu_names("Tesla T4\n"),
            (Some("tesla-t4".to_owned()), 1)
        );
    }

    #[test]
    fn a_failed_gpu_query_keeps_the_gpus_last_detected() {
        let last_known = Mutex::new(None);
        assert_eq!(remember_gpus(&last_known, None), (None, 0));
        let a100 = (Some("nvidia-a100".to_owned()), 8);
        assert_eq!(remember_gpus(&last_known, Some(a100.clone())), a100);
        for _ in 0..GPU_FAILURES_TOLERATED {
            assert_eq!(remember_gpus(&last_known, None), a100);
        }
        assert_eq!(remember_gpus(&last_known, None), (None, 0), "gone for good");
        assert_eq!(remember_gpus(&last_known, Some(a100.clone())), a100);
        assert_eq!(remember_gpus(&last_known, None), a100);
        assert_eq!(remember_gpus(&last_known, Some((None, 0))), (None, 0));
    }

    #[tokio::test]
    async fn the_capacity_of_this_machine_is_detected() {
        let capacity = detect(&std::env::temp_dir()).await.unwrap();
        assert!(capacity.vcpus >= 1);
        assert!(capacity.memory_mib > 0);
        assert!(capacity.disk_gib > 0);
    }
}
