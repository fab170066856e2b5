//! A small load generator for the bench: request/response over persistent connections (rr), and
//! connect/request/response/close (crr), against its own echo server. Reports transactions per
//! second and p50/p99 latency as one JSON line. Blocking sockets and threads: simple, and the
//! same cost with and without meshguard.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Request/response over persistent connections.
    Rr,
    /// A new connection per request.
    Crr,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(clap::Subcommand)]
enum Role {
    /// Echo every request back (one byte in, one byte out).
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Accept connections on each port and hold them open, without threads.
    HoldServe {
        #[arg(long, value_delimiter = ',')]
        listen: Vec<SocketAddr>,
    },
    /// Open this many connections across the targets, print {"open":N}, and hold them.
    Hold {
        #[arg(long, value_delimiter = ',')]
        targets: Vec<SocketAddr>,
        #[arg(long)]
        connections: usize,
    },
    /// Drive load and print {"tps":..,"p50_us":..,"p99_us":..,"transactions":..}.
    Run {
        #[arg(long, value_enum)]
        mode: Mode,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        connections: usize,
    },
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    raise_fd_limit();
    match &args.role {
        Role::Serve { listen } => serve(*listen),
        Role::HoldServe { listen } => {
            let mut held = Vec::new();
            let listeners: Vec<TcpListener> = listen
                .iter()
                .map(TcpListener::bind)
                .collect::<Result<_, _>>()?;
            for l in &listeners {
                l.set_nonblocking(true)?;
            }
            loop {
                let mut idle = true;
                for l in &listeners {
                    while let Ok((conn, _)) = l.accept() {
                        held.push(conn);
                        idle = false;
                    }
                }
                if idle {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
        Role::Hold {
            targets,
            connections,
        } => {
            let mut held = Vec::with_capacity(*connections);
            for i in 0..*connections {
                let target = targets[i % targets.len()];
                held.push(
                    TcpStream::connect(target)
                        .with_context(|| format!("connection {i} to {target}"))?,
                );
            }
            println!("{}", serde_json::json!({ "open": held.len() }));
            std::io::stdout().flush()?;
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        }
        Role::Run {
            mode,
            target,
            seconds,
            connections,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = (0..*connections)
                .map(|_| {
                    let (stop, mode, target) = (Arc::clone(&stop), *mode, *target);
                    thread::spawn(move || drive(mode, target, &stop))
                })
                .collect();
            thread::sleep(Duration::from_secs(*seconds));
            stop.store(true, Ordering::Relaxed);
            let mut latencies: Vec<u32> = Vec::new();
            for w in workers {
                latencies.extend(
                    w.join()
                        .map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
                );
            }
            latencies.sort_unstable();
            let pct = |p: f64| {
                latencies
                    .get(
                        ((latencies.len() as f64 * p) as usize)
                            .min(latencies.len().saturating_sub(1)),
                    )
                    .copied()
                    .unwrap_or(0)
            };
            println!(
                "{}",
                serde_json::json!({
                    "transactions": latencies.len(),
                    "tps": latencies.len() as f64 / *seconds as f64,
                    "p50_us": pct(0.50),
                    "p99_us": pct(0.99),
                })
            );
            Ok(())
        }
    }
}

/// Many connections need many descriptors; root may raise the limit.
fn raise_fd_limit() {
    let limit = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: setrlimit reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        thread::spawn(move || {
            let mut byte = [0u8; 1];
            while conn.read_exact(&mut byte).is_ok() {
                if conn.write_all(&byte).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// One load thread: transactions until `stop`, each one's latency in microseconds.
fn drive(mode: Mode, target: SocketAddr, stop: &AtomicBool) -> anyhow::Result<Vec<u32>> {
    let connect = || -> anyhow::Result<TcpStream> {
        let s = TcpStream::connect(target).with_context(|| format!("connecting to {target}"))?;
        s.set_nodelay(true)?;
        Ok(s)
    };
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut conn = if mode == Mode::Rr {
        Some(connect()?)
    } else {
        None
    };
    let mut byte = [b'x'];
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let mut fresh;
        let stream = match conn.as_mut() {
            Some(s) => s,
            None => {
                fresh = connect()?;
                &mut fresh
            }
        };
        stream.write_all(&byte)?;
        stream.read_exact(&mut byte)?;
        latencies.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    Ok(latencies)
}
