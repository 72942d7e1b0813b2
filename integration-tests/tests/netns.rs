//! Several hosts: the coordinator and two runners in their own network
//! namespaces, joined by a bridge, each with its own address. One runner's
//! link is cut and restored; it must come back by itself.
//!
//! Needs root and iproute2; where namespaces cannot be made the test prints
//! why and passes without running (the loopback journeys still run).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{miren_bin, temp, wait_for, RunnerProc};

struct Net {
    prefix: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// hub (bridge) + coord 10.77.0.1 + r1 10.77.0.11 + r2 10.77.0.12.
    fn create() -> Result<Net, String> {
        let prefix = format!("mt{}", std::process::id() % 100000);
        let net = Net { prefix };
        let hub = net.ns("hub");
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (host, addr) in [
            ("c", "10.77.0.1"),
            ("r1", "10.77.0.11"),
            ("r2", "10.77.0.12"),
        ] {
            let ns = net.ns(host);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let peer = format!("p-{host}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
                &hub,
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &hub, "link", "set", &peer, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &peer, "up"])?;
        }
        Ok(net)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn exec(&self, host: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(miren_bin());
        c
    }

    fn set_link(&self, host: &str, up: bool) {
        ip(&[
            "-n",
            &self.ns("hub"),
            "link",
            "set",
            &format!("p-{host}"),
            if up { "up" } else { "down" },
        ])
        .expect("toggling the link");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in ["c", "r1", "r2", "hub"] {
            let _ = ip(&["netns", "del", &self.ns(host)]);
        }
    }
}

fn miren_in(net: &Net, cfg: &Path, args: &[&str]) -> (bool, String, String) {
    let out = net
        .exec("c")
        .args(args)
        .env("MIREN_CONFIG", cfg)
        .env_remove("MIREN_CLUSTER")
        .output()
        .expect("miren");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(net: &Net, cfg: &Path, id: &str) -> Option<String> {
    let (ok, out, _) = miren_in(net, cfg, &["runner", "list", "-o", "json"]);
    if !ok {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v.as_array()?
        .iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["status"].as_str().map(str::to_string))
}

#[test]
fn coordinator_and_runners_on_separate_hosts() {
    let net = match Net::create() {
        Ok(n) => n,
        Err(why) => {
            println!("SKIPPED: network namespaces cannot be made here: {why}");
            return;
        }
    };
    let dir = temp();
    let cfg = dir.path().join("c.yaml");
    let stdout = std::fs::File::create(dir.path().join("coord.log")).unwrap();
    let mut coord = net
        .exec("c")
        .args(["server", "--data-dir"])
        .arg(dir.path().join("coord"))
        .args(["--listen", "10.77.0.1:8443", "--name", "10.77.0.1"])
        .env("MIREN_CONFIG", &cfg)
        .stdout(stdout.try_clone().unwrap())
        .stderr(stdout)
        .spawn()
        .expect("server");
    let log = dir.path().join("coord.log");
    assert!(
        wait_for(Duration::from_secs(30), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("export MIREN_CLUSTER=")),
        "coordinator did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let (ok, addr, _) = miren_in(&net, &cfg, &["cluster", "export-address"]);
    assert!(ok);
    assert!(addr.starts_with("10.77.0.1:8443;sha1:"), "{addr}");

    let (ok, code, err) = miren_in(&net, &cfg, &["runner", "token", "create", "--reusable"]);
    assert!(ok, "{err}");
    let code = code.trim().to_string();
    let r1 = RunnerProc::start_with(
        net.exec("r1"),
        &dir.path().join("r1"),
        Some(&code),
        &["--name", "r1"],
    );
    let r2 = RunnerProc::start_with(
        net.exec("r2"),
        &dir.path().join("r2"),
        Some(&code),
        &["--name", "r2"],
    );
    assert!(
        wait_for(Duration::from_secs(30), || r1.runner_id().is_some()
            && r2.runner_id().is_some()),
        "runners did not join: {}\n{}",
        r1.output(),
        r2.output()
    );
    let (id1, id2) = (r1.runner_id().unwrap(), r2.runner_id().unwrap());
    assert!(wait_for(Duration::from_secs(30), || status(
        &net, &cfg, &id1
    )
    .as_deref()
        == Some("ready")
        && status(&net, &cfg, &id2).as_deref() == Some("ready")));

    // Cut r1's link: it goes down, r2 stays ready.
    net.set_link("r1", false);
    assert!(
        wait_for(Duration::from_secs(40), || status(&net, &cfg, &id1)
            .as_deref()
            == Some("down")),
        "r1 not marked down after its link was cut"
    );
    assert_eq!(status(&net, &cfg, &id2).as_deref(), Some("ready"));
    // Restore it: r1 comes back without anyone touching it.
    net.set_link("r1", true);
    assert!(
        wait_for(Duration::from_secs(60), || status(&net, &cfg, &id1)
            .as_deref()
            == Some("ready")),
        "r1 did not come back: {}",
        r1.output()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &coord.id().to_string()])
        .status();
    let _ = coord.wait();
}
