//! The operator console's state in a three-node cluster (docs/CONSOLE.md): every node lists the
//! members and the same leader; the leader knows how far each follower's log is behind, and that
//! lag returns to zero once a write is replicated.

use anyhow::Result;
use serde_json::Value;
use switchboard_e2e::{eventually, http_get, http_request, start_cluster, ClusterNode};

#[tokio::test]
async fn the_console_shows_the_cluster_nodes_leader_and_replication_lag() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = start_cluster(dir.path(), 3, &[])?;
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}/console/api/state", n.process().admin_url()))
        .collect();
    // Every node agrees on one leader among the three members.
    let leader = eventually("one leader seen by every node's console", || async {
        let mut leaders = Vec::new();
        for url in &urls {
            let state: Value = serde_json::from_str(&http_get(url).await.ok()?.body).ok()?;
            if state["cluster"]["nodes"].as_array()?.len() != 3 {
                return None;
            }
            leaders.push(state["cluster"]["leader"].as_u64()?);
        }
        leaders.windows(2).all(|w| w[0] == w[1]).then(|| leaders[0])
    })
    .await?;

    // A write through the leader, then the leader's console shows every follower caught up.
    let leader_node = &nodes[usize::try_from(leader)? - 1];
    let published = http_request(
        "POST",
        &format!("{}/v1/publish", leader_node.url()),
        &[],
        br#"{"channel":"console.check","payload":1}"#,
    )
    .await?;
    assert_eq!(published.status, 200, "{}", published.body);
    let state = eventually("replication lag 0 on the leader's console", || async {
        let url = &urls[usize::try_from(leader).ok()? - 1];
        let state: Value = serde_json::from_str(&http_get(url).await.ok()?.body).ok()?;
        let nodes = state["cluster"]["nodes"].as_array()?;
        let caught_up = nodes.iter().all(|n| n["replication_lag"] == 0)
            && state["channels"]
                .as_array()?
                .iter()
                .any(|c| c["channel"] == "console.check");
        caught_up.then_some(state)
    })
    .await?;
    let nodes = state["cluster"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        nodes.iter().filter(|n| n["leader"] == true).count(),
        1,
        "{state}"
    );
    assert!(
        nodes
            .iter()
            .all(|n| n["raft_addr"].as_str().is_some_and(|a| !a.is_empty())),
        "{state}"
    );
    Ok(())
}

/// A read replica (a learner never promoted) is shown as one: role "replica" on its own console and
/// on the leader's, the voters "leader" and "voter".
#[tokio::test]
async fn the_console_shows_a_replica_as_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = start_cluster(dir.path(), 3, &[])?;
    let client = switchboard_client::Client::connect(nodes[0].url()).await?;
    // Settled: a leader, and every member has announced its public address (a leader change
    // right after the start may otherwise meet the AddLearner below and retry it).
    let status = eventually("a leader and every member announced", || async {
        let status = client.cluster_status().await.ok()?;
        let announced =
            status.nodes.len() == 3 && status.nodes.iter().all(|n| !n.public_address.is_empty());
        (status.leader_id != 0 && announced).then_some(status)
    })
    .await?;
    let raft_port = switchboard_e2e::free_loopback_ports(1)?[0];
    let raft_addr = format!("127.0.0.1:{raft_port}");
    let replica = ClusterNode::start(dir.path(), 4, &raft_addr, "", &[])?;
    client
        .cluster_add_learner(4, raft_addr, replica.process().addr.to_string())
        .await?;
    let leader = &nodes[usize::try_from(status.leader_id)? - 1];
    for (what, node) in [
        ("the replica's console", &replica),
        ("the leader's", leader),
    ] {
        let url = format!("{}/console/api/state", node.process().admin_url());
        let roles = eventually(what, || async {
            let state: Value = serde_json::from_str(&http_get(&url).await.ok()?.body).ok()?;
            let nodes = state["cluster"]["nodes"].as_array()?.clone();
            let roles: Vec<(u64, String)> = nodes
                .iter()
                .filter_map(|n| Some((n["id"].as_u64()?, n["role"].as_str()?.to_owned())))
                .collect();
            (roles.len() == 4 && roles.iter().any(|(_, r)| r == "leader")).then_some(roles)
        })
        .await?;
        // One leader among the voters (whichever leads by now), the others voters, 4 a replica.
        let role = |id: u64| {
            roles
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, r)| r.as_str())
        };
        assert_eq!(role(4), Some("replica"), "{roles:?} on {what}");
        let voters: Vec<&str> = (1..=3).filter_map(role).collect();
        let mut sorted = voters.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ["leader", "voter", "voter"], "{roles:?} on {what}");
    }
    Ok(())
}
