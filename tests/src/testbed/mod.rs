//! A node in a box: what meshguard sees of a Kubernetes node, built for real. A node network
//! namespace holds a bridge (and stands for the host: kubelet probes come from it); each pod is a
//! network namespace with a veth on the bridge, an address and a default route. Each of a pod's
//! containers has its own cgroup v2 directory, laid out as the kubelet lays them out (systemd
//! cgroup driver, containerd), in which every one of its processes runs. Meshed pods run the real
//! Envoy as uid 1337 in their `istio-proxy` container behind Istio-style capture rules, with
//! certificates from a test CA.
//!
//! Everything a node makes is named after it, so [`Node::down`] removes it all by name, also
//! after a crash: the namespaces (and with them the links and iptables rules), the cgroups (and
//! with them every process), the state directory.

mod apps;
mod ca;
pub mod capture;
pub mod envoy;
pub mod podlist;
pub mod scenarios;
pub mod wire;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};

use crate::{run, sys::Cgroup};
pub use capture::Exclusions;

/// The uid Istio's proxy runs as, and which capture lets through.
pub const PROXY_UID: u32 = 1337;
/// The uid applications run as.
pub const APP_UID: u32 = 1000;
/// Debian's interpreter: readable by every uid (a per-user Python may not be).
pub const PYTHON: &str = "/usr/bin/python3";
const STATE_ROOT: &str = "/run/meshguard-testbed";
const CGROUP_DIR: &str = "meshguard-testbed";
/// The cluster's DNS domain: services are `<name>.<namespace>.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The sidecar's (and a gateway's) container, as Istio's injector names it.
pub const PROXY_CONTAINER: &str = "istio-proxy";
pub const PROXY_IMAGE: &str = "docker.io/istio/proxyv2:1.24.0";

/// How a meshed pod's sidecar treats inbound plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMode {
    /// mTLS only.
    Strict,
    /// mTLS or plaintext.
    Permissive,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mesh {
    None,
    Sidecar {
        inbound: InboundMode,
        /// Whether the capture rules were installed: a sidecar without them is the CNI race.
        capture: bool,
    },
    /// An ingress gateway: Envoy is the pod's only container, not injected and not captured;
    /// it takes plaintext on `port` and carries it with mTLS to `upstream`, as sidecars do.
    Gateway {
        port: u16,
        upstream: MeshPeer,
    },
}

/// Where sidecars differ between meshes, versions and installations; the default is Istio's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SidecarConfig {
    pub tls: TlsProfile,
    pub curves: Curves,
    pub inbound: InboundForward,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsProfile {
    /// Istio's `tls_params`: TLS 1.2 to 1.3, said explicitly.
    #[default]
    Istio,
    /// No `tls_params`: Envoy's own defaults, under which a client speaks at most TLS 1.2 and
    /// resumes with session tickets, so a resumed ClientHello carries the ticket (before ALPN).
    EnvoyDefaults,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Curves {
    /// BoringSSL's default groups: X25519MLKEM768 (post-quantum) first, whose key share takes
    /// a TLS 1.3 ClientHello past 1024 bytes.
    #[default]
    EnvoyDefault,
    /// `ecdh_curves: [X25519]`.
    X25519Only,
}

/// How the sidecar hands inbound connections to the application.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InboundForward {
    /// Istio since 1.10: to the original destination (the pod's IP), from 127.0.0.6 (`::6`).
    #[default]
    Passthrough,
    /// To the pod's IP from the pod's IP (no bind); the capture exempts these connections.
    PodIp,
    /// Istio before 1.10: a cluster per application port, to 127.0.0.1.
    Localhost,
}

/// A service the sidecar originates mTLS to, on one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    pub port: u16,
    pub service: String,
    pub namespace: String,
    pub service_account: String,
}

/// A server the pod's application runs (see `apps.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    /// Plain HTTP (also serves `/healthz`).
    Http(u16),
    /// HTTPS with a certificate of its own (not the mesh's).
    Tls(u16),
    /// UDP datagrams read and dropped.
    UdpSink(u16),
    /// DNS over UDP, answering A queries for the node's services.
    Dns(u16),
    /// OpenSSH's sshd.
    Ssh(u16),
}

