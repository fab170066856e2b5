//! The agent's HTTP endpoints on its metrics address: `/metrics` for Prometheus, `/healthz`
//! (the process answers) and `/readyz` (the kernel programs are attached) for the kubelet.

use std::sync::{atomic::Ordering, Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::net::TcpListener;

use crate::state::AgentState;

pub async fn serve(listener: TcpListener, state: Arc<AgentState>) {
    let refusals = crate::serve::Refusals::of(&state.metrics, "metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    crate::serve::tcp(listener, app, crate::serve::Limits::default(), refusals).await
}

async fn metrics(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.encode(),
    )
}

async fn ready(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    if state.attached.load(Ordering::Relaxed) {
        (StatusCode::OK, "attached\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not attached (starting, or programs found detached and being attached again)\n",
        )
    }
}
