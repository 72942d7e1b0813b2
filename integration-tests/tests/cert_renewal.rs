//! Certificates against time, on real processes: the coordinator renews its
//! server certificate with the same CA at start (a data dir holding a
//! certificate with two days left, as a year-old coordinator would) and
//! while running (the hidden `--server-cert-lifetime`, 30 s), without
//! cutting open connections; pinned clients never notice, because they pin
//! the CA. `cluster status` shows both expiries, and `cluster admin-renew`
//! replaces the CLI's admin identity with a fresh key while the old
//! certificate keeps working.

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use identity::{ClusterAddress, Fingerprint};
use integration_tests::{miren, temp, Server};
use rustls::pki_types::{CertificateDer, ServerName};
use schema::miren_capnp::cluster;
use transport::pki::{self, ClusterCa};
use transport::tls::ServerTrust;

const DAY: i64 = 86_400;

fn now() -> i64 {
    transport::clock::now_unix()
}

/// The leaf certificate the HTTPS listener presents to a client pinning
/// `fp` (the same verification every CLI, runner and CI job does).
fn https_leaf(host_port: &str, fp: Fingerprint) -> Vec<u8> {
    let tls = transport::tls::client_config(&ServerTrust::Pinned(fp), None, &[b"http/1.1"])
        .expect("client config");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(tls.config), name).expect("client");
    let mut sock = TcpStream::connect(host_port).expect("connect HTTPS");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).expect("pinned TLS handshake");
    }
    conn.peer_certificates().expect("server chain")[0].to_vec()
}

/// The leaf a QUIC connection's handshake presented.
fn quic_leaf(conn: &quinn::Connection) -> Vec<u8> {
    let any = conn.peer_identity().expect("server identity");
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .expect("a certificate chain");
    chain[0].to_vec()
}

fn not_after(der: &[u8]) -> i64 {
    pki::validity_of_der(der).expect("validity").1
}

fn status(config: &Path, cluster: &str) -> serde_json::Value {
    let run = miren(
        config,
        &["cluster", "status", "-o", "json"],
        &[("MIREN_CLUSTER", cluster)],
    );
    assert!(run.ok, "{run:?}");
    serde_json::from_str(&run.stdout).expect("status JSON")
}

fn disk_leaf(data: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(data.join("server.crt")).expect("server.crt");
    pki::cert_der_from_pem(&pem).expect("cert").to_vec()
}

#[test]
fn a_near_expiry_server_certificate_is_renewed_at_start() {
    let dir = temp();
    let cfg = dir.path().join("admin.yaml");
    let ci_cfg = dir.path().join("ci.yaml");
    let data = dir.path().join("data");
    let first = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let cluster = first.address.clone();
    let addr: ClusterAddress = cluster.parse().expect("address");
    let fp = addr.fingerprint.expect("pinned");
    let initial = https_leaf(first.host_port(), fp);
    let doc = status(&ci_cfg, &cluster);
    assert_eq!(doc["identity"], "anonymous");
    let shown = doc["server_cert_expires_unix"].as_i64().expect("expiry");
    assert_eq!(shown, not_after(&initial));
    assert!(shown > now() + 364 * DAY && shown <= now() + 366 * DAY);
    assert!(doc.get("admin_cert_expires_unix").is_none());
    let (ok, err) = first.stop();
    assert!(ok, "{err}");

    // What a coordinator started a year ago holds: a certificate of its
    // CA, for the same names, with two days left.
    let ca = ClusterCa::load(
        &std::fs::read_to_string(data.join("ca.crt")).expect("ca.crt"),
        &std::fs::read_to_string(data.join("ca.key")).expect("ca.key"),
    )
    .expect("CA");
    let names: Vec<String> = std::fs::read_to_string(data.join("server.names"))
        .expect("server.names")
        .lines()
        .map(String::from)
        .collect();
    let old = ca
        .issue_server_for(&names, time::Duration::days(2))
        .expect("old certificate");
    std::fs::write(data.join("server.key"), &old.key_pem).expect("key");
    std::fs::write(data.join("server.crt"), &old.cert_pem).expect("crt");
    let old_der = pki::cert_der_from_pem(&old.cert_pem).expect("der").to_vec();
    assert!(not_after(&old_der) < now() + 3 * DAY);

    let second = Server::start(&data, &cfg, &format!("127.0.0.1:{}", addr.port), &[]);
    assert_eq!(second.address, cluster, "the pin or the port changed");
    let served = https_leaf(second.host_port(), fp);
    assert_ne!(served, old_der, "the two-day certificate is still served");
    assert_ne!(served, initial);
    assert!(not_after(&served) > now() + 364 * DAY);
    assert_eq!(disk_leaf(&data), served, "the renewal was not written");

    // The same MIREN_CLUSTER as before: the pinned CLI connects, over
    // QUIC, and is shown the renewed certificate's expiry.
    let doc = status(&ci_cfg, &cluster);
    assert_eq!(
        doc["server_cert_expires_unix"].as_i64(),
        Some(not_after(&served))
    );
    let doc = status(&cfg, &cluster);
    assert_eq!(doc["identity"], "admin");
    let admin_end = doc["admin_cert_expires_unix"]
        .as_i64()
        .expect("admin expiry");
    assert!(admin_end > now() + 9 * 365 * DAY, "{doc}");
    let table = miren(&cfg, &["cluster", "status"], &[("MIREN_CLUSTER", &cluster)]);
    assert!(table.ok, "{table:?}");
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("Server cert") && l.contains("expires ") && l.ends_with("d)")),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.lines().any(|l| l.starts_with("Admin cert")),
        "{}",
        table.stdout
    );
}

