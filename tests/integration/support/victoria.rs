//! A VictoriaMetrics process (Debian package `victoria-metrics`) to export metrics into, and
//! the series read back from it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::time::{Instant, sleep};

use super::free_port;

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A VictoriaMetrics child process on a loopback port with its own data directory; killed
/// and cleaned up on drop.
pub struct VictoriaMetrics {
    child: Child,
    /// The loopback port it listens on.
    pub port: u16,
    dir: PathBuf,
    http: reqwest::Client,
}

impl VictoriaMetrics {
    /// Starts one on a free port and waits until it is healthy.
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// Starts one on `port` and waits until it is healthy.
    pub async fn start_on(port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "strategic-cache-vm-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        let child = Command::new("victoria-metrics")
            .arg(format!("-storageDataPath={}", dir.display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `victoria-metrics` ({e}); install it with \
                     `apt-get install -y victoria-metrics` (Debian package) and put it on PATH"
                )
            });
        let vm = VictoriaMetrics {
            child,
            port,
            dir,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let health = vm.http.get(vm.url("/health")).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "victoria-metrics did not become healthy"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every series whose name matches `name_regex`, as (labels, values), polled until
    /// `ready` accepts the result (data is searchable shortly after `/internal/force_flush`).
    pub async fn export_until(
        &self,
        name_regex: &str,
        ready: impl Fn(&[Series]) -> bool,
    ) -> Vec<Series> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let _ = self
                .http
                .get(self.url("/internal/force_flush"))
                .send()
                .await;
            let body = self
                .http
                .get(self.url("/api/v1/export"))
                .query(&[("match[]", format!("{{__name__=~\"{name_regex}\"}}"))])
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let series: Vec<Series> = body
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    Series {
                        labels: v["metric"]
                            .as_object()
                            .unwrap()
                            .iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                            .collect(),
                        values: v["values"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_f64().unwrap())
                            .collect(),
                    }
                })
                .collect();
            if ready(&series) {
                return series;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {name_regex}; last export: {series:#?}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One exported series: its labels (with `__name__`) and its values.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its labels, the metric's name under `__name__`.
    pub labels: BTreeMap<String, String>,
    /// Its values, oldest first.
    pub values: Vec<f64>,
}
