//! A test certificate authority, made when the node comes up, issuing Istio-style workload
//! certificates: a SPIFFE URI SAN (`spiffe://cluster.local/ns/<ns>/sa/<sa>`), usable for both
//! ends of mTLS. Keys are RSA 2048, as Istio's default CA issues them (root and workloads): the
//! certificates' size is what sizes TLS session tickets, and so the ClientHellos that carry them.

use std::{
    fs,
    os::unix::fs::{chown, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use crate::run;

pub const TRUST_DOMAIN: &str = "cluster.local";

pub struct Ca {
    key: PathBuf,
    cert: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    run(Command::new("openssl").args(args).current_dir(dir)).map(drop)
}

const RSA_KEY: [&str; 2] = ["-newkey", "rsa:2048"];

impl Ca {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut args = vec!["req", "-x509", "-nodes", "-days", "30"];
        args.extend(RSA_KEY);
        args.extend([
            "-subj",
            "/O=meshguard testbed/CN=meshguard testbed root CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        openssl(&args, dir)?;
        Ok(Self {
            key: dir.join("ca.key"),
            cert: dir.join("ca.crt"),
        })
    }

    /// Issues a certificate into `dir` as `cert-chain.pem`, `key.pem` and `root-cert.pem` (the
    /// names istio-proxy uses), readable by `owner` only.
    pub fn issue(&self, dir: &Path, subject_alt_name: &str, owner: u32) -> anyhow::Result<()> {
        fs::create_dir_all(dir)?;
        let mut args = vec!["req", "-new", "-nodes"];
        args.extend(RSA_KEY);
        args.extend([
            "-subj",
            "/O=cluster.local",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
        ]);
        openssl(&args, dir)?;
        fs::write(
            dir.join("ext.cnf"),
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n\
                 subjectAltName=critical,{subject_alt_name}\n"
            ),
        )?;
        let (ca_cert, ca_key) = (self.cert.to_string_lossy(), self.key.to_string_lossy());
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "req.csr",
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                "ext.cnf",
                "-out",
                "cert-chain.pem",
            ],
            dir,
        )?;
        fs::copy(&self.cert, dir.join("root-cert.pem"))?;
        for file in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
            chown(dir.join(file), Some(owner), Some(owner))?;
        }
        fs::set_permissions(dir.join("key.pem"), fs::Permissions::from_mode(0o600))?;
        Ok(())
    }
}

pub fn spiffe_id(namespace: &str, service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}")
}
