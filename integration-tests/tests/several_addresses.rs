//! A cluster address that lists several coordinators under one pin
//! (`MIREN_CLUSTER='h1:8443,h2:8443;sha1:…'`, issue 18): the CLI reaches the
//! cluster through whichever of them answers, `cluster add` keeps them all,
//! a join code carries them to runners; a listed host that presents another
//! CA ends the dial with the mismatch (unless another listed coordinator
//! completed its handshake first), and when none answers the error names
//! each one with its reason.

use integration_tests::{free_port, miren, temp, wait_for, Cluster, Server};

/// The address the server printed, split into `host:port` and `sha1:<hex>`.
fn parts(s: &Server) -> (String, String) {
    let (hp, fp) = s.address.split_once(';').expect("address with a pin");
    (hp.to_string(), fp.to_string())
}

#[test]
fn the_cli_reaches_the_cluster_through_whichever_coordinator_answers() {
    let dir = temp();
    let cfg = dir.path().join("client.yaml");
    let server = Server::start(
        &dir.path().join("a"),
        &cfg,
        "127.0.0.1:0",
        &["--cluster-name", "alpha"],
    );
    let (live, pin) = parts(&server);
    let dead = format!("127.0.0.1:{}", free_port());
    let fresh = dir.path().join("fresh.yaml");

    // The first one listed is down: the next one answers.
    for address in [
        format!("{dead},{live};{pin}"),
        format!("{live},{dead};{pin}"),
    ] {
        let status = miren(
            &fresh,
            &["cluster", "status"],
            &[("MIREN_CLUSTER", &address)],
        );
        assert!(status.ok, "{address}: {status:?}");
        assert!(status.stdout.contains("alpha"), "{address}: {status:?}");
    }

    // None answers: each is named with its reason.
    let other_dead = format!("127.0.0.1:{}", free_port());
    let address = format!("{dead},{other_dead};{pin}");
    let none = miren(
        &fresh,
        &["cluster", "status"],
        &[("MIREN_CLUSTER", &address)],
    );
    assert!(!none.ok, "{none:?}");
    assert!(
        none.stderr.contains("could not reach any coordinator")
            && none.stderr.contains(&dead)
            && none.stderr.contains(&other_dead),
        "{none:?}"
    );

    // `cluster add` keeps every coordinator of the address.
    let added = miren(
        &fresh,
        &["cluster", "add", "prod", &format!("{dead},{live};{pin}")],
        &[],
    );
    assert!(added.ok, "{added:?}");
    let listed = miren(&fresh, &["cluster", "list", "-o", "json"], &[]);
    assert!(
        listed.stdout.contains(&format!("{dead},{live}")),
        "{listed:?}"
    );
    let status = miren(&fresh, &["cluster", "status"], &[]);
    assert!(status.ok && status.stdout.contains("alpha"), "{status:?}");
}

#[test]
fn a_listed_host_with_another_ca_is_reported_as_a_mismatch() {
    // The other host of the list never answers, so the dial's outcome is
    // the one host that does: a CA other than the pin, which must be said
    // as such (not folded into "could not reach any coordinator").
    let dir = temp();
    let ours = Server::start(
        &dir.path().join("a"),
        &dir.path().join("a.yaml"),
        "127.0.0.1:0",
        &[],
    );
    let theirs = Server::start(
        &dir.path().join("b"),
        &dir.path().join("b.yaml"),
        "127.0.0.1:0",
        &[],
    );
    let (_, pin) = parts(&ours);
    let (theirs_hp, _) = parts(&theirs);
    let dead = format!("127.0.0.1:{}", free_port());
    let fresh = dir.path().join("fresh.yaml");
    let address = format!("{dead},{theirs_hp};{pin}");
    let run = miren(
        &fresh,
        &["cluster", "status"],
        &[("MIREN_CLUSTER", &address)],
    );
    assert!(!run.ok, "another CA must not be accepted: {run:?}");
    assert!(
        run.stderr.contains("TLS certificate fingerprint mismatch"),
        "{run:?}"
    );
}

#[test]
fn a_join_code_carries_every_coordinator_to_the_runner() {
    // A join code made for an address with a second (here: unreachable)
    // coordinator listed first still joins through the live one, and the
    // runner keeps both for its later connections.
    let c = Cluster::start(0, &[]);
    let code = c.miren(&["runner", "token", "create"]);
    assert!(code.ok, "{code:?}");
    let token = identity::join_token::JoinToken::parse(code.stdout.trim()).expect("join code");
    let dead = identity::HostPort {
        host: "127.0.0.1".into(),
        port: free_port(),
    };
    let mut address = token.address.clone();
    address.alternates.push(address.primary());
    address.host = dead.host.clone();
    address.port = dead.port;
    let relisted = identity::join_token::JoinToken::new(token.id.clone(), address, token.secret)
        .expect("token with a pin");
    let runner_dir = c.path().join("r-multi");
    let r = integration_tests::RunnerProc::start(
        &runner_dir,
        Some(&relisted.encode()),
        &["--isolation", "none"],
    );
    assert!(
        wait_for(std::time::Duration::from_secs(60), || r
            .runner_id()
            .is_some()),
        "the runner did not join through the live coordinator: {}",
        r.output()
    );
}
