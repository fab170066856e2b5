//! The agent API, HTTP/JSON under `/v1`, for `meshguard flows|explain|status` and scripts:
//! on a unix socket (mode 0600) and, when asked, on TCP behind a bearer token. Bad requests get
//! a 4xx with a JSON error saying what was wrong; a slow or vanished follower never holds up
//! the agent (it skips ahead, and is told). What it accepts and answers is in [`types`], which
//! the CLI shares.

pub mod types;

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::SystemTime};

use axum::{
    body::Body,
    extract::{Path as UrlPath, RawQuery, Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use futures_util::StreamExt as _;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::BroadcastStream;

use crate::{
    api::types::{ErrorBody, Explanation, FlowQuery, StreamLine, Warning, TOKEN_HEADER},
    flow::record::FlowRecord,
    state::AgentState,
};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: message.into(),
    };
    (status, Json(body)).into_response()
}

/// The query a query string asks for, or why it is a bad request.
fn filter(query: Option<String>) -> Result<FlowQuery, String> {
    FlowQuery::from_query(query.as_deref().unwrap_or(""))
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/v1/flows", get(flows))
        .route("/v1/flows/stream", get(stream))
        .route("/v1/flows/{id}", get(flow))
        .route("/v1/status", get(status))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /v1/flows, /v1/flows/stream, /v1/flows/{id}, /v1/status",
            )
        })
        .with_state(state)
}

async fn flows(State(state): State<Arc<AgentState>>, RawQuery(query): RawQuery) -> Response {
    let filter = match filter(query) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let flows = state
        .store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .query(&filter, SystemTime::now());
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(flows_json(flows)))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "flows"))
}

/// Records per chunk of a `/v1/flows` answer.
const CHUNK: usize = 256;

/// A [`types::FlowsAnswer`], `{"count": N, "flows": [...]}`, encoded a chunk at a time as the
/// client reads it: a large answer never exists whole in memory, and a client that stops
/// reading stops its encoding.
fn flows_json(
    flows: Vec<Arc<FlowRecord>>,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> {
    let head = format!("{{\"count\":{},\"flows\":[", flows.len());
    let chunks: Vec<Vec<Arc<FlowRecord>>> = flows.chunks(CHUNK).map(<[_]>::to_vec).collect();
    let body = futures_util::stream::iter(chunks)
        .enumerate()
        .map(|(i, chunk)| {
            let mut out = String::new();
            for (j, record) in chunk.iter().enumerate() {
                if i > 0 || j > 0 {
                    out.push(',');
                }
                // A record always serialises (plain strings and numbers).
                out.push_str(&serde_json::to_string(&**record).unwrap_or_else(|_| "null".into()));
            }
            out
        });
    futures_util::stream::once(std::future::ready(head))
        .chain(body)
        .chain(futures_util::stream::once(std::future::ready(
            "]}".to_string(),
        )))
        .map(Ok)
}

async fn stream(State(state): State<Arc<AgentState>>, RawQuery(query): RawQuery) -> Response {
    let filter = match filter(query) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let lines = BroadcastStream::new(state.live.subscribe()).filter_map(move |item| {
        let line = match item {
            Ok(record) if filter.matches(&record, SystemTime::now()) => {
                serde_json::to_string(&*record).ok()
            }
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                let warning = Warning {
                    warning: format!(
                        "skipped {n} flows: this client reads more slowly than flows arrive"
                    ),
                };
                serde_json::to_string(&StreamLine::Warning(warning)).ok()
            }
        };
        std::future::ready(line.map(|l| Ok::<_, std::convert::Infallible>(l + "\n")))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "stream"))
}

async fn flow(State(state): State<Arc<AgentState>>, UrlPath(id): UrlPath<String>) -> Response {
    let found = state
        .store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id);
    match found {
        // As a JSON value, whose keys are sorted: the bytes this answer has always had.
        Some(record) => match serde_json::to_value(Explanation::of(record)) {
            Ok(answer) => Json(answer).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        None => error(
            StatusCode::NOT_FOUND,
            format!("no flow with id {id:?} on this node (it may have aged out of the store)"),
        ),
    }
}

async fn status(State(state): State<Arc<AgentState>>) -> Response {
    let mut status = state
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let store = state.store.lock().unwrap_or_else(|e| e.into_inner());
    let stored = store.len();
    status.flows_stored = stored.recent;
    status.flagged_stored = stored.flagged;
    status.bypass_stored = stored.bypass;
    status.store_evicted = store.evicted();
    drop(store);
    Json(status).into_response()
}

