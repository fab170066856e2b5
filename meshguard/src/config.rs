//! Settings the agent and the CLI share.

/// Where the agent serves its API and the CLI looks for it.
pub const DEFAULT_SOCKET: &str = "/run/meshguard/meshguard.sock";
/// Where the agent pins its programs and maps, and `meshguard uninstall` looks for them.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshguard";
