//! GPU telemetry of a CUDA node: NVML utilisation and memory of the device the model runs on, as
//! `prism_node_gpu_*` gauges in the node's registry (the autoscaler's `targetGpuUtilization` reads
//! the utilisation).
//!
//! On CPU, or when NVML cannot be loaded, the series are absent rather than zero (a zero would read
//! as an idle GPU and scale the node down); the reason is logged once at info. Nothing here can
//! fail the server. NVML is loaded at run time (`libnvidia-ml.so.1`, mounted by the NVIDIA
//! container runtime), so CPU builds carry the code but never load a library.
//!
//! [`GpuSource`] is the boundary: [`NvmlSource`] reads the hardware; tests feed fake samples to the
//! same gauges.

use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};

use crate::metrics::Metrics;

/// NVML averages utilisation over 1/6 s to 1 s depending on the GPU; a few seconds between reads
/// is plenty for an autoscaler that averages over its windows and costs nothing measurable.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

const LABELS: [&str; 4] = ["node", "modality", "device", "uuid"];

/// One reading of one GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSample {
    /// NVML index (the `device` label; what `nvidia-smi` shows).
    pub index: u32,
    /// `GPU-…` (or `MIG-…`) UUID: stable across reboots and index reshuffles.
    pub uuid: String,
    /// Fraction of the last sample period a kernel ran, 0..1.
    pub utilization_ratio: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML could not be loaded or initialised (no NVIDIA driver or libnvidia-ml.so.1 in this container?): {0}")]
    Init(#[source] NvmlError),
    #[error("NVML device {device}: {what}: {source}")]
    Query {
        device: String,
        what: &'static str,
        #[source]
        source: NvmlError,
    },
    #[error("GPU sampler stopped: {0}")]
    Sampler(String),
}

/// Where samples come from: NVML on a GPU machine, a fake in tests.
pub trait GpuSource: Send + Sync + 'static {
    /// The current reading of every device the server uses.
    fn sample(&self) -> Result<Vec<GpuSample>, GpuError>;
}

/// Which NVML device a CUDA ordinal is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRef {
    Index(u32),
    Uuid(String),
}

impl std::fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceRef::Index(i) => write!(f, "index {i}"),
            DeviceRef::Uuid(u) => write!(f, "uuid {u}"),
        }
    }
}