/// Serves the API on a unix socket, readable and writable by its owner only; says on `bound`
/// whether it could bind.
pub async fn serve_unix(
    path: &Path,
    state: Arc<AgentState>,
    bound: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let listener = match bind_unix(path).await {
        Ok(listener) => {
            let _ = bound.send(Ok(()));
            listener
        }
        Err(e) => {
            let _ = bound.send(Err(e));
            return Ok(());
        }
    };
    tracing::info!(path = %path.display(), "serving the API");
    let refusals = crate::serve::Refusals::of(&state.metrics, "api-socket");
    crate::serve::unix(
        listener,
        router(state),
        crate::serve::Limits::default(),
        refusals,
    )
    .await;
    Ok(())
}

async fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        // A socket left by an agent that died; one that still answers is a second agent.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "{} is in use: another agent is running on this node",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Whether a request presents the token: `Authorization: Bearer <token>`, or `X-Meshguard-Token:
/// <token>` when it came through the pod proxy.
fn authorized(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let given = bearer
        .or_else(|| headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

/// Serves the API on TCP; every request must present the token (see [`authorized`]).
pub async fn serve_tcp(listener: TcpListener, token: String, state: Arc<AgentState>) {
    let refusals = crate::serve::Refusals::of(&state.metrics, "api");
    let token = Arc::new(token);
    let app = router(state).layer(middleware::from_fn(move |req: Request, next: Next| {
        let token = Arc::clone(&token);
        async move {
            if authorized(req.headers(), &token) {
                next.run(req).await
            } else {
                error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token (Authorization: Bearer, or X-Meshguard-Token)",
                )
            }
        }
    }));
    crate::serve::tcp(listener, app, crate::serve::Limits::default(), refusals).await
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_json_is_one_valid_document_at_any_size() {
        use futures_util::StreamExt as _;
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7] {
            let records: Vec<Arc<FlowRecord>> = (0..n)
                .map(|i| {
                    crate::flow::record::tests::record(
                        i as u64 + 1,
                        crate::verdict::Verdict::Mtls,
                        SystemTime::UNIX_EPOCH,
                    )
                })
                .collect();
            let text: String = futures_executor_lite(flows_json(records).map(|c| c.unwrap()));
            let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(value["count"], n, "{n}");
            let flows = value["flows"].as_array().unwrap();
            assert_eq!(flows.len(), n);
            if n > 0 {
                assert_eq!(flows[n - 1]["id"], format!("{:016x}", n));
            }
        }
    }

    #[test]
    fn flows_json_is_the_flows_answer_the_client_reads() {
        use futures_util::StreamExt as _;
        let records: Vec<Arc<FlowRecord>> = (1..=3)
            .map(|i| {
                crate::flow::record::tests::record(
                    i,
                    crate::verdict::Verdict::Mtls,
                    SystemTime::UNIX_EPOCH,
                )
            })
            .collect();
        let text = futures_executor_lite(flows_json(records.clone()).map(|c| c.unwrap()));
        let answer = types::FlowsAnswer {
            count: 3,
            flows: records.iter().map(|r| (**r).clone()).collect(),
        };
        assert_eq!(text, serde_json::to_string(&answer).unwrap());
        let read: types::FlowsAnswer = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&read).unwrap(), text);
    }

    /// Collects a stream of strings (no waker needed: every item is ready).
    fn futures_executor_lite(stream: impl futures_util::Stream<Item = String> + Unpin) -> String {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(stream.collect::<Vec<_>>())
            .concat()
    }

    #[test]
    fn the_token_in_either_header() {
        use axum::http::{HeaderMap, HeaderValue};
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let token = "0123456789abcdef";
        assert!(authorized(
            &with(&[("authorization", "Bearer 0123456789abcdef")]),
            token
        ));
        assert!(authorized(
            &with(&[(TOKEN_HEADER, "0123456789abcdef")]),
            token
        ));
        assert!(authorized(
            &with(&[("X-Meshguard-Token", "0123456789abcdef")]),
            token
        ));
        for wrong in [
            with(&[]),
            with(&[("authorization", "0123456789abcdef")]),
            with(&[("authorization", "Bearer nope")]),
            with(&[(TOKEN_HEADER, "nope")]),
            with(&[(TOKEN_HEADER, "")]),
        ] {
            assert!(!authorized(&wrong, token), "{wrong:?}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for other in [&b""[..], b"s3cre", b"s3cret!", b"S3cret", b"\0\0\0\0\0\0"] {
            assert!(!constant_time_eq(other, b"s3cret"), "{other:?}");
        }
        assert!(!constant_time_eq(
            b"",
            b""[..]
                .iter()
                .chain(b"x")
                .copied()
                .collect::<Vec<_>>()
                .as_slice()
        ));
    }
}
