//! Resets a connection enforcement refused, so that its application fails at once (the kernel
//! drops every payload packet of it already; without this, its client would wait for a
//! timeout). `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`, the kernel's own abort (as `ss -K`): the
//! socket's owner sees `ECONNABORTED`, its peer a reset. sock_diag only finds sockets of its
//! own network namespace, so the request is sent from a thread that entered the socket's,
//! found by its cookie among the namespaces of the node's processes (which needs
//! `CAP_SYS_ADMIN`; without it the refused connection still carries nothing, and times out).

use std::{
    collections::HashMap,
    fs::File,
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
};

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;
const SOCK_DESTROY: u16 = 21;

/// Resets at most this many connections a second: each may walk `/proc` and enter
/// namespaces on the agent's event path, and an application retrying a refused call in a loop
/// must not stall it. Past the limit the kernel still drops what the connections send; they
/// time out instead.
pub const RESETS_PER_SECOND: u32 = 200;

/// Network namespace cookies by the namespace file's inode, as found so far.
#[derive(Default)]
pub struct Resetter {
    cookies: HashMap<u64, u64>,
    /// The second being counted, and the resets in it.
    second: Option<std::time::Instant>,
    resets: u32,
}

/// One TCP socket, as the agent knows it.
#[derive(Clone, Copy, Debug)]
pub struct Socket {
    pub cookie: u64,
    pub netns: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// A process that may share its network namespace (the flow's sender), tried first.
    pub pid: Option<u32>,
}

impl Resetter {
    /// Whether one more reset fits in the current second.
    fn admit(&mut self, now: std::time::Instant) -> bool {
        if self
            .second
            .is_none_or(|s| now.duration_since(s) >= std::time::Duration::from_secs(1))
        {
            (self.second, self.resets) = (Some(now), 0);
        }
        self.resets += 1;
        self.resets <= RESETS_PER_SECOND
    }

    pub fn reset(&mut self, socket: Socket) -> Result<(), String> {
        if !self.admit(std::time::Instant::now()) {
            return Err(format!("over {RESETS_PER_SECOND} resets this second"));
        }
        let mut candidates: Vec<std::path::PathBuf> = socket
            .pid
            .map(|pid| format!("/proc/{pid}/ns/net").into())
            .into_iter()
            .collect();
        let procs = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
        candidates.extend(procs.flatten().filter_map(|e| {
            let name = e.file_name();
            name.to_str()?
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| e.path().join("ns/net"))
        }));
        let cookies = &mut self.cookies;
        // setns changes only the calling thread's namespace: a thread of its own, gone after.
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let mut tried = std::collections::HashSet::new();
                    for path in candidates {
                        let Ok(ns) = File::open(&path) else { continue };
                        let Ok(inode) = ns.metadata().map(|m| m.ino()) else {
                            continue;
                        };
                        if !tried.insert(inode)
                            || cookies.get(&inode).is_some_and(|c| *c != socket.netns)
                        {
                            continue;
                        }
                        // SAFETY: a valid namespace file descriptor; this thread only.
                        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            return Err(format!(
                                "entering {}: {}",
                                path.display(),
                                io::Error::last_os_error()
                            ));
                        }
                        let cookie = netns_cookie().map_err(|e| format!("SO_NETNS_COOKIE: {e}"))?;
                        cookies.insert(inode, cookie);
                        if cookie == socket.netns {
                            return destroy(&socket).map_err(|e| format!("SOCK_DESTROY: {e}"));
                        }
                    }
                    Err(format!(
                        "no process is in network namespace {}",
                        socket.netns
                    ))
                })
                .join()
                .unwrap_or_else(|_| Err("the reset thread panicked".into()))
        })
    }
}

/// The calling thread's network namespace cookie.
fn netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

/// The `SOCK_DESTROY` request for one TCP socket: `nlmsghdr`, then `inet_diag_req_v2`.
fn request(socket: &Socket) -> Vec<u8> {
    let words = |ip: IpAddr| -> [u8; 16] {
        let mut out = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out = v6.octets(),
        }
        out
    };
    let family = match socket.local.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    let mut body = Vec::with_capacity(56);
    body.extend([family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    body.extend(0u32.to_ne_bytes()); // idiag_states: unused by a destroy
    body.extend(socket.local.port().to_be_bytes());
    body.extend(socket.remote.port().to_be_bytes());
    body.extend(words(socket.local.ip()));
    body.extend(words(socket.remote.ip()));
    body.extend(0u32.to_ne_bytes()); // idiag_if: any
                                     // The socket's cookie: only that socket, never another one on the same addresses.
    body.extend((socket.cookie as u32).to_ne_bytes());
    body.extend(((socket.cookie >> 32) as u32).to_ne_bytes());
    let len = 16 + body.len() as u32;
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend(len.to_ne_bytes());
    msg.extend(SOCK_DESTROY.to_ne_bytes());
    msg.extend(((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend(1u32.to_ne_bytes()); // sequence
    msg.extend(0u32.to_ne_bytes()); // port id: the kernel's
    msg.extend(body);
    msg
}

/// Sends the request from the calling thread's namespace, and reads the kernel's answer.
fn destroy(socket: &Socket) -> io::Result<()> {
    let msg = request(socket);
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            if libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut answer = [0u8; 256];
            let n = libc::recv(fd, answer.as_mut_ptr().cast(), answer.len(), 0);
            if n < 20 {
                return Err(io::Error::last_os_error());
            }
            // NLMSG_ERROR: the error code follows the header (0: done).
            let kind = u16::from_ne_bytes([answer[4], answer[5]]);
            let code = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
            match (kind as i32, code) {
                (libc::NLMSG_ERROR, 0) => Ok(()),
                (libc::NLMSG_ERROR, e) => Err(io::Error::from_raw_os_error(-e)),
                _ => Err(io::Error::other(format!("unexpected answer type {kind}"))),
            }
        })();
        libc::close(fd);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_limited_per_second() {
        let mut r = Resetter::default();
        let t0 = std::time::Instant::now();
        let admitted = (0..RESETS_PER_SECOND + 50).filter(|_| r.admit(t0)).count();
        assert_eq!(admitted, RESETS_PER_SECOND as usize);
        assert!(
            r.admit(t0 + std::time::Duration::from_secs(1)),
            "a new second"
        );
    }

    #[test]
    fn a_destroy_request_names_one_socket_by_its_addresses_and_cookie() {
        let socket = Socket {
            cookie: 0x0000_0002_0000_0001,
            netns: 4097,
            local: "10.244.1.10:47364".parse().unwrap(),
            remote: "10.244.1.14:5000".parse().unwrap(),
            pid: None,
        };
        let m = request(&socket);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DESTROY);
        // inet_diag_req_v2 at 16: family, protocol; the socket id at 24.
        assert_eq!((m[16], m[17]), (libc::AF_INET as u8, 6));
        assert_eq!(
            &m[24..28],
            &[0xb9, 0x04, 0x13, 0x88],
            "ports, network order"
        );
        assert_eq!(&m[28..32], &[10, 244, 1, 10]);
        assert_eq!(&m[44..48], &[10, 244, 1, 14]);
        assert_eq!(u32::from_ne_bytes(m[64..68].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(m[68..72].try_into().unwrap()), 2);
    }
}