/// The NVML device behind CUDA ordinal 0 (the one candle serves on), from `CUDA_VISIBLE_DEVICES`.
/// NVML ignores that variable, so without this a process pinned to GPU 3 would report GPU 0.
/// With several GPUs visible and no pinning, CUDA and NVML agree on numbering only under
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`; the operator's pods see one GPU, where both agree.
pub fn cuda_device_0(cuda_visible_devices: Option<&str>) -> DeviceRef {
    let first = cuda_visible_devices.and_then(|v| v.split(',').next()).map(str::trim).unwrap_or("");
    if let Ok(i) = first.parse::<u32>() {
        DeviceRef::Index(i)
    } else if first.starts_with("GPU-") || first.starts_with("MIG-") {
        DeviceRef::Uuid(first.to_string())
    } else {
        DeviceRef::Index(0)
    }
}

/// NVML's integer percent as a ratio, clamped to 0..1.
pub fn ratio_from_percent(percent: u32) -> f64 {
    f64::from(percent.min(100)) / 100.0
}

/// Reads one device through NVML.
pub struct NvmlSource {
    nvml: Nvml,
    device: DeviceRef,
}

impl NvmlSource {
    /// Loads NVML. `libnvidia-ml.so.1` first: the NVIDIA container runtime mounts only the
    /// versioned name, while the unversioned one (NVML's default) exists only with driver dev files.
    pub fn open(device: DeviceRef) -> Result<Self, GpuError> {
        let nvml = match Nvml::builder().lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1")).init() {
            Ok(n) => n,
            Err(_) => Nvml::init().map_err(GpuError::Init)?,
        };
        let src = Self { nvml, device };
        // Fail here, where the caller logs "telemetry off", rather than warn on every sample.
        src.sample()?;
        Ok(src)
    }
}

impl GpuSource for NvmlSource {
    fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
        let err = |what: &'static str| {
            let device = self.device.to_string();
            move |source| GpuError::Query { device, what, source }
        };
        let dev = match &self.device {
            DeviceRef::Index(i) => self.nvml.device_by_index(*i),
            DeviceRef::Uuid(u) => self.nvml.device_by_uuid(u.as_str()),
        }
        .map_err(err("lookup"))?;
        let util = dev.utilization_rates().map_err(err("utilization"))?;
        let mem = dev.memory_info().map_err(err("memory"))?;
        Ok(vec![GpuSample {
            index: dev.index().map_err(err("index"))?,
            uuid: dev.uuid().map_err(err("uuid"))?,
            utilization_ratio: ratio_from_percent(util.gpu),
            memory_used_bytes: mem.used,
            memory_total_bytes: mem.total,
        }])
    }
}

/// The three gauge families. Registered only once telemetry is on, so a CPU node's `/metrics`
/// has no `prism_node_gpu_` line at all.
pub struct GpuGauges {
    utilization: GaugeVec,
    memory_used: IntGaugeVec,
    memory_total: IntGaugeVec,
    node: String,
    modality: String,
    /// (device, uuid) of the series set by the last [`GpuGauges::apply`], to drop vanished ones.
    current: Vec<(String, String)>,
}

impl GpuGauges {
    pub fn register(registry: &Registry, node: &str, modality: &str) -> Result<Self, prometheus::Error> {
        let utilization = GaugeVec::new(
            Opts::new(
                "prism_node_gpu_utilization_ratio",
                "Fraction of the last NVML sample period a kernel ran on the GPU (0..1); CUDA nodes only",
            ),
            &LABELS,
        )?;
        let memory_used = IntGaugeVec::new(
            Opts::new("prism_node_gpu_memory_used_bytes", "GPU memory in use (all processes); CUDA nodes only"),
            &LABELS,
        )?;
        let memory_total = IntGaugeVec::new(
            Opts::new("prism_node_gpu_memory_total_bytes", "GPU memory installed; CUDA nodes only"),
            &LABELS,
        )?;
        registry.register(Box::new(utilization.clone()))?;
        registry.register(Box::new(memory_used.clone()))?;
        registry.register(Box::new(memory_total.clone()))?;
        Ok(Self {
            utilization,
            memory_used,
            memory_total,
            node: node.to_string(),
            modality: modality.to_string(),
            current: Vec::new(),
        })
    }

    /// Publishes one round of samples; devices missing from it (or all, on `&[]` after a failed
    /// read) lose their series instead of keeping stale values.
    pub fn apply(&mut self, samples: &[GpuSample]) {
        let next: Vec<(String, String)> = samples.iter().map(|s| (s.index.to_string(), s.uuid.clone())).collect();
        for (dev, uuid) in self.current.iter().filter(|k| !next.contains(k)) {
            let l = [self.node.as_str(), self.modality.as_str(), dev.as_str(), uuid.as_str()];
            let _ = self.utilization.remove_label_values(&l);
            let _ = self.memory_used.remove_label_values(&l);
            let _ = self.memory_total.remove_label_values(&l);
        }
        for (s, (dev, uuid)) in samples.iter().zip(&next) {
            let l = [self.node.as_str(), self.modality.as_str(), dev.as_str(), uuid.as_str()];
            self.utilization.with_label_values(&l).set(s.utilization_ratio.clamp(0.0, 1.0));
            self.memory_used.with_label_values(&l).set(i64::try_from(s.memory_used_bytes).unwrap_or(i64::MAX));
            self.memory_total.with_label_values(&l).set(i64::try_from(s.memory_total_bytes).unwrap_or(i64::MAX));
        }
        self.current = next;
    }
}

/// Turns telemetry on for a model loaded on `device` (`ModelInfo::device`: `cpu`, `cuda:0`, ...),
/// or logs once why it stays off. Needs a tokio runtime; never fails the server.
pub fn start(metrics: &Metrics, device: &str) -> Option<tokio::task::JoinHandle<()>> {
    if !device.starts_with("cuda") {
        tracing::info!(device, "GPU telemetry off: the model runs on {device}, not CUDA (no prism_node_gpu_* series)");
        return None;
    }
    let target = cuda_device_0(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref());
    let source = match NvmlSource::open(target) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, "GPU telemetry off: NVML unavailable (no prism_node_gpu_* series)");
            return None;
        }
    };
    match start_with(metrics, Arc::new(source), SAMPLE_INTERVAL) {
        Ok(h) => {
            tracing::info!(device, "GPU telemetry on: prism_node_gpu_* sampled from NVML every {SAMPLE_INTERVAL:?}");
            Some(h)
        }
        Err(e) => {
            tracing::info!(error = %e, "GPU telemetry off: registering its series failed");
            None
        }
    }
}

/// Registers the gauges and samples `source` every `every` (the first read at once). A failed read
/// removes the series until a read succeeds again; each transition is logged once.
pub fn start_with(
    metrics: &Metrics,
    source: Arc<dyn GpuSource>,
    every: Duration,
) -> Result<tokio::task::JoinHandle<()>, prometheus::Error> {
    let [node, modality] = metrics.label_values();
    let mut gauges = GpuGauges::register(metrics.registry(), node, modality)?;
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut failing = false;
        loop {
            tick.tick().await;
            let src = source.clone();
            // NVML calls block (briefly, in the driver): keep them off the async workers.
            let read = tokio::task::spawn_blocking(move || src.sample())
                .await
                .unwrap_or_else(|e| Err(GpuError::Sampler(e.to_string())));
            match read {
                Ok(samples) => {
                    if failing {
                        tracing::info!("GPU telemetry: NVML reads succeed again");
                    }
                    failing = false;
                    gauges.apply(&samples);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "GPU telemetry: NVML read failed; prism_node_gpu_* removed until it recovers");
                    }
                    failing = true;
                    gauges.apply(&[]);
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Fake GPU: returns whatever the test last put in, no hardware involved.
    struct FakeGpuSource(Mutex<Option<Vec<GpuSample>>>);

    impl GpuSource for FakeGpuSource {
        fn sample(&self) -> Result<Vec<GpuSample>, GpuError> {
            self.0
                .lock()
                .map_err(|e| GpuError::Sampler(e.to_string()))?
                .clone()
                .ok_or_else(|| GpuError::Sampler("fake GPU set to fail".into()))
        }
    }

    fn fake_sample(index: u32, util: f64) -> GpuSample {
        GpuSample {
            index,
            uuid: format!("GPU-fake-{index}"),
            utilization_ratio: util,
            memory_used_bytes: 3 << 30,
            memory_total_bytes: 80 << 30,
        }
    }

    fn gpu_lines(m: &Metrics) -> Vec<String> {
        m.render().lines().filter(|l| l.contains("prism_node_gpu_")).map(str::to_string).collect()
    }

    #[test]
    fn no_telemetry_means_no_gpu_lines_at_all() {
        let m = Metrics::new("n1", "text").unwrap();
        assert!(start(&m, "cpu").is_none());
        assert!(gpu_lines(&m).is_empty(), "{:?}", gpu_lines(&m));
        assert!(m.render().contains("prism_node_inflight"));
    }

    #[test]
    fn registered_but_unsampled_gauges_render_nothing() {
        let m = Metrics::new("n1", "text").unwrap();
        let _g = GpuGauges::register(m.registry(), "n1", "text").unwrap();
        assert!(gpu_lines(&m).is_empty(), "{:?}", gpu_lines(&m));
    }

    #[test]
    fn samples_render_with_node_device_and_uuid_labels() {
        let m = Metrics::new("n1", "vision").unwrap();
        let mut g = GpuGauges::register(m.registry(), "n1", "vision").unwrap();
        g.apply(&[fake_sample(0, 0.42), fake_sample(3, 1.7)]);
        let text = m.render();
        let labels0 = r#"{device="0",modality="vision",node="n1",uuid="GPU-fake-0"}"#;
        assert!(text.contains(&format!("prism_node_gpu_utilization_ratio{labels0} 0.42")), "{text}");
        assert!(text.contains(&format!("prism_node_gpu_memory_used_bytes{labels0} 3221225472")), "{text}");
        assert!(text.contains(&format!("prism_node_gpu_memory_total_bytes{labels0} 85899345920")), "{text}");
        let labels3 = r#"{device="3",modality="vision",node="n1",uuid="GPU-fake-3"}"#;
        assert!(text.contains(&format!("prism_node_gpu_utilization_ratio{labels3} 1")), "clamped to 1: {text}");
        assert!(text.contains("# TYPE prism_node_gpu_utilization_ratio gauge"), "{text}");
        // A device that vanishes (or a failed read) drops its series rather than keeping stale values.
        g.apply(&[fake_sample(3, 0.5)]);
        let text = m.render();
        assert!(!text.contains("GPU-fake-0"), "{text}");
        assert!(text.contains(&format!("prism_node_gpu_utilization_ratio{labels3} 0.5")), "{text}");
        g.apply(&[]);
        assert!(gpu_lines(&m).is_empty(), "{:?}", gpu_lines(&m));
    }

    #[test]
    fn cuda_visible_devices_picks_the_nvml_device() {
        assert_eq!(cuda_device_0(None), DeviceRef::Index(0));
        assert_eq!(cuda_device_0(Some("")), DeviceRef::Index(0));
        assert_eq!(cuda_device_0(Some("3,1")), DeviceRef::Index(3));
        assert_eq!(cuda_device_0(Some(" GPU-8d1c-aa ,2")), DeviceRef::Uuid("GPU-8d1c-aa".into()));
        assert_eq!(cuda_device_0(Some("MIG-1234")), DeviceRef::Uuid("MIG-1234".into()));
        assert_eq!(ratio_from_percent(37), 0.37);
        assert_eq!(ratio_from_percent(250), 1.0);
    }

    #[test]
    fn a_machine_without_nvml_gets_an_error_not_a_panic() {
        // On a GPU machine this opens; elsewhere (CI) it must come back as a typed error.
        if let Err(e) = NvmlSource::open(DeviceRef::Index(0)) {
            assert!(e.to_string().contains("NVML"), "{e}");
        }
    }

    #[tokio::test]
    async fn the_sampler_publishes_and_withdraws_with_the_source() {
        let m = Metrics::new("n1", "text").unwrap();
        let fake = Arc::new(FakeGpuSource(Mutex::new(Some(vec![fake_sample(0, 0.25)]))));
        let task = start_with(&m, fake.clone(), Duration::from_millis(20)).unwrap();
        let wait_for = |want: bool| {
            let m = m.clone();
            async move {
                for _ in 0..200 {
                    if m.render().contains("prism_node_gpu_utilization_ratio{") == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("GPU series present != {want}: {}", m.render());
            }
        };
        wait_for(true).await;
        assert!(m.render().contains(r#"uuid="GPU-fake-0"} 0.25"#));
        *fake.0.lock().unwrap() = None;
        wait_for(false).await;
        *fake.0.lock().unwrap() = Some(vec![fake_sample(0, 0.75)]);
        wait_for(true).await;
        task.abort();
    }
}
