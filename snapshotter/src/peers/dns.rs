//! Membership from DNS (`[peers] dns`): a name whose A/AAAA records are the
//! nodes (a Kubernetes headless Service, say), resolved at start and every
//! `dns_refresh_secs` after, joined with the `static` list.
//!
//! A lookup that fails, or finds no address, keeps the last list: a DNS
//! outage leaves the cluster as it was rather than emptying it (reads then
//! go to the registry only because no peer is left, which is the safe
//! side, but a working cluster should not fall apart with its resolver).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use tarn_fs::peer::{MAX_MEMBERS, Peers};

/// A name to resolve into nodes, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMembers {
    /// `host:port`; the port is the nodes' peer port.
    pub name: String,
    pub every: Duration,
}

/// The nodes: `fixed` and the addresses `name` resolved to, each once, in
/// a stable order, at most [`MAX_MEMBERS`].
pub fn members_of(fixed: &[String], resolved: &[SocketAddr]) -> Vec<String> {
    let all: BTreeSet<String> = fixed
        .iter()
        .cloned()
        .chain(resolved.iter().map(SocketAddr::to_string))
        .collect();
    all.into_iter().take(MAX_MEMBERS).collect()
}

/// Resolves `dns.name` now and every `dns.every`, setting `peers`' members
/// to `fixed` and what it resolved to, until `stop` resolves.
pub async fn watch(
    peers: Peers,
    fixed: Vec<String>,
    dns: DnsMembers,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut last: Option<Vec<String>> = None;
    loop {
        match tokio::net::lookup_host(dns.name.as_str()).await {
            Ok(found) => {
                let found: Vec<SocketAddr> = found.take(MAX_MEMBERS).collect();
                if found.is_empty() {
                    tracing::warn!(name = %dns.name, "peers: the name has no address; keeping the last list");
                } else {
                    let members = members_of(&fixed, &found);
                    if last.as_ref() != Some(&members) {
                        tracing::info!(name = %dns.name, members = ?members, "peers: members from DNS");
                        peers.set_members(&members);
                        last = Some(members);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(name = %dns.name, error = %e, "peers: lookup failed; keeping the last list");
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(dns.every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tarn_fs::peer::PeerSettings;

    #[test]
    fn static_and_resolved_nodes_join_once_each_in_a_stable_order() {
        let fixed = vec!["10.0.0.9:7600".to_string(), "10.0.0.5:7600".to_string()];
        let resolved: Vec<SocketAddr> = vec![
            "10.0.0.6:7600".parse().unwrap(),
            "10.0.0.5:7600".parse().unwrap(),
            "[fd00::7]:7600".parse().unwrap(),
        ];
        assert_eq!(
            members_of(&fixed, &resolved),
            vec![
                "10.0.0.5:7600",
                "10.0.0.6:7600",
                "10.0.0.9:7600",
                "[fd00::7]:7600"
            ]
        );
        let many: Vec<SocketAddr> = (0..2000u16)
            .map(|i| {
                let [hi, lo] = i.to_be_bytes();
                SocketAddr::from(([10, 1, hi, lo], 7600))
            })
            .collect();
        assert_eq!(members_of(&[], &many).len(), MAX_MEMBERS);
    }

    #[tokio::test]
    async fn a_name_is_resolved_into_members_until_stopped() {
        let peers = Peers::new(PeerSettings {
            own: Some("127.0.0.1:7601".into()),
            members: Vec::new(),
            token: "t".into(),
            first_byte: Duration::from_secs(1),
            total: Duration::from_secs(5),
        })
        .unwrap();
        // `localhost` resolves without a DNS server (/etc/hosts).
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(watch(
            peers.clone(),
            vec!["127.0.0.9:7600".into()],
            DnsMembers {
                name: "localhost:7600".into(),
                every: Duration::from_millis(10),
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        // Bounded only as a failure bound: the first lookup sets them.
        tokio::time::timeout(Duration::from_secs(60), async {
            while !peers.members().iter().any(|m| m == "127.0.0.1:7600") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("members from the name");
        assert!(peers.members().iter().any(|m| m == "127.0.0.9:7600"));
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }
}
