//! The agent's HTTP endpoints on its metrics address: `/metrics` for Prometheus, `/healthz`
//! (the process answers) and `/readyz` (the kernel programs are attached) for the kubelet.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints read.
pub struct Health {
    pub metrics: Metrics,
    pub attached: AtomicBool,
}

pub async fn serve(listener: TcpListener, health: Arc<Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(health);
    axum::serve(listener, app).await
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        health.metrics.encode(),
    )
}

async fn ready(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.attached.load(Ordering::Relaxed) {
        (StatusCode::OK, "attached\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not attached yet\n")
    }
}
