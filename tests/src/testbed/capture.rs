//! Traffic capture equivalent to what Istio's init container installs in a meshed pod: every
//! outbound TCP connection to the sidecar's port 15001, except the proxy's own (its uid) and
//! loopback; every inbound one to 15006, except Istio's own ports; honouring the pod's
//! `traffic.sidecar.istio.io/exclude*` annotations. As an `iptables-restore` input, and for a
//! dual-stack pod the same again for `ip6tables-restore`, as istio-iptables writes both.
//!
//! One addition Istio's rules do not need: a sidecar whose inbound cluster connects to the
//! application at the pod's own IP, from the pod's IP (no 127.0.0.6 bind, see
//! [`super::InboundForward::PodIp`]), would have that connection sent back into 15006 by the
//! rule that takes the proxy's loopback traffic to its own pod IP for inbound. Meshes with such
//! inbound clusters exempt exactly those connections (the proxy's, from and to the pod's IP, on
//! the application's ports); [`rules`] does so when given them.

use std::{fmt::Write as _, net::IpAddr};

use super::PROXY_UID;

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// Ports istio-init never redirects inbound: HBONE, Envoy's Prometheus, health and agent ports.
pub const ISTIO_INBOUND_EXCLUDED: [u16; 4] = [15008, 15090, 15021, 15020];
/// The source address the sidecar uses for inbound traffic it hands to the application.
pub const INBOUND_PASSTHROUGH_SOURCE: &str = "127.0.0.6";
/// Its IPv6 twin, which istio-init adds to the pod's loopback.
pub const INBOUND_PASSTHROUGH_SOURCE_V6: &str = "::6";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub outbound_ports: Vec<u16>,
    pub inbound_ports: Vec<u16>,
    pub outbound_ip_ranges: Vec<String>,
}

/// The proxy's own connections to the application at the pod's IP, left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectInbound {
    pub pod_ip: IpAddr,
    pub ports: Vec<u16>,
}

/// Which of iptables and ip6tables a rule set is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// The command that loads [`rules`] for this family.
    pub fn restore(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables-restore",
            Family::Ipv6 => "ip6tables-restore",
        }
    }

    fn localhost(self) -> &'static str {
        match self {
            Family::Ipv4 => "127.0.0.1/32",
            Family::Ipv6 => "::1/128",
        }
    }

    fn passthrough_source(self) -> String {
        match self {
            Family::Ipv4 => format!("{INBOUND_PASSTHROUGH_SOURCE}/32"),
            Family::Ipv6 => format!("{INBOUND_PASSTHROUGH_SOURCE_V6}/128"),
        }
    }

    fn holds(self, address: &str) -> bool {
        address.contains(':') == (self == Family::Ipv6)
    }
}