impl App {
    pub fn port(self) -> u16 {
        match self {
            App::Http(port) | App::Tls(port) | App::UdpSink(port) | App::Dns(port) => port,
            App::Ssh(port) => port,
        }
    }

    /// The container port's name, which the pod's Service targets (Istio's protocol prefix,
    /// then the port).
    pub fn port_name(self) -> String {
        let protocol = match self {
            App::Http(_) => "http",
            App::Tls(_) => "https",
            App::UdpSink(_) => "udp",
            App::Dns(_) => "dns",
            App::Ssh(_) => "tcp-ssh",
        };
        format!("{protocol}-{}", self.port())
    }

    /// `TCP` or `UDP`, as a container port says it.
    pub fn protocol(self) -> &'static str {
        match self {
            App::UdpSink(_) | App::Dns(_) => "UDP",
            App::Http(_) | App::Tls(_) | App::Ssh(_) => "TCP",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The Deployment the pod belongs to.
    pub deployment: String,
    /// Labels beside `app: <deployment>` (and the mesh's own).
    pub labels: Vec<(String, String)>,
    pub mesh: Mesh,
    pub sidecar: SidecarConfig,
    /// Dual-stack: an IPv6 address beside the IPv4 one, captured and proxied alike.
    pub ipv6: bool,
    pub apps: Vec<App>,
    /// A readiness probe (HTTP GET `/healthz`) on this port.
    pub probe_port: Option<u16>,
    pub exclude: Exclusions,
    /// Services the sidecar knows as mesh destinations.
    pub mesh_peers: Vec<MeshPeer>,
    /// Mesh services a DestinationRule tells the sidecar to reach in plaintext (`tls.mode:
    /// DISABLE`, written beside the pods): a cluster of their own without TLS, as Istio
    /// configures it.
    pub plaintext_peers: Vec<MeshPeer>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account: name.to_string(),
            deployment: name.to_string(),
            labels: Vec::new(),
            mesh: Mesh::None,
            sidecar: SidecarConfig::default(),
            ipv6: false,
            apps: Vec::new(),
            probe_port: None,
            exclude: Exclusions::default(),
            mesh_peers: Vec::new(),
            plaintext_peers: Vec::new(),
        }
    }

    /// Whether the pod has an injected sidecar (a gateway has none: it is the proxy).
    pub fn meshed(&self) -> bool {
        matches!(self.mesh, Mesh::Sidecar { .. })
    }

    /// Whether Envoy runs in the pod: a sidecar or a gateway.
    pub fn runs_proxy(&self) -> bool {
        !matches!(self.mesh, Mesh::None)
    }

    /// The pod's containers in `spec.containers` order: the application (named after its
    /// deployment), then the sidecar the injector appends; a gateway's proxy alone.
    pub fn containers(&self) -> Vec<&str> {
        match self.mesh {
            Mesh::None => vec![&self.deployment],
            Mesh::Sidecar { .. } => vec![&self.deployment, PROXY_CONTAINER],
            Mesh::Gateway { .. } => vec![PROXY_CONTAINER],
        }
    }

    /// An Istio ingress gateway in `istio-system`, as its chart names it, carrying plaintext
    /// from `port` to `upstream`.
    pub fn ingress_gateway(port: u16, upstream: MeshPeer) -> Self {
        Self {
            mesh: Mesh::Gateway { port, upstream },
            service_account: "istio-ingressgateway-service-account".into(),
            ..PodSpec::new("istio-system", "istio-ingressgateway")
        }
    }
}

/// A running container: its cgroup is where the kubelet would put it, so a socket's cgroup
/// names the container that owns it.
pub struct Container {
    pub name: String,
    /// containerd's id: 64 lowercase hex digits.
    pub id: String,
    pub image: String,
    pub cgroup: Cgroup,
    pub started: SystemTime,
}

