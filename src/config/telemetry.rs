//! `[telemetry]`: OpenTelemetry traces exported over OTLP/gRPC.
//!
//! Off unless `otlp_endpoint` is set. The exporter itself is the `otlp`
//! cargo feature's (`obs::otel`); a build without it refuses an endpoint
//! here, at parse time, so `check-config` says so before a deploy does.

use serde::Deserialize;

use super::Checker;

/// Default `service.name` of the exported spans.
pub const DEFAULT_SERVICE_NAME: &str = "payroc-broker";

/// `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/gRPC address, e.g. `http://otel-collector:4317`;
    /// `None`: no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// The share of traces started here that are sampled (0 to 1). Parent
    /// based: a call whose `traceparent` says sampled is always followed,
    /// one that says not sampled never is; the ratio decides the rest.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            // OpenTelemetry's own default sampler (parent based, always on):
            // a collector that was pointed at us expects spans; the export
            // queue bounds what that costs.
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    pub(super) fn check(&self, c: &mut Checker<'_>) {
        if let Some(text) = &self.otlp_endpoint {
            if !cfg!(feature = "otlp") {
                c.problem(
                    "telemetry.otlp_endpoint",
                    "this build has no OTLP exporter (cargo feature `otlp`, which the \
                     production image enables); remove the key or use a build with it",
                );
            }
            let url = match url::Url::parse(text) {
                Ok(url) => url,
                Err(e) => {
                    c.problem("telemetry.otlp_endpoint", format!("not a URL: {e}"));
                    return self.check_rest(c);
                }
            };
            if !matches!(url.scheme(), "http" | "https") {
                c.problem(
                    "telemetry.otlp_endpoint",
                    format!(
                        "`{}` is not an http:// or https:// URL (OTLP over gRPC)",
                        url.scheme()
                    ),
                );
            } else if url.host_str().is_none_or(str::is_empty) {
                c.problem("telemetry.otlp_endpoint", "has no host");
            }
            if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some()
            {
                // OTLP/gRPC has no path: `http://c:4318/v1/traces` is the
                // OTLP/HTTP address, which would take none of the spans.
                c.problem(
                    "telemetry.otlp_endpoint",
                    "must be scheme, host and port only (OTLP over gRPC has no path or query; \
                     /v1/traces is OTLP over HTTP, on another port)",
                );
            }
            if !url.username().is_empty() || url.password().is_some() {
                // It would be logged with the endpoint; collectors take
                // credentials in headers, which this section does not have.
                c.problem(
                    "telemetry.otlp_endpoint",
                    "must not carry credentials (user:password@)",
                );
            }
        }
        self.check_rest(c);
    }

    fn check_rest(&self, c: &mut Checker<'_>) {
        if self.service_name.trim().is_empty() {
            c.problem("telemetry.service_name", "must not be empty");
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            c.problem(
                "telemetry.sample_ratio",
                format!("{} is not between 0 and 1", self.sample_ratio),
            );
        }
    }
}
