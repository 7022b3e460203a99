//! [`MetricsExporter`]: the background task that sends windows to InfluxDB.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::line_protocol::LineBuilder;
use super::recorder::MetricsRecorder;
use super::*;
use crate::error::CacheError;

/// Which write API the sink speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfluxApi {
    /// InfluxDB 2.x / 3.x: `POST /api/v2/write?org=..&bucket=..&precision=ns`.
    V2 {
        /// Organisation (InfluxDB 3 ignores it; may be empty then).
        org: String,
        /// Bucket (InfluxDB 3: the database).
        bucket: String,
    },
    /// InfluxDB 1.x: `POST /write?db=..&precision=ns`.
    V1 {
        /// Database.
        db: String,
    },
}

/// Where to send the metrics. The token is never shown by `Debug` or in any error or log.
///
/// ```
/// use strategic_cache::metrics::InfluxConfig;
/// let c = InfluxConfig::v2("http://influx:8086", "acme", "cache").with_token("s3cr3t");
/// assert!(!format!("{c:?}").contains("s3cr3t"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct InfluxConfig {
    /// Base URL of the server, e.g. `http://influxdb:8086` (a path prefix is kept).
    pub url: String,
    /// Which write API to use.
    pub api: InfluxApi,
    /// Sent as `Authorization: Token <token>` when set.
    token: Option<String>,
    /// Per-request timeout (default 5 s).
    pub timeout: Duration,
}

impl fmt::Debug for InfluxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InfluxConfig")
            .field("url", &pg_diagnostics::redact_url(&self.url))
            .field("api", &self.api)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl InfluxConfig {
    /// An InfluxDB 2.x/3.x sink.
    pub fn v2(url: impl Into<String>, org: impl Into<String>, bucket: impl Into<String>) -> Self {
        InfluxConfig {
            url: url.into(),
            api: InfluxApi::V2 {
                org: org.into(),
                bucket: bucket.into(),
            },
            token: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// An InfluxDB 1.x sink.
    pub fn v1(url: impl Into<String>, db: impl Into<String>) -> Self {
        InfluxConfig {
            url: url.into(),
            api: InfluxApi::V1 { db: db.into() },
            token: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// Sets the API token (InfluxDB 2/3; `user:password` for 1.x with authentication).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether a token is set (the token itself is not readable).
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// From the environment: `INFLUXDB_URL` (required), then `INFLUXDB_BUCKET` (with
    /// `INFLUXDB_ORG`, may be empty for InfluxDB 3) for the v2 API or else `INFLUXDB_DB` for
    /// the 1.x API, and `INFLUXDB_TOKEN` if set. `None` when the URL or both of bucket and
    /// database are missing or empty: metrics export is then off.
    pub fn from_env() -> Option<InfluxConfig> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`InfluxConfig::from_env`] over any lookup (for tests and other config sources).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Option<InfluxConfig> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let url = get("INFLUXDB_URL")?;
        let config = if let Some(bucket) = get("INFLUXDB_BUCKET") {
            InfluxConfig::v2(url, get("INFLUXDB_ORG").unwrap_or_default(), bucket)
        } else {
            InfluxConfig::v1(url, get("INFLUXDB_DB")?)
        };
        Some(match get("INFLUXDB_TOKEN") {
            Some(token) => config.with_token(token),
            None => config,
        })
    }

    /// The write URL with its query string.
    pub fn write_url(&self) -> Result<reqwest::Url, CacheError> {
        let mut base = reqwest::Url::parse(&self.url)
            .map_err(|e| CacheError::invalid("INFLUXDB_URL", format!("not a URL: {e}")))?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let (path, params): (&str, Vec<(&str, &str)>) = match &self.api {
            InfluxApi::V2 { org, bucket } => (
                "api/v2/write",
                vec![("org", org), ("bucket", bucket), ("precision", "ns")],
            ),
            InfluxApi::V1 { db } => ("write", vec![("db", db), ("precision", "ns")]),
        };
        let mut url = base
            .join(path)
            .map_err(|e| CacheError::invalid("INFLUXDB_URL", format!("bad base URL: {e}")))?;
        url.query_pairs_mut().extend_pairs(params);
        Ok(url)
    }
}

/// How often and how patiently the exporter sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExporterConfig {
    /// Length of a window (default 10 s).
    pub flush_interval: Duration,
    /// Rendered windows kept while the sink is down (default 60, ten minutes at 10 s); the
    /// oldest is dropped beyond it and counted in `dropped_windows`.
    pub max_pending_windows: usize,
    /// First wait after a failed POST (default 1 s); doubles per failure.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (default 60 s).
    pub max_backoff: Duration,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            flush_interval: Duration::from_secs(10),
            max_pending_windows: 60,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// The exporter's counters, cumulative since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExporterStats {
    /// Windows delivered (2xx).
    pub exported_windows: u64,
    /// Windows dropped because `max_pending_windows` were already waiting.
    pub dropped_windows: u64,
    /// Failed POSTs.
    pub export_failures: u64,
    /// Windows rendered and not yet delivered.
    pub pending_windows: u64,
}

#[derive(Debug, Default)]
struct SharedStats {
    exported_windows: AtomicU64,
    dropped_windows: AtomicU64,
    export_failures: AtomicU64,
    pending_windows: AtomicU64,
}

impl SharedStats {
    fn snapshot(&self) -> ExporterStats {
        ExporterStats {
            exported_windows: self.exported_windows.load(Ordering::Relaxed),
            dropped_windows: self.dropped_windows.load(Ordering::Relaxed),
            export_failures: self.export_failures.load(Ordering::Relaxed),
            pending_windows: self.pending_windows.load(Ordering::Relaxed),
        }
    }
}

/// Spawns the export task.
#[derive(Debug)]
pub struct MetricsExporter;

impl MetricsExporter {
    /// Starts a tokio task that every `config.flush_interval` takes `recorder`'s window and
    /// sends it to `sink`. The task stops when the
    /// handle is dropped (pending windows are lost) or on [`ExporterHandle::shutdown`] (a
    /// final window is taken and sent).
    ///
    /// # Errors
    /// [`CacheError::InvalidInput`] if the sink's URL is not usable, the HTTP client cannot
    /// be built, or there is no tokio runtime to run the task on.
    pub fn spawn(
        recorder: Arc<MetricsRecorder>,
        sink: InfluxConfig,
        config: ExporterConfig,
    ) -> Result<ExporterHandle, CacheError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            CacheError::invalid(
                "runtime",
                "MetricsExporter::spawn must be called inside a tokio runtime",
            )
        })?;
        let url = sink.write_url()?;
        let client = reqwest::Client::builder()
            .timeout(sink.timeout)
            .connect_timeout(sink.timeout)
            .build()
            .map_err(|e| CacheError::invalid("http client", e.without_url().to_string()))?;
        let stats = Arc::new(SharedStats::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = Task {
            recorder,
            client,
            url,
            token: sink.token,
            config,
            stats: stats.clone(),
            pending: VecDeque::new(),
            backoff: None,
            retry_at: None,
            failing: false,
        };
        let join = runtime.spawn(task.run(stop_rx));
        Ok(ExporterHandle {
            stop: Some(stop_tx),
            join: Some(join),
            stats,
        })
    }
}

