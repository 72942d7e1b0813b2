//! What `/metrics` reads at scrape time: runners and sandboxes by state,
//! seconds until the next signing-key rotation and until the certificates
//! expire, from the coordinator's own records ([`StateCollector`]), next
//! to the series [`crate::observe::Observe`] updates as things happen.

use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::apps::Apps;
use crate::issuer::Issuer;
use crate::metrics::{
    sandbox_state_label, seconds_until_rotation, CertLabel, StateLabel, SANDBOX_STATES,
};
use crate::observe::Observe;
use crate::runners::Registry;

fn encode_gauges<S: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (S, i64)>,
) -> Result<(), std::fmt::Error> {
    let family: Family<S, Gauge> = Family::default();
    for (labels, v) in values {
        family.get_or_create(&labels).set(v);
    }
    family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)
}

/// Reads the states at scrape time from the coordinator's records. It
/// holds them weakly: a registry that outlives its coordinator reads
/// nothing.
pub struct StateCollector {
    pub registry: Weak<Registry>,
    pub apps: Weak<Apps>,
    pub issuer: Weak<Issuer>,
    pub observe: Weak<Observe>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (Some(registry), Some(apps), Some(issuer), Some(observe)) = (
            self.registry.upgrade(),
            self.apps.upgrade(),
            self.issuer.upgrade(),
            self.observe.upgrade(),
        ) else {
            return Ok(());
        };
        let now = transport::clock::now_unix();
        if let Ok(runners) = registry.list(now) {
            let mut counts = [("ready", 0i64), ("cordoned", 0), ("down", 0)];
            for r in &runners {
                let i = match (r.connected, r.record.cordoned) {
                    (true, false) => 0,
                    (true, true) => 1,
                    (false, _) => 2,
                };
                counts[i].1 += 1;
            }
            encode_gauges(
                &mut encoder,
                "miren_runners",
                "Runners by state (ready, cordoned, down).",
                counts.map(|(s, n)| (StateLabel { state: s }, n)),
            )?;
        }
        if let Ok(states) = apps.sandbox_states() {
            let mut counts: Vec<(&'static str, i64)> =
                SANDBOX_STATES.iter().map(|s| (*s, 0)).collect();
            for reported in states {
                let label = sandbox_state_label(&reported);
                if let Some(c) = counts.iter_mut().find(|(s, _)| *s == label) {
                    c.1 += 1;
                }
            }
            encode_gauges(
                &mut encoder,
                "miren_sandboxes",
                "Sandboxes the coordinator placed, by the state their runner last reported.",
                counts
                    .into_iter()
                    .map(|(s, n)| (StateLabel { state: s }, n)),
            )?;
        }
        let rotation = issuer.keys.read().ok().and_then(|ring| {
            seconds_until_rotation(
                &ring.statuses(now),
                ring.active_since(now),
                observe.rotation_secs(),
                now,
            )
        });
        if let Some(secs) = rotation {
            let g: Gauge = Gauge::default();
            g.set(secs);
            g.encode(encoder.encode_descriptor(
                "miren_signing_key_rotation_seconds",
                "Seconds until the active signing key is replaced (negative: overdue).",
                None,
                g.metric_type(),
            )?)?;
        }
        let certs = observe.certificate_expiries();
        if !certs.is_empty() {
            encode_gauges(
                &mut encoder,
                "miren_certificate_expiry_seconds",
                "Seconds until the certificate the listeners present expires.",
                certs
                    .into_iter()
                    .map(|(c, not_after)| (CertLabel { certificate: c }, not_after - now)),
            )?;
        }
        Ok(())
    }
}

/// The registry `/metrics` encodes: every series of `observe` and the
/// states read at scrape time. Also records when the certificates the
/// listeners present expire (the server certificate's PEM, the operator's
/// `--https-cert` file if any).
pub fn registry(
    observe: &Arc<Observe>,
    collector: StateCollector,
    server_cert_pem: &str,
    https_cert: Option<&std::path::Path>,
) -> anyhow::Result<Arc<prometheus_client::registry::Registry>> {
    let server = transport::pki::not_after_unix(server_cert_pem)?;
    let https = match https_cert {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--https-cert {}: {e}", path.display()))?;
            transport::pki::not_after_unix(&pem).ok()
        }
        None => None,
    };
    observe.set_certificates(server, https);
    let mut r = prometheus_client::registry::Registry::default();
    if observe.enabled() {
        observe.metrics.register(&mut r);
        r.register_collector(Box::new(collector));
    }
    Ok(Arc::new(r))
}
