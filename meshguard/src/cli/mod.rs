//! The verbs for people: `meshguard flows`, `edges`, `strict-ready`, `explain`, `status`. Tables for people (colour only
//! on a terminal), JSON for scripts, in the habits of `hubble observe` and `kubectl`.
//!
//! The client side of the agent API: it reads the agent's answers as the typed records and
//! answers the server writes ([`crate::api::types`], [`crate::flow::record`]), and knows nothing
//! else of the agent. [`args`] holds the verbs' flags, [`client`] speaks HTTP to one agent,
//! [`cluster`] asks every node's, [`render`] writes what people read, through [`display`];
//! [`edges`] folds records into workload-to-workload edges, [`strict`] into STRICT readiness.

pub mod args;
pub mod client;
#[cfg(feature = "kubernetes")]
pub mod cluster;
pub mod display;
pub mod edges;
pub mod render;
pub mod strict;
#[cfg(feature = "tls")]
pub mod tls;

use std::{io::Write, process::ExitCode};

use http_body_util::BodyExt as _;

use crate::{
    api::types::{Explanation, FlowQuery, FlowsAnswer, Status, StreamLine},
    cli::{
        client::{Client, ClientError},
        display::printable,
        render::{color, explain_text, header, row, status_text},
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Jsonl,
}

/// Why a verb failed, and so its exit code: 2 for bad usage, 1 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// Anything else that stopped the verb (the API server unreachable, no agent answering).
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The stderr line for a verb that failed.
pub fn error_line(e: &CliError) -> String {
    // It may quote the agent's error text, or a name from the cluster.
    format!("error: {}", printable(&e.to_string()))
}

/// The stderr line for an agent's warning to a follower.
fn warning_line(warning: &str) -> String {
    format!("warning: {}", printable(warning))
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            // The agent rejecting a query is bad usage too: its message says how to fix it.
            CliError::Agent(ClientError::Api { status, .. }) if status.as_u16() == 400 => 2,
            _ => 1,
        }
    }
}

/// Runs a verb on a small runtime; its error decides the exit code (2: bad usage, 1: other).
pub fn run(verb: impl std::future::Future<Output = Result<(), CliError>>) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::from)
        .and_then(|rt| rt.block_on(verb));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// One JSON line of a value the CLI read (a record, as the agent wrote it).
fn json_line(v: &impl serde::Serialize) -> Result<String, CliError> {
    Ok(serde_json::to_string(v).map_err(std::io::Error::from)?)
}

/// `meshguard flows` against one agent: the stored flows that match (at most `last` when
/// given), then, with `follow`, new ones as they come (from now, unless `last` was given).
pub async fn flows(
    client: &Client,
    query: &FlowQuery,
    last: Option<usize>,
    output: Output,
    follow: bool,
) -> Result<(), CliError> {
    let qs = query.to_query();
    let color = color();
    let mut out = std::io::stdout().lock();
    // Following without --last starts from now, like `hubble observe -f`.
    if !follow || last.is_some() {
        let answer: FlowsAnswer = client.get_json(&format!("/v1/flows?{qs}")).await?;
        let mut flows = answer.flows;
        flows.reverse(); // oldest first, newest at the bottom, as a log reads
        match output {
            Output::Json if !follow => writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&flows).unwrap_or_default()
            )?,
            Output::Json | Output::Jsonl => {
                for f in &flows {
                    writeln!(out, "{}", json_line(f)?)?;
                }
            }
            Output::Table | Output::Wide => {
                writeln!(out, "{}", header(output, false))?;
                for f in &flows {
                    writeln!(out, "{}", row(f, output, color, false))?;
                }
            }
        }
        out.flush()?;
    }
    if !follow {
        return Ok(());
    }
    if matches!(output, Output::Table | Output::Wide) && last.is_none() {
        writeln!(out, "{}", header(output, false))?;
        out.flush()?;
    }
    let mut body = client
        .send(&format!("/v1/flows/stream?{qs}"))
        .await?
        .into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Unreachable {
            addr: client.addr.to_string(),
            reason: e.to_string(),
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let record = match serde_json::from_slice::<StreamLine>(&line) {
                Ok(StreamLine::Record(record)) => record,
                Ok(StreamLine::Warning(w)) => {
                    eprintln!("{}", warning_line(&w.warning));
                    continue;
                }
                Err(_) => continue,
            };
            match output {
                Output::Json | Output::Jsonl => writeln!(out, "{}", json_line(&record)?)?,
                Output::Table | Output::Wide => {
                    writeln!(out, "{}", row(&record, output, color, false))?
                }
            }
            out.flush()?;
        }
    }
    Ok(())
}

pub async fn explain(client: &Client, id: &str) -> Result<(), CliError> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CliError::Usage(format!(
            "{id:?} is not a flow id: ids are hexadecimal, as `meshguard flows -o wide` shows them"
        )));
    }
    let answer: Explanation = client.get_json(&format!("/v1/flows/{id}")).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(explain_text(id, &answer).as_bytes())?;
    Ok(())
}

pub async fn status(client: &Client, output: Output) -> Result<(), CliError> {
    let s: Status = client.get_json("/v1/status").await?;
    let mut out = std::io::stdout().lock();
    if matches!(output, Output::Json | Output::Jsonl) {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&s).unwrap_or_default()
        )?;
        return Ok(());
    }
    out.write_all(status_text(&s).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{display::has_unsafe, render::tests::POISON};

    #[test]
    fn agent_errors_are_shown_escaped() {
        let e = CliError::Agent(ClientError::Api {
            addr: "http://node-1:9465".into(),
            status: hyper::StatusCode::NOT_FOUND,
            message: format!("no flow with id \"x{POISON}\""),
        });
        let line = error_line(&e);
        assert!(!has_unsafe(&line), "{line:?}");
        assert!(line.starts_with("error: the agent at http://node-1:9465 answered 404"));
        assert!(!has_unsafe(&warning_line(POISON)));
    }
}
