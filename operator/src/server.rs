//! `/metrics`, `/healthz`, `/readyz` on one small axum server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

/// Shared with the web server: readiness flips once the controllers' watches are running
/// (or the replica is a healthy standby waiting for the lease).
#[derive(Clone)]
pub struct Health {
    pub ready: Arc<AtomicBool>,
    pub metrics: Metrics,
}

pub fn router(h: Health) -> Router {
    Router::new()
        .route("/metrics", get(|State(h): State<Health>| async move { h.metrics.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(h)
}

pub async fn serve(
    addr: SocketAddr,
    h: Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(h)).with_graceful_shutdown(shutdown).await
}
