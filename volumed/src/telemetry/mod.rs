//! The metrics exporter, a front-end: `GET /metrics` on `--metrics-listen`,
//! Prometheus text (or OpenMetrics on request) built at each scrape by
//! `collector` from the atomics of `metrics` and the engine's state, and
//! by `policies` from the snapshot policies' run records.

mod collector;
mod policies;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::lifecycle::Lifecycle;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind the metrics listener on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4), for
/// scrapers and linters that ask for that: a counter's family is named by
/// its `_total` samples, and there are no `# UNIT` or `# EOF` lines.
fn classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Binds `addr` and serves `GET /metrics` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    engine: Arc<Engine>,
    lifecycle: Arc<Lifecycle>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    crate::metrics::enable();
    let registry = Arc::new(collector::registry(engine, lifecycle));
    let app = Router::new().route(
        "/metrics",
        get(move |headers: axum::http::HeaderMap| {
            let registry = Arc::clone(&registry);
            async move {
                let openmetrics = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.contains("application/openmetrics-text"));
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) if openmetrics => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Ok(()) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        classic_text(&body),
                    )
                        .into_response(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode metrics");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }),
    );
    tracing::info!(%addr, "metrics listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{op=\"read\"} 1\n\
                  # HELP b_bytes Bytes.\n# TYPE b_bytes gauge\n# UNIT b_bytes bytes\nb_bytes 3\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{op=\"read\"} 1\n\
             # HELP b_bytes Bytes.\n# TYPE b_bytes gauge\nb_bytes 3\n"
        );
    }
}
