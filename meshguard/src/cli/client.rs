//! The CLI's side of the agent API: plain HTTP/1.1 over the agent's unix socket, or over TCP
//! (http:// or https://) with a bearer token.

use std::{path::PathBuf, str::FromStr};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::{TcpStream, UnixStream};

use crate::api::types::ErrorBody;

/// Where the agent is, as `--agent` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddr {
    Unix(PathBuf),
    /// `host:port` of an `http://` URL.
    Http(String),
    /// `host:port` of an `https://` URL.
    Https(String),
}

/// The `host:port` of a URL given without a path.
fn authority<'a>(url: &str, rest: &'a str) -> Result<&'a str, String> {
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        let scheme = url.split("://").next().unwrap_or("http");
        return Err(format!(
            "{url:?}: give the agent as {scheme}://HOST:PORT, without a path"
        ));
    }
    Ok(authority)
}

impl FromStr for AgentAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("http://") {
            return Ok(AgentAddr::Http(authority(s, rest)?.to_string()));
        }
        if let Some(rest) = s.strip_prefix("https://") {
            if cfg!(not(feature = "tls")) {
                return Err(format!(
                    "{s:?}: this meshguard was built without TLS (feature `tls`); reach the agent \
                     over its unix socket or http://"
                ));
            }
            return Ok(AgentAddr::Https(authority(s, rest)?.to_string()));
        }
        if s.contains("://") {
            return Err(format!(
                "{s:?}: use a unix socket path or an http:// or https:// URL"
            ));
        }
        Ok(AgentAddr::Unix(PathBuf::from(s)))
    }
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Unix(p) => write!(f, "{}", p.display()),
            AgentAddr::Http(a) => write!(f, "http://{a}"),
            AgentAddr::Https(a) => write!(f, "https://{a}"),
        }
    }
}

/// The warning to give before sending the API token to `addr`: anyone on the path reads a token
/// sent over plain http, unless it never leaves the machine (loopback).
pub fn plain_http_token_warning(addr: &AgentAddr, sends_token: bool) -> Option<String> {
    let AgentAddr::Http(authority) = addr else {
        return None;
    };
    let host = host_of(authority);
    (sends_token && !is_loopback(host)).then(|| {
        format!(
            "warning: sending the API token over plain http to {host}; use https:// or the pod \
             proxy (meshguard flows --cluster)"
        )
    })
}

/// The host of `host:port` (`[v6]:port` too).
fn host_of(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    }
}

/// A name or address that never leaves the machine: `localhost`, 127.0.0.0/8, ::1.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {addr}: {reason}. Is `meshguard agent` running there? (--agent names another socket or URL)")]
    Unreachable { addr: String, reason: String },
    #[error("the agent at {addr} answered {status}: {message}")]
    Api {
        addr: String,
        status: StatusCode,
        message: String,
    },
}

pub struct Client {
    pub addr: AgentAddr,
    pub token: Option<String>,
    /// The CA to verify an https:// agent against, instead of the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Client {
    fn unreachable(&self, reason: impl ToString) -> ClientError {
        ClientError::Unreachable {
            addr: self.addr.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Sends `GET path` and returns the response, its body still streaming.
    pub async fn send(&self, path: &str) -> Result<Response<Incoming>, ClientError> {
        let mut req = Request::get(path).header(header::HOST, "meshguard");
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.unreachable(e))?;
        let response = match &self.addr {
            AgentAddr::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(TokioIo::new(stream), req).await?
            }
            AgentAddr::Http(authority) => {
                let stream = TcpStream::connect(authority)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(TokioIo::new(stream), req).await?
            }
            AgentAddr::Https(authority) => {
                let stream = self.tls_connect(authority).await?;
                self.exchange(TokioIo::new(stream), req).await?
            }
        };
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
        Err(ClientError::Api {
            addr: self.addr.to_string(),
            status,
            message,
        })
    }

    #[cfg(feature = "tls")]
    async fn tls_connect(
        &self,
        authority: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        let connector =
            super::tls::connector(self.ca_file.as_deref()).map_err(|e| self.unreachable(e))?;
        let name = super::tls::server_name(authority).map_err(|e| self.unreachable(e))?;
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|e| self.unreachable(e))?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {e}")))
    }

    /// Never reached: without TLS, https:// addresses are refused when parsed.
    #[cfg(not(feature = "tls"))]
    async fn tls_connect(&self, _authority: &str) -> Result<TcpStream, ClientError> {
        Err(self.unreachable("this meshguard was built without TLS"))
    }

    async fn exchange<T>(
        &self,
        io: TokioIo<T>,
        req: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, ClientError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e))
    }

    /// `GET path`, its JSON answer read as a `T` (unknown fields ignored).
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self
            .send(path)
            .await?
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| {
            self.unreachable(if e.is_data() {
                format!("the answer is not what this meshguard reads (an agent of another version?): {e}")
            } else {
                format!("the answer is not JSON: {e}")
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses() {
        assert_eq!(
            "/run/meshguard/meshguard.sock".parse(),
            Ok(AgentAddr::Unix("/run/meshguard/meshguard.sock".into()))
        );
        assert_eq!(
            "http://127.0.0.1:9465".parse(),
            Ok(AgentAddr::Http("127.0.0.1:9465".into()))
        );
        assert_eq!(
            "http://node-1:9465/".parse(),
            Ok(AgentAddr::Http("node-1:9465".into()))
        );
        let https = "https://agent.example:9465".parse::<AgentAddr>();
        if cfg!(feature = "tls") {
            assert_eq!(https, Ok(AgentAddr::Https("agent.example:9465".into())));
        } else {
            assert!(https.unwrap_err().contains("without TLS"));
        }
        for bad in [
            "https://",
            "https://node/v1",
            "http://",
            "http://node/v1",
            "ftp://x",
        ] {
            assert!(bad.parse::<AgentAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_over_plain_http_is_warned_of() {
        let warned = "warning: sending the API token over plain http to";
        // (--agent, a token to send, warned)
        let cases = [
            ("http://10.0.0.5:9465", true, true),
            ("http://node-1:9465", true, true),
            ("http://[fd00::5]:9465", true, true),
            ("http://127.0.0.1:9465", true, false),
            ("http://127.8.0.1:9465", true, false),
            ("http://localhost:9465", true, false),
            ("http://LocalHost:9465", true, false),
            ("http://[::1]:9465", true, false),
            ("http://localhost.evil.example:9465", true, true),
            ("http://10.0.0.5:9465", false, false),
            ("https://10.0.0.5:9465", true, false),
            ("/run/meshguard/meshguard.sock", true, false),
        ];
        for (agent, token, want) in cases {
            let addr: AgentAddr = match agent.parse() {
                Ok(a) => a,
                Err(_) if cfg!(not(feature = "tls")) => continue,
                Err(e) => panic!("{agent}: {e}"),
            };
            let warning = plain_http_token_warning(&addr, token);
            assert_eq!(
                warning.is_some(),
                want,
                "{agent} token={token}: {warning:?}"
            );
            if let Some(w) = warning {
                assert!(w.starts_with(warned), "{w}");
                assert!(
                    w.contains(
                        agent
                            .trim_start_matches("http://")
                            .split(':')
                            .next()
                            .unwrap()
                            .trim_start_matches('[')
                    ),
                    "{w}"
                );
            }
        }
    }
}