fn ports(list: &[u16]) -> String {
    list.iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The nat table rules for one family, as `iptables-restore --noflush` (or
/// `ip6tables-restore`) reads them.
pub fn rules(exclude: &Exclusions, family: Family, direct: Option<&DirectInbound>) -> String {
    let uid = PROXY_UID;
    let localhost = family.localhost();
    let mut r = String::from("*nat\n");
    for chain in [
        "ISTIO_INBOUND",
        "ISTIO_IN_REDIRECT",
        "ISTIO_OUTPUT",
        "ISTIO_REDIRECT",
    ] {
        let _ = writeln!(r, ":{chain} - [0:0]");
    }
    r.push_str("-A PREROUTING -p tcp -j ISTIO_INBOUND\n");
    r.push_str("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n");

    for port in ISTIO_INBOUND_EXCLUDED {
        let _ = writeln!(r, "-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN");
    }
    if !exclude.inbound_ports.is_empty() {
        let _ = writeln!(
            r,
            "-A ISTIO_INBOUND -p tcp -m multiport --dports {} -j RETURN",
            ports(&exclude.inbound_ports)
        );
    }
    r.push_str("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n");
    let _ = writeln!(
        r,
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_PORT}"
    );

    if !exclude.outbound_ports.is_empty() {
        let _ = writeln!(
            r,
            "-A ISTIO_OUTPUT -p tcp -m multiport --dports {} -j RETURN",
            ports(&exclude.outbound_ports)
        );
    }
    for range in exclude
        .outbound_ip_ranges
        .iter()
        .filter(|range| family.holds(range))
    {
        let _ = writeln!(r, "-A ISTIO_OUTPUT -d {range} -j RETURN");
    }
    let _ = writeln!(
        r,
        "-A ISTIO_OUTPUT -s {} -o lo -j RETURN",
        family.passthrough_source()
    );
    if let Some(direct) =
        direct.filter(|d| !d.ports.is_empty() && family.holds(&d.pod_ip.to_string()))
    {
        let ip = direct.pod_ip;
        let _ = writeln!(
            r,
            "-A ISTIO_OUTPUT -s {ip} -d {ip} -o lo -p tcp -m multiport --dports {} -m owner --uid-owner {uid} -j RETURN",
            ports(&direct.ports)
        );
    }
    // The proxy talking to its own pod's IP over loopback is inbound traffic.
    let _ = writeln!(r, "-A ISTIO_OUTPUT ! -d {localhost} -o lo -p tcp -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT");
    let _ = writeln!(
        r,
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"
    );
    let _ = writeln!(r, "-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN");
    let _ = writeln!(r, "-A ISTIO_OUTPUT ! -d {localhost} -o lo -p tcp -m owner --gid-owner {uid} -j ISTIO_IN_REDIRECT");
    let _ = writeln!(
        r,
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {uid} -j RETURN"
    );
    let _ = writeln!(r, "-A ISTIO_OUTPUT -m owner --gid-owner {uid} -j RETURN");
    let _ = writeln!(r, "-A ISTIO_OUTPUT -d {localhost} -j RETURN");
    r.push_str("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n");
    let _ = writeln!(
        r,
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}"
    );
    r.push_str("COMMIT\n");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_come_before_the_redirects() {
        let r = rules(
            &Exclusions {
                outbound_ports: vec![5000, 8443],
                inbound_ports: vec![8081],
                outbound_ip_ranges: vec!["10.96.0.0/12".into()],
            },
            Family::Ipv4,
            None,
        );
        let at = |needle: &str| {
            r.find(needle)
                .unwrap_or_else(|| panic!("{needle} missing:\n{r}"))
        };
        assert!(at("--dports 5000,8443 -j RETURN") < at("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(at("-d 10.96.0.0/12 -j RETURN") < at("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(
            at("ISTIO_INBOUND -p tcp -m multiport --dports 8081 -j RETURN")
                < at("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
        );
        assert!(at("--uid-owner 1337 -j RETURN") < at("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        for port in ISTIO_INBOUND_EXCLUDED {
            at(&format!("--dport {port} -j RETURN"));
        }
        assert!(r.ends_with("COMMIT\n"));
    }

    #[test]
    fn no_exclusions_no_empty_port_lists() {
        let r = rules(&Exclusions::default(), Family::Ipv4, None);
        assert!(
            !r.contains("--dports  ") && !r.contains("--dports -j"),
            "{r}"
        );
        assert!(!r.contains("multiport"), "{r}");
    }

    #[test]
    fn ipv6_mirrors_ipv4_with_its_own_addresses() {
        let exclude = Exclusions {
            outbound_ip_ranges: vec!["10.96.0.0/12".into(), "fd00:96::/108".into()],
            ..Exclusions::default()
        };
        let v4 = rules(&exclude, Family::Ipv4, None);
        let v6 = rules(&exclude, Family::Ipv6, None);
        assert!(
            v6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
            "{v6}"
        );
        assert!(
            v6.contains("! -d ::1/128 -o lo -p tcp -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT")
        );
        assert!(v6.contains("-d fd00:96::/108 -j RETURN") && !v6.contains("10.96.0.0/12"));
        assert!(v4.contains("-d 10.96.0.0/12 -j RETURN") && !v4.contains("fd00:96::"));
        assert!(!v6.contains("127.0.0."), "{v6}");
        assert_eq!(v4.lines().count(), v6.lines().count());
    }

    #[test]
    fn a_direct_inbound_cluster_is_exempt_before_the_proxy_s_loopback_redirect() {
        let direct = DirectInbound {
            pod_ip: "10.246.1.12".parse().unwrap(),
            ports: vec![9080],
        };
        let r = rules(&Exclusions::default(), Family::Ipv4, Some(&direct));
        let exempt = r
            .find("-s 10.246.1.12 -d 10.246.1.12 -o lo -p tcp -m multiport --dports 9080 -m owner --uid-owner 1337 -j RETURN")
            .unwrap_or_else(|| panic!("{r}"));
        assert!(exempt < r.find("--uid-owner 1337 -j ISTIO_IN_REDIRECT").unwrap());
        // Not in the other family's rules.
        assert!(!rules(&Exclusions::default(), Family::Ipv6, Some(&direct)).contains("10.246.1.12"));
    }
}
