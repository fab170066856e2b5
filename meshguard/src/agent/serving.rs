//! The agent's endpoints, on a runtime of their own: however many clients they hold, and
//! however slowly those read, the event loop never waits for them.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{api, config::ServeConfig, http, state::AgentState};

/// The endpoints being served, and what could not be.
pub(super) struct Serving {
    runtime: Option<tokio::runtime::Runtime>,
    api_socket: Option<PathBuf>,
    /// What is not served, in words (the agent is degraded, still watching).
    pub(super) not_served: Vec<String>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context forbids: let it go in the background.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Serving {
    /// Stops serving; removes the API socket.
    pub(super) fn stop(self) {
        if let Some(path) = &self.api_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts the endpoints: metrics and health on TCP, the API on its unix socket and, if asked,
/// on TCP with a token. Failing to bind is fatal: a DaemonSet pod should restart, loudly. A
/// token file that does not exist (its Secret not created yet) only leaves the TCP API off:
/// the node is still watched.
pub(super) async fn start(
    config: &ServeConfig,
    state: &Arc<AgentState>,
) -> anyhow::Result<Serving> {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("meshguard-serve")
        .enable_all()
        .build()
        .context("starting the serving runtime")?;
    let handle = runtime.handle().clone();
    let mut serving = Serving {
        runtime: Some(runtime),
        api_socket: config.api_socket.0.clone(),
        not_served: Vec::new(),
    };
    if let Some(addr) = config.metrics_addr.0 {
        let listener = bind_tcp(addr, "metrics")?;
        info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
        let state = Arc::clone(state);
        handle.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => http::serve(listener, state).await,
                Err(e) => warn!(%e, "metrics server stopped"),
            }
        });
    }
    if let Some(path) = config.api_socket.0.clone() {
        // Bind now, so that a second agent on the node is refused before it attaches.
        let state = Arc::clone(state);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        handle.spawn(async move {
            if let Err(e) = api::serve_unix(&path, state, ready_tx).await {
                warn!(path = %path.display(), error = %format!("{e:#}"), "API socket stopped");
            }
        });
        ready_rx.await.context("starting the API socket")??;
    }
    if let Some((addr, token_file)) = config.api_tcp() {
        let token = match std::fs::read_to_string(token_file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = format!(
                    "no API on {addr}: the token file {} does not exist (for a DaemonSet: create the Secret meshguard-api-token, then restart the pods)",
                    token_file.display()
                );
                warn!("{why}");
                serving.not_served.push(why);
                return Ok(serving);
            }
            read => read
                .with_context(|| format!("reading the API token from {}", token_file.display()))?
                .trim()
                .to_string(),
        };
        anyhow::ensure!(
            token.len() >= 16,
            "the API token in {} is shorter than 16 characters",
            token_file.display()
        );
        let listener = bind_tcp(addr, "the API")?;
        info!(addr = %listener.local_addr()?, "serving the API on TCP (bearer token required)");
        let state = Arc::clone(state);
        handle.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => api::serve_tcp(listener, token, state).await,
                Err(e) => warn!(%e, "API listener stopped"),
            }
        });
    }
    Ok(serving)
}

/// A listener bound now (so that a port in use fails the start), served on the serving runtime.
fn bind_tcp(addr: SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("serving {what} on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Raises the open-file limit to its hard limit: every client connection is a descriptor, and
/// running out would also keep the agent from opening cgroups and maps.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