/// Owns the export task: dropping it stops the task; [`ExporterHandle::shutdown`] flushes
/// first.
#[derive(Debug)]
pub struct ExporterHandle {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
    stats: Arc<SharedStats>,
}

impl ExporterHandle {
    /// The exporter's counters now.
    pub fn stats(&self) -> ExporterStats {
        self.stats.snapshot()
    }

    /// Takes a final window, tries once to send everything pending (each POST bounded by the
    /// sink's timeout), stops the task and returns the final counters.
    pub async fn shutdown(mut self) -> ExporterStats {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
        self.stats.snapshot()
    }
}

impl Drop for ExporterHandle {
    fn drop(&mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

struct Task {
    recorder: Arc<MetricsRecorder>,
    client: reqwest::Client,
    url: reqwest::Url,
    token: Option<String>,
    config: ExporterConfig,
    stats: Arc<SharedStats>,
    /// Rendered windows, oldest first; at most `max_pending_windows`.
    pending: VecDeque<String>,
    backoff: Option<Duration>,
    retry_at: Option<Instant>,
    /// Whether the last attempt failed: failures are logged once when they start and once
    /// when they end, not on every attempt.
    failing: bool,
}

impl Task {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut ticker = tokio::time::interval(self.config.flush_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick is immediate; skip it so the first window has a full interval.
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.collect();
                    if self.retry_at.is_none_or(|at| Instant::now() >= at) {
                        self.send_pending().await;
                    }
                }
                _ = &mut stop => {
                    self.collect();
                    self.send_pending().await;
                    return;
                }
            }
        }
    }

    /// Takes the recorder's window and queues it rendered, dropping the oldest beyond the cap.
    fn collect(&mut self) {
        let window = self.recorder.take_window();
        let mut body = String::with_capacity(256 + window.rows.len() * 320);
        window.render(&mut body);
        self.recorder.render_sources(window.timestamp_ns, &mut body);
        while self.pending.len() >= self.config.max_pending_windows.max(1) {
            self.pending.pop_front();
            self.stats.dropped_windows.fetch_add(1, Ordering::Relaxed);
        }
        let s = self.stats.snapshot();
        LineBuilder::new(&mut body, MEASUREMENT_EXPORTER)
            .int(FIELD_DROPPED_WINDOWS, s.dropped_windows)
            .int(FIELD_OVERFLOW_BOTS, self.recorder.overflow_reads())
            .int(FIELD_EXPORT_FAILURES, s.export_failures)
            .int(FIELD_PENDING_WINDOWS, self.pending.len() as u64)
            .finish(window.timestamp_ns);
        self.pending.push_back(body);
        self.publish_pending();
    }

    fn publish_pending(&self) {
        self.stats
            .pending_windows
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// Sends pending windows oldest first until one fails.
    async fn send_pending(&mut self) {
        while let Some(body) = self.pending.front() {
            match self.post(body.clone()).await {
                Ok(()) => {
                    self.pending.pop_front();
                    self.publish_pending();
                    self.stats.exported_windows.fetch_add(1, Ordering::Relaxed);
                    if self.failing {
                        tracing::info!(url = %self.url, "metrics export recovered");
                    }
                    self.failing = false;
                    self.backoff = None;
                    self.retry_at = None;
                }
                Err(reason) => {
                    self.stats.export_failures.fetch_add(1, Ordering::Relaxed);
                    let backoff = self
                        .backoff
                        .map_or(self.config.initial_backoff, |b| b * 2)
                        .min(self.config.max_backoff);
                    if !self.failing {
                        tracing::warn!(url = %self.url, %reason, pending = self.pending.len(),
                            "metrics export failing; aggregating locally and retrying with backoff");
                    } else {
                        tracing::debug!(%reason, ?backoff, "metrics export still failing");
                    }
                    self.failing = true;
                    self.backoff = Some(backoff);
                    self.retry_at = Some(Instant::now() + backoff);
                    return;
                }
            }
        }
    }

    /// One POST. The error text names the status or the transport failure, never the token
    /// (it is only in a header) and never the URL's query (reqwest's URL is stripped).
    async fn post(&self, body: String) -> Result<(), String> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(body);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Token {token}"));
        }
        let response = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text
            .chars()
            .take(200)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        Err(format!("HTTP {status}: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token never shows in Debug output, and URL credentials are redacted too.
    #[test]
    fn metrics_config_debug_redacts_token() {
        let c = InfluxConfig::v2("http://admin:pw123@influx:8086", "acme", "cache")
            .with_token("super-secret-token");
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("super-secret-token"), "{shown}");
        assert!(!shown.contains("pw123"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("acme"),
            "{shown}"
        );
        assert!(c.has_token());
    }

    /// The write URLs carry the API's path and escaped query parameters.
    #[test]
    fn metrics_write_urls() {
        let v2 = InfluxConfig::v2("http://h:8086/prefix", "my org", "b&c");
        assert_eq!(
            v2.write_url().unwrap().as_str(),
            "http://h:8086/prefix/api/v2/write?org=my+org&bucket=b%26c&precision=ns"
        );
        let v1 = InfluxConfig::v1("http://h:8086", "cache");
        assert_eq!(
            v1.write_url().unwrap().as_str(),
            "http://h:8086/write?db=cache&precision=ns"
        );
        assert!(matches!(
            InfluxConfig::v1("not a url", "x").write_url(),
            Err(CacheError::InvalidInput { .. })
        ));
    }

    /// Spawning outside a tokio runtime is an error, not a panic.
    #[test]
    fn metrics_spawn_without_runtime_is_an_error() {
        let sink = InfluxConfig::v1("http://127.0.0.1:9", "cache");
        let result = MetricsExporter::spawn(
            Arc::new(MetricsRecorder::default()),
            sink,
            ExporterConfig::default(),
        );
        assert!(matches!(
            result,
            Err(CacheError::InvalidInput {
                field: "runtime",
                ..
            })
        ));
    }

    /// Env config: URL required; bucket selects v2, else db selects 1.x; empty means unset.
    #[test]
    fn metrics_config_from_env_lookup() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(InfluxConfig::from_lookup(env(&[])), None);
        assert_eq!(
            InfluxConfig::from_lookup(env(&[("INFLUXDB_URL", "http://h")])),
            None
        );
        let v2 = InfluxConfig::from_lookup(env(&[
            ("INFLUXDB_URL", "http://h"),
            ("INFLUXDB_ORG", "o"),
            ("INFLUXDB_BUCKET", "b"),
            ("INFLUXDB_DB", "d"),
            ("INFLUXDB_TOKEN", "t0k"),
        ]))
        .unwrap();
        assert_eq!(v2, InfluxConfig::v2("http://h", "o", "b").with_token("t0k"));
        let v1 = InfluxConfig::from_lookup(env(&[
            ("INFLUXDB_URL", "http://h"),
            ("INFLUXDB_BUCKET", " "),
            ("INFLUXDB_DB", "d"),
        ]))
        .unwrap();
        assert_eq!(v1, InfluxConfig::v1("http://h", "d"));
        assert!(!v1.has_token());
    }
}