/// The cgroup of a container of a BestEffort pod, relative to the kubelet's cgroup root, as the
/// kubelet makes it with the systemd cgroup driver and containerd: a slice per QoS class, a slice
/// per pod (its uid with `-` as `_`, systemd's escape), a scope per container.
pub fn container_cgroup(pod_uid: &str, container_id: &str) -> PathBuf {
    Path::new("kubepods.slice/kubepods-besteffort.slice")
        .join(format!(
            "kubepods-besteffort-pod{}.slice",
            pod_uid.replace('-', "_")
        ))
        .join(format!("cri-containerd-{container_id}.scope"))
}

pub struct Pod {
    pub spec: PodSpec,
    /// `metadata.uid`.
    pub uid: String,
    pub ip: Ipv4Addr,
    /// A dual-stack pod's IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    pub netns: String,
    pub dir: PathBuf,
    /// In [`PodSpec::containers`] order.
    pub containers: Vec<Container>,
    /// The pod's long-running processes, reaped after teardown kills them.
    children: Vec<Child>,
}

impl Pod {
    /// `program` run inside the pod (its network namespace) as `uid`.
    pub fn command(&self, uid: u32, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, "setpriv"])
            .args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
            ])
            .arg(program);
        cmd
    }

    /// The container of this name.
    pub fn container(&self, name: &str) -> &Container {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name} in pod {}", self.spec.name))
    }

    /// The container `kubectl exec` picks by default: the first one, the application's.
    pub fn default_container(&self) -> &Container {
        &self.containers[0]
    }

    /// Runs `cmd` (from [`Pod::command`]) to completion in the pod's application container.
    pub fn run(&self, cmd: &mut Command) -> anyhow::Result<Output> {
        self.default_container().cgroup.run(cmd)
    }

    /// Runs `cmd` to completion in the named container.
    pub fn run_in(&self, container: &str, cmd: &mut Command) -> anyhow::Result<Output> {
        self.container(container).cgroup.run(cmd)
    }

    /// Starts a long-running process in the pod's application container, its output in
    /// `<pod dir>/<name>.log`.
    fn start(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
        let container = self.default_container().name.clone();
        self.start_in(&container, name, cmd)
    }

    /// Starts a long-running process in the named container.
    fn start_in(&mut self, container: &str, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let mut child = self.container(container).cgroup.spawn_logged(cmd, &log)?;
        thread::sleep(Duration::from_millis(10));
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} in pod {} exited at once ({status}): {}",
                self.spec.name,
                tail(&log)
            );
        }
        self.children.push(child);
        Ok(())
    }

    fn wait_listening(&self, app: App) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = app.port();
        let sockets = if app.protocol() == "UDP" {
            "-Hlun"
        } else {
            "-Hltn"
        };
        while Instant::now() < deadline {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "ss", sockets])
                .arg(format!("sport = :{port}"))
                .output()?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(25));
        }
        bail!(
            "nothing listens on {}:{port}; logs in {}",
            self.spec.name,
            self.dir.display()
        )
    }
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

pub struct Node {
    pub name: String,
    /// The node's own network namespace (the host side of the bridge).
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The node's IPv6 address on the bridge, when a pod is dual-stack.
    pub ip6: Option<Ipv6Addr>,
    pub pods: Vec<Pod>,
    pub dir: PathBuf,
    /// Processes of the node itself (probes, captures).
    pub cgroup: Cgroup,
    keep: bool,
}

/// Every pod of the node by service (its namespace and deployment) and IPv4 address.
struct Endpoints(Vec<(String, String, Ipv4Addr)>);

impl Endpoints {
    fn of(&self, namespace: &str, service: &str) -> Option<Ipv4Addr> {
        self.0
            .iter()
            .find(|(ns, name, _)| ns == namespace && name == service)
            .map(|(.., ip)| *ip)
    }

    /// `<service>.<namespace>.svc.cluster.local` and its address, for each.
    fn names(&self) -> impl Iterator<Item = (String, Ipv4Addr)> + '_ {
        self.0
            .iter()
            .map(|(ns, name, ip)| (format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"), *ip))
    }
}

/// The `i`th pod's IPv4 address on `10.<a>.<b>.0/24`.
fn pod_ipv4(subnet: [u8; 2], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, subnet[0], subnet[1], 10 + i as u8)
}

