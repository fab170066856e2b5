//! Traffic capture equivalent to what Istio's init container installs in a meshed pod: every
//! outbound TCP connection to the sidecar's port 15001, except the proxy's own (its uid) and
//! loopback; every inbound one to 15006, except Istio's own ports; honouring the pod's
//! `traffic.sidecar.istio.io/exclude*` annotations. As an `iptables-restore` input.

use std::fmt::Write as _;

use super::PROXY_UID;

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// Ports istio-init never redirects inbound: HBONE, Envoy's Prometheus, health and agent ports.
pub const ISTIO_INBOUND_EXCLUDED: [u16; 4] = [15008, 15090, 15021, 15020];
/// The source address the sidecar uses for inbound traffic it hands to the application.
pub const INBOUND_PASSTHROUGH_SOURCE: &str = "127.0.0.6";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub outbound_ports: Vec<u16>,
    pub inbound_ports: Vec<u16>,
    pub outbound_ip_ranges: Vec<String>,
}

fn ports(list: &[u16]) -> String {
    list.iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The nat table rules, as `iptables-restore --noflush` reads them.
pub fn rules(exclude: &Exclusions) -> String {
    let uid = PROXY_UID;
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
    for range in &exclude.outbound_ip_ranges {
        let _ = writeln!(r, "-A ISTIO_OUTPUT -d {range} -j RETURN");
    }
    let _ = writeln!(
        r,
        "-A ISTIO_OUTPUT -s {INBOUND_PASSTHROUGH_SOURCE}/32 -o lo -j RETURN"
    );
    // The proxy talking to its own pod's IP over loopback is inbound traffic.
    let _ = writeln!(r, "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT");
    let _ = writeln!(
        r,
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"
    );
    let _ = writeln!(r, "-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN");
    let _ = writeln!(r, "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner {uid} -j ISTIO_IN_REDIRECT");
    let _ = writeln!(
        r,
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {uid} -j RETURN"
    );
    let _ = writeln!(r, "-A ISTIO_OUTPUT -m owner --gid-owner {uid} -j RETURN");
    r.push_str("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n");
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
        let r = rules(&Exclusions {
            outbound_ports: vec![5000, 8443],
            inbound_ports: vec![8081],
            outbound_ip_ranges: vec!["10.96.0.0/12".into()],
        });
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
        let r = rules(&Exclusions::default());
        assert!(
            !r.contains("--dports  ") && !r.contains("--dports -j"),
            "{r}"
        );
        assert!(!r.contains("multiport"), "{r}");
    }
}
