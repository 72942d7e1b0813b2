//! A real etcd cluster on loopback for the tests of the etcd store: Debian's
//! `etcd` (package `etcd-server`, installed by `scripts/test.sh`), each
//! member its own process with its own data dir and ports, killed with
//! SIGKILL and started again on its data dir like any other fault.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for};

/// One member's addresses, data and process.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A cluster of `etcd` members on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tls: Option<EtcdTlsFiles>,
}

/// The files of an etcd that serves clients over TLS and asks for their
/// certificates: a CA, the members' certificate (127.0.0.1) and a client
/// certificate, all PEM.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTlsFiles {
    fn generate(dir: &Path) -> EtcdTlsFiles {
        let ca = transport::pki::ClusterCa::generate("etcd test CA").expect("etcd CA");
        let ca = transport::pki::ClusterCa::load(&ca.cert_pem, &ca.key_pem).expect("load CA");
        let server = ca
            .issue_server(&["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server certificate");
        let client = ca
            .issue_client("miren-coordinator", time::Duration::hours(1))
            .expect("client certificate");
        let files = EtcdTlsFiles {
            ca: dir.join("etcd-ca.pem"),
            server_cert: dir.join("etcd-server.pem"),
            server_key: dir.join("etcd-server.key"),
            client_cert: dir.join("etcd-client.pem"),
            client_key: dir.join("etcd-client.key"),
        };
        for (path, pem) in [
            (&files.ca, ca.cert_pem().to_string()),
            (&files.server_cert, server.cert_pem.clone()),
            (&files.server_key, server.key_pem.clone()),
            (&files.client_cert, client.cert_pem.clone()),
            (&files.client_key, client.key_pem.clone()),
        ] {
            std::fs::write(path, pem).expect("write etcd TLS file");
        }
        files
    }
}

/// How long a member has to answer `/health` after it starts.
const READY: Duration = Duration::from_secs(30);

impl EtcdCluster {
    /// Starts `n` members keeping their data under `dir` and waits until
    /// the cluster has a leader.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        Self::start_with(dir, n, None)
    }

    /// Like [`EtcdCluster::start`], with clients served over TLS and
    /// required to present a certificate of the returned CA.
    pub fn start_tls(dir: &Path, n: usize) -> (EtcdCluster, EtcdTlsFiles) {
        let files = EtcdTlsFiles::generate(dir);
        (Self::start_with(dir, n, Some(files.clone())), files)
    }

    fn start_with(dir: &Path, n: usize, tls: Option<EtcdTlsFiles>) -> EtcdCluster {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.join(format!("etcd-m{i}")),
                log: dir.join(format!("etcd-m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            token: format!("miren-test-{}", std::process::id()),
            tls,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::File::create(&m.log).expect("etcd log file");
        let err = log.try_clone().expect("etcd log file");
        let client = format!("{}://127.0.0.1:{}", self.scheme(), m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Quick elections on loopback: a killed leader is replaced in
            // about a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start etcd (Debian package etcd-server; scripts/test.sh installs it)");
        self.members[i].child = Some(child);
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn wait_healthy(&self, i: usize) {
        let port = self.members[i].client_port;
        let healthy = || match &self.tls {
            None => health(port),
            Some(t) => Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(self.endpoint(i))
                .arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key)
                .args(["endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        };
        assert!(
            wait_for(READY, healthy),
            "etcd member {i} did not become healthy:\n{}",
            self.log(i)
        );
    }

    /// Client URLs of every member, comma-separated (for `--etcd`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    /// SIGKILLs member `i` and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir and waits until it is healthy
    /// (which needs a quorum of members running).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    /// Waits until member `i` answers healthy (it has a leader).
    pub fn wait_member(&self, i: usize) {
        self.wait_healthy(i);
    }

    /// What member `i` logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Whether the member on `port` says `/health` is true (it has a leader and
/// no alarm).
fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.starts_with("HTTP/1.") && body.contains(" 200 ") && body.contains("\"health\":\"true\"")
}

/// A second coordinator of `c`'s cluster, started with `args` (which
/// name the cluster's `--etcd`) under `dir` (data dir `coord-b`, client
/// config `b.yaml`): it joins with a code from `miren cluster
/// coordinator-code` through the first, as an operator does.
pub fn second_coordinator(
    c: &crate::Cluster,
    dir: &std::path::Path,
    args: &[&str],
) -> crate::Server {
    join_with_code(&c.cfg, &dir.join("coord-b"), &dir.join("b.yaml"), args)
}

/// Another coordinator of the cluster whose admin client config is
/// `admin_cfg`, joined with a fresh code: data dir `dir/<name>`, client
/// config `dir/<name>.yaml`, any free QUIC port, and `args` (with the
/// cluster's `--etcd`).
pub fn join_coordinator(
    admin_cfg: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    args: &[&str],
) -> crate::Server {
    join_with_code(
        admin_cfg,
        &dir.join(name),
        &dir.join(format!("{name}.yaml")),
        args,
    )
}

fn join_with_code(
    admin_cfg: &std::path::Path,
    data: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
) -> crate::Server {
    let code = crate::miren(admin_cfg, &["cluster", "coordinator-code"], &[]);
    assert!(code.ok, "{code:?}");
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--join", code.stdout.trim()]);
    crate::Server::start(data, config, "127.0.0.1:0", &full)
}