/// A pod's (or with `host` 1, the node's) IPv6 address on `fd00:<a>:<b>::/64`, its last group
/// written with the IPv4 address's last digits: `10.246.1.12` goes with `fd00:246:1::12`.
fn ipv6_address(subnet: [u8; 2], host: u8) -> Ipv6Addr {
    format!("fd00:{}:{}::{host}", subnet[0], subnet[1])
        .parse()
        .expect("a valid IPv6 address")
}

impl Node {
    /// Brings a node up with these pods on `10.<a>.<b>.0/24` (`subnet` = `[a, b]`), and
    /// dual-stack ones also on `fd00:<a>:<b>::/64`, replacing whatever an earlier run of the
    /// same name left.
    pub fn up(name: &str, subnet: [u8; 2], specs: Vec<PodSpec>) -> anyhow::Result<Node> {
        Node::down(name)?;
        let dir = Path::new(STATE_ROOT).join(name);
        fs::create_dir_all(&dir)?;
        for d in [Path::new(STATE_ROOT), &dir] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        }
        let ip = Ipv4Addr::new(10, subnet[0], subnet[1], 1);
        let netns = name.to_string();
        let mut node = Node {
            name: name.to_string(),
            netns: netns.clone(),
            ip,
            ip6: specs
                .iter()
                .any(|s| s.ipv6)
                .then(|| ipv6_address(subnet, 1)),
            pods: Vec::new(),
            cgroup: Cgroup::at(&Path::new(CGROUP_DIR).join(name).join("node"))?,
            dir,
            keep: false,
        };
        sh(&["ip", "netns", "add", &netns])?;
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "br0",
        ])?;
        if let Some(ip6) = node.ip6 {
            let ip6 = format!("{ip6}/64");
            sh(&[
                "ip", "-n", &netns, "addr", "add", &ip6, "dev", "br0", "nodad",
            ])?;
        }
        sh(&["ip", "-n", &netns, "link", "set", "br0", "up"])?;

        let ca = ca::Ca::new(&node.dir.join("ca"))?;
        // Addresses are known before any pod starts: a gateway is configured with its
        // upstream's, as Istio's control plane would send it the endpoints, and DNS answers.
        let endpoints = Endpoints(
            specs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        s.namespace.clone(),
                        s.deployment.clone(),
                        pod_ipv4(subnet, i),
                    )
                })
                .collect(),
        );
        for (i, spec) in specs.into_iter().enumerate() {
            let pod = node.add_pod(i, spec, &ca, subnet, &endpoints)?;
            node.pods.push(pod);
        }
        for pod in &node.pods {
            if pod.spec.runs_proxy() {
                wait_envoy_ready(pod)?;
            }
            for app in &pod.spec.apps {
                pod.wait_listening(*app)?;
            }
        }
        fs::write(
            node.dir.join("pods.json"),
            serde_json::to_string_pretty(&podlist::pod_list(&node))?,
        )?;
        Ok(node)
    }

    fn add_pod(
        &self,
        i: usize,
        spec: PodSpec,
        ca: &ca::Ca,
        subnet: [u8; 2],
        endpoints: &Endpoints,
    ) -> anyhow::Result<Pod> {
        let ip = pod_ipv4(subnet, i);
        let netns = format!("{}-{}", self.name, spec.name);
        let dir = self.dir.join(&spec.name);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let uid = podlist::pod_uid(&spec);
        let mut containers = Vec::new();
        for name in spec.containers() {
            let id = podlist::container_id(&spec, name);
            let cgroup = Cgroup::at(
                &Path::new(CGROUP_DIR)
                    .join(&self.name)
                    .join(container_cgroup(&uid, &id)),
            )?;
            containers.push(Container {
                name: name.to_string(),
                image: podlist::image(&spec, name),
                id,
                cgroup,
                started: SystemTime::now(),
            });
        }
        let mut pod = Pod {
            children: Vec::new(),
            uid,
            containers,
            ip,
            ip6: spec.ipv6.then(|| ipv6_address(subnet, ip.octets()[3])),
            netns: netns.clone(),
            dir,
            spec,
        };
        self.plug(&pod, &format!("v{i}"))?;
        if let Mesh::Sidecar { capture: true, .. } = pod.spec.mesh {
            install_capture(&pod)?;
        }
        match &pod.spec.mesh {
            Mesh::None => {}
            Mesh::Sidecar { .. } => start_proxy(&mut pod, ca, "sidecar", envoy::sidecar)?,
            Mesh::Gateway { upstream, .. } => {
                let address = endpoints
                    .of(&upstream.namespace, &upstream.service)
                    .with_context(|| {
                        format!("gateway upstream {} not on the node", upstream.service)
                    })?
                    .to_string();
                start_proxy(&mut pod, ca, "router", |spec, id, certs, log| {
                    envoy::gateway(spec, id, certs, log, &address)
                })?;
            }
        }
        for app in pod.spec.apps.clone() {
            apps::start(&mut pod, app, ca, endpoints)?;
        }
        Ok(pod)
    }

    /// The pod's network namespace, its veth on the bridge, its addresses and default routes.
    fn plug(&self, pod: &Pod, veth: &str) -> anyhow::Result<()> {
        let netns = pod.netns.as_str();
        sh(&["ip", "netns", "add", netns])?;
        sh(&["ip", "-n", netns, "link", "set", "lo", "up"])?;
        // As containerd sets up a pod's network namespace: applications may bind any port.
        sh(&[
            "ip",
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_unprivileged_port_start=0",
        ])?;
        sh(&[
            "ip",
            "-n",
            &self.netns,
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ])?;
        sh(&[
            "ip",
            "-n",
            &self.netns,
            "link",
            "set",
            veth,
            "master",
            "br0",
            "up",
        ])?;
        let addr = |addr: &str, flags: &[&str]| {
            sh(&[
                &["ip", "-n", netns, "addr", "add", addr, "dev", "eth0"],
                flags,
            ]
            .concat())
        };
        addr(&format!("{}/24", pod.ip), &[])?;
        if let Some(ip6) = pod.ip6 {
            // No duplicate address detection: the address is usable at once.
            addr(&format!("{ip6}/64"), &["nodad"])?;
        }
        sh(&["ip", "-n", netns, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip",
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &self.ip.to_string(),
        ])?;
        if let (Some(_), Some(gateway)) = (pod.ip6, self.ip6) {
            sh(&[
                "ip",
                "-n",
                netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ])?;
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on node {}", self.name))
    }

    /// `program` run on the node itself (its network namespace, as root): what kubelet does.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    /// Leaves the node running when this value is dropped (the demo).
    pub fn keep_running(mut self) {
        self.keep = true;
    }

    /// Removes everything a node of this name made: safe to call when none exists, and after
    /// a crash.
    pub fn down(name: &str) -> anyhow::Result<()> {
        // The node's cgroup and every one below it (kubepods slices, container scopes, the
        // node's own), deepest first, with their processes.
        drop(Cgroup::existing(
            crate::cgroup2_root()?.join(CGROUP_DIR).join(name),
        ));
        for ns in Node::namespaces(name)? {
            sh(&["ip", "netns", "del", &ns])?;
        }
        let dir = Path::new(STATE_ROOT).join(name);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        Ok(())
    }

    /// The network namespaces of a node of this name.
    pub fn namespaces(name: &str) -> anyhow::Result<Vec<String>> {
        let out = run(Command::new("ip").args(["netns", "list"]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|ns| *ns == name || ns.starts_with(&format!("{name}-")))
            .map(str::to_string)
            .collect())
    }

    /// What of a node of this name is still there, in words; empty when nothing is.
    pub fn leftovers(name: &str) -> anyhow::Result<Vec<String>> {
        let mut left: Vec<String> = Node::namespaces(name)?
            .into_iter()
            .map(|ns| format!("netns {ns}"))
            .collect();
        let cgroups = crate::cgroup2_root()?.join(CGROUP_DIR).join(name);
        if cgroups.exists() {
            left.push(format!("cgroup {}", cgroups.display()));
        }
        let dir = Path::new(STATE_ROOT).join(name);
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        Ok(left)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.keep {
            self.cgroup.keep();
            for container in self.pods.iter_mut().flat_map(|p| &mut p.containers) {
                container.cgroup.keep();
            }
            return;
        }
        if let Err(e) = Node::down(&self.name) {
            eprintln!("warning: tearing down node {}: {e:#}", self.name);
        }
        for pod in &mut self.pods {
            for child in &mut pod.children {
                let _ = child.wait();
            }
        }
    }
}

