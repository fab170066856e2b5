//! HTTP serving with bounded resources, for `/metrics` and the API. Any pod on the node can
//! reach these ports, so no client may hold more than its share: connections are capped in all
//! and per peer address, a request's headers must arrive within a deadline, and a request that
//! is not a stream must be answered within one. Serving runs on its own runtime (see
//! `agent::serving`), so that however busy it is, the event loop never waits for it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::IntCounter;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};

/// What one listener allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once, from everyone.
    pub connections: usize,
    /// Connections open at once from one peer address (TCP only).
    pub per_peer: usize,
    /// From a connection's start, or the end of its last response, to the end of the next
    /// request's headers.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 256,
            per_peer: 16,
            header_timeout: Duration::from_secs(5),
        }
    }
}

/// What a listener refused, counted in `meshguard_connections_refused_total`.
#[derive(Clone, Debug)]
pub struct Refusals {
    /// Connections closed at once: the listener was at its limit.
    pub over_limit: IntCounter,
    /// Connections closed at once: their peer was at its limit.
    pub peer_over_limit: IntCounter,
    /// Accepts that failed (out of file descriptors, say); serving pauses briefly.
    pub accept_errors: IntCounter,
}

impl Refusals {
    /// The counters of one listener.
    pub fn of(metrics: &crate::metrics::Metrics, listener: &str) -> Self {
        let c = |reason| {
            metrics
                .connections_refused
                .with_label_values(&[listener, reason])
        };
        Self {
            over_limit: c("limit"),
            peer_over_limit: c("peer_limit"),
            accept_errors: c("accept_error"),
        }
    }
}

/// Counts open connections, in all and by peer; a connection holds a [`Pass`] while it lives.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
    peer: Option<IpAddr>,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    PeerFull,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Pass, Refused> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.limits.connections {
            return Err(Refused::Full);
        }
        if let Some(ip) = peer {
            let n = open.1.entry(ip).or_default();
            if *n >= self.limits.per_peer {
                return Err(Refused::PeerFull);
            }
            *n += 1;
        }
        open.0 += 1;
        Ok(Pass {
            gate: Arc::clone(self),
            peer,
        })
    }

    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(ip) = self.peer {
            if let Some(n) = open.1.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&ip);
                }
            }
        }
    }
}

/// Serves `app` on TCP until the listener fails for good.
pub async fn tcp(listener: TcpListener, app: Router, limits: Limits, refusals: Refusals) {
    let gate = Gate::new(limits);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Canonical: an IPv4 peer on a dual-stack socket is one peer, not two.
                let ip = peer.ip().to_canonical();
                match gate.admit(Some(ip)) {
                    Ok(pass) => connection(stream, app.clone(), limits, pass),
                    Err(why) => refused(&refusals, why),
                }
            }
            Err(_) => pause_after_accept_error(&refusals).await,
        }
    }
}

/// Serves `app` on a unix socket (its peers are all root on this node: no per-peer cap).
pub async fn unix(listener: UnixListener, app: Router, limits: Limits, refusals: Refusals) {
    let gate = Gate::new(limits);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match gate.admit(None) {
                Ok(pass) => connection(stream, app.clone(), limits, pass),
                Err(why) => refused(&refusals, why),
            },
            Err(_) => pause_after_accept_error(&refusals).await,
        }
    }
}

fn refused(refusals: &Refusals, why: Refused) {
    // Dropping the stream closes it: a refused client learns at once, and holds nothing.
    match why {
        Refused::Full => refusals.over_limit.inc(),
        Refused::PeerFull => refusals.peer_over_limit.inc(),
    }
}

/// Out of file descriptors (or another transient failure): accepting again at once would spin.
async fn pause_after_accept_error(refusals: &Refusals) {
    refusals.accept_errors.inc();
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn connection<S>(stream: S, app: Router, limits: Limits, pass: Pass)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = TowerToHyperService::new(app);
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        drop(pass);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_connections_in_all_and_per_peer() {
        let gate = Gate::new(Limits {
            connections: 3,
            per_peer: 2,
            header_timeout: Duration::from_secs(1),
        });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = gate.admit(Some(a)).unwrap();
        let a2 = gate.admit(Some(a)).unwrap();
        assert_eq!(gate.admit(Some(a)).unwrap_err(), Refused::PeerFull);
        let b1 = gate.admit(Some(b)).unwrap();
        assert_eq!(gate.admit(Some(b)).unwrap_err(), Refused::Full);
        assert_eq!(gate.admit(None).unwrap_err(), Refused::Full);
        drop(a1);
        assert_eq!(gate.open(), 2);
        let a3 = gate.admit(Some(a)).unwrap();
        drop((a2, a3, b1));
        assert_eq!(gate.open(), 0);
        assert!(
            gate.open.lock().unwrap().1.is_empty(),
            "no peer left behind"
        );
    }
}