#[test]
fn a_short_lived_server_certificate_is_renewed_while_running() {
    let dir = temp();
    let cfg = dir.path().join("admin.yaml");
    let ci_cfg = dir.path().join("ci.yaml");
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &cfg,
        "127.0.0.1:0",
        &["--server-cert-lifetime", "30s"],
    );
    let cluster = server.address.clone();
    let addr: ClusterAddress = cluster.parse().expect("address");
    let fp = addr.fingerprint.expect("pinned");
    let host_port = server.host_port().to_string();
    let ca_before = std::fs::read(data.join("ca.crt")).expect("ca.crt");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let (data_in, cluster_in) = (data.clone(), cluster.clone());
    local.block_on(&rt, async move {
        let (data, cluster) = (data_in, cluster_in);
        // A connection opened before the renewal, with an RPC session.
        let (_endpoint, conn) = transport::dial(&addr, None).await.expect("dial");
        let initial = quic_leaf(&conn);
        assert!(not_after(&initial) <= now() + 31);
        let client: cluster::Client = transport::rpc::connect_connection(&conn)
            .await
            .expect("bootstrap");
        let info = |client: cluster::Client| async move {
            let reply = client.info_request().send().promise.await?;
            Ok::<String, capnp::Error>(reply.get()?.get_info()?.get_name()?.to_string()?)
        };
        info(client.clone()).await.expect("info before");
        let before = {
            let (c, cl) = (ci_cfg.clone(), cluster.clone());
            tokio::task::spawn_blocking(move || status(&c, &cl))
                .await
                .expect("status")
        };
        assert_eq!(
            before["server_cert_expires_unix"].as_i64(),
            Some(not_after(&initial))
        );

        // A third of 30 s is left after about 20 s; checks run every second.
        let deadline = Instant::now() + Duration::from_secs(60);
        let renewed = loop {
            let hp = host_port.clone();
            let leaf = tokio::task::spawn_blocking(move || https_leaf(&hp, fp))
                .await
                .expect("handshake");
            if leaf != initial {
                break leaf;
            }
            assert!(
                Instant::now() < deadline,
                "the server certificate was not renewed within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(not_after(&renewed) > not_after(&initial));

        // New QUIC handshakes present a renewed certificate too...
        let (_endpoint2, conn2) = transport::dial(&addr, None).await.expect("dial again");
        let quic_now = quic_leaf(&conn2);
        assert_ne!(quic_now, initial);
        conn2.close(transport::close::CloseCode::Done.into(), b"done");
        // ...while the connection from before carries on.
        assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
        info(client)
            .await
            .expect("the old connection still answers");

        // The pinned CLI, same MIREN_CLUSTER: connects and sees a later end.
        let after = {
            let (c, cl) = (ci_cfg.clone(), cluster.clone());
            tokio::task::spawn_blocking(move || status(&c, &cl))
                .await
                .expect("status")
        };
        let shown = after["server_cert_expires_unix"].as_i64().expect("expiry");
        assert!(shown > not_after(&initial), "{after}");
        assert_ne!(disk_leaf(&data), initial, "the renewal was not written");
        conn.close(transport::close::CloseCode::Done.into(), b"done");
    });
    // Same CA, same fingerprint, same address.
    assert_eq!(
        std::fs::read(data.join("ca.crt")).expect("ca.crt"),
        ca_before
    );
    let exported = miren(&cfg, &["cluster", "export-address"], &[]);
    assert!(exported.ok, "{exported:?}");
    assert_eq!(exported.stdout.trim(), cluster);
    let (ok, err) = server.stop();
    assert!(ok, "{err}");
}

#[test]
fn admin_renew_gives_a_fresh_identity_and_the_old_one_still_works() {
    let dir = temp();
    let cfg = dir.path().join("admin.yaml");
    let data = dir.path().join("data");
    let server = Server::start(&data, &cfg, "127.0.0.1:0", &[]);
    let cluster = server.address.clone();
    let port = cluster.parse::<ClusterAddress>().expect("address").port;
    let old_cfg = dir.path().join("old-admin.yaml");
    std::fs::copy(&cfg, &old_cfg).expect("copy the config");
    let entry = |path: &Path| -> serde_yaml_ng::Value {
        let text = std::fs::read_to_string(path).expect("config");
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("yaml");
        let name = doc["active_cluster"].as_str().expect("active").to_string();
        doc["clusters"][name.as_str()].clone()
    };
    let old_entry = entry(&cfg);

    // Below the floor: refused, nothing written.
    let short = miren(&cfg, &["cluster", "admin-renew", "--validity", "10m"], &[]);
    assert!(!short.ok);
    assert!(short.stderr.contains("at least 1h"), "{}", short.stderr);
    assert_eq!(entry(&cfg), old_entry);

    let renew = miren(&cfg, &["cluster", "admin-renew", "--validity", "30d"], &[]);
    assert!(renew.ok, "{renew:?}");
    assert!(
        renew.stdout.contains("Renewed the admin identity"),
        "{}",
        renew.stdout
    );
    let new_entry = entry(&cfg);
    assert_ne!(new_entry["client_cert"], old_entry["client_cert"]);
    assert_ne!(new_entry["client_key"], old_entry["client_key"]);
    assert_eq!(new_entry["hostname"], old_entry["hostname"]);
    assert_eq!(new_entry["fingerprint"], old_entry["fingerprint"]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cfg).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let doc = status(&cfg, &cluster);
    assert_eq!(doc["identity"], "admin");
    let end = doc["admin_cert_expires_unix"].as_i64().expect("expiry");
    assert!(
        end > now() + 29 * DAY && end <= now() + 30 * DAY + 60,
        "{doc}"
    );
    // The old certificate works until it expires (there is no revocation
    // of admin certificates yet).
    let doc = status(&old_cfg, &cluster);
    assert_eq!(doc["identity"], "admin");
    assert!(doc["admin_cert_expires_unix"].as_i64().expect("expiry") > now() + 9 * 365 * DAY);

    // A restart writes its client config again, but keeps the renewed
    // identity rather than putting the data dir's back.
    let (ok, err) = server.stop();
    assert!(ok, "{err}");
    let again = Server::start(&data, &cfg, &format!("127.0.0.1:{port}"), &[]);
    assert_eq!(again.address, cluster);
    assert_eq!(entry(&cfg)["client_cert"], new_entry["client_cert"]);
    let doc = status(&cfg, &cluster);
    assert_eq!(doc["identity"], "admin");

    // Without the admin identity there is nothing to renew.
    let anon = miren(
        &dir.path().join("ci.yaml"),
        &["cluster", "admin-renew"],
        &[("MIREN_CLUSTER", &cluster)],
    );
    assert!(!anon.ok);
    assert!(
        anon.stderr.contains("configured cluster"),
        "{}",
        anon.stderr
    );
}