/// Issues the pod's workload certificate and starts Envoy with the bootstrap `config` makes,
/// in the `istio-proxy` container as the proxy's uid. `proxy_type` is Istio's node type
/// (`sidecar`, or `router` for a gateway).
fn start_proxy(
    pod: &mut Pod,
    ca: &ca::Ca,
    proxy_type: &str,
    config: impl FnOnce(&PodSpec, &str, &Path, &Path) -> String,
) -> anyhow::Result<()> {
    let certs = pod.dir.join("certs");
    ca.issue(
        &certs,
        &format!(
            "URI:{}",
            ca::spiffe_id(&pod.spec.namespace, &pod.spec.service_account)
        ),
        PROXY_UID,
    )?;
    let node_id = format!(
        "{proxy_type}~{}~{}.{}~{}.svc.cluster.local",
        pod.ip, pod.spec.name, pod.spec.namespace, pod.spec.namespace
    );
    let access_log = pod.dir.join("access.log");
    let config_path = pod.dir.join("envoy.yaml");
    fs::write(
        &config_path,
        config(&pod.spec, &node_id, &certs, &access_log),
    )?;
    fs::write(&access_log, "")?;
    std::os::unix::fs::chown(&access_log, Some(PROXY_UID), Some(PROXY_UID))?;
    pod.start_in(
        PROXY_CONTAINER,
        "envoy",
        pod.command(PROXY_UID, &envoy::envoy_path())
            .arg("-c")
            .arg(&config_path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .args(["--file-flush-interval-msec", "200"]),
    )
}

/// What istio-init installs: the nat rules for each of the pod's families, and for IPv6 the
/// `::6` address the sidecar hands inbound connections from.
fn install_capture(pod: &Pod) -> anyhow::Result<()> {
    let spec = &pod.spec;
    let app_ports = || spec.apps.iter().map(|a| a.port()).collect();
    let direct = |ip: IpAddr| {
        (spec.sidecar.inbound == InboundForward::PodIp).then(|| capture::DirectInbound {
            pod_ip: ip,
            ports: app_ports(),
        })
    };
    let mut families = vec![(capture::Family::Ipv4, direct(pod.ip.into()))];
    if let Some(ip6) = pod.ip6 {
        sh(&[
            "ip",
            "-n",
            &pod.netns,
            "addr",
            "add",
            &format!("{}/128", capture::INBOUND_PASSTHROUGH_SOURCE_V6),
            "dev",
            "lo",
        ])?;
        families.push((capture::Family::Ipv6, direct(ip6.into())));
    }
    for (family, direct) in families {
        let rules = capture::rules(&spec.exclude, family, direct.as_ref());
        let mut restore = Command::new("ip")
            .args(["netns", "exec", &pod.netns, family.restore(), "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        use std::io::Write as _;
        restore
            .stdin
            .take()
            .context("stdin")?
            .write_all(rules.as_bytes())?;
        let out = restore.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} in {}: {}",
                family.restore(),
                pod.netns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(args[0]).args(&args[1..])).map(drop)
}

/// Waits for Envoy's admin to say it is live, asking from the `istio-proxy` container as the
/// proxy's uid, as Istio's pilot-agent does beside it.
fn wait_envoy_ready(pod: &Pod) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let url = format!("http://127.0.0.1:{}/ready", envoy::ADMIN_PORT);
    let proxy = &pod.container(PROXY_CONTAINER).cgroup;
    while Instant::now() < deadline {
        let out = proxy
            .spawn(pod.command(PROXY_UID, "curl").args(["-s", "-m", "1", &url]))?
            .wait_with_output()?;
        if out.stdout.starts_with(b"LIVE") {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(25));
    }
    bail!(
        "Envoy in pod {} not ready after 15s: {}",
        pod.spec.name,
        tail(&pod.dir.join("envoy.log"))
    )
}
