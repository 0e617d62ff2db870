//! The operator console's state in a three-node cluster (docs/CONSOLE.md): every node lists the
//! members and the same leader; the leader knows how far each follower's log is behind, and that
//! lag returns to zero once a write is replicated. And the history behind its charts: it follows
//! the load and stays bounded.

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

/// The charts' subscription cap and ring length, as docs/CONSOLE.md states them.
const MAX_SUBSCRIPTION_SERIES: usize = 16;
const HISTORY_POINTS: u64 = 300;

/// What a rate series adds up to: the sum of rate × interval over its points, i.e. the count of
/// events it has seen.
fn integrated(history: &Value, series: &str) -> f64 {
    let times = history["times_us"].as_array().cloned().unwrap_or_default();
    let values = history[series].as_array().cloned().unwrap_or_default();
    times
        .windows(2)
        .zip(values.iter().skip(1))
        .filter_map(|(t, v)| {
            let seconds = (t[1].as_f64()? - t[0].as_f64()?) / 1e6;
            Some(v.as_f64()? * seconds)
        })
        .sum()
}

/// Publishes, deliveries and refusals under load show in the history's rate series (added up
/// over time, they count what the test did), the latency series has a point, every series is
/// as long as the time axis and no longer than the ring, and of more subscriptions than the cap
/// only the cap has a lag series, the rest counted as omitted.
#[tokio::test]
async fn the_console_history_follows_the_load_and_stays_bounded() -> Result<()> {
    use crate::common::{fixture, take};
    use switchboard_client::{Publish, Start};

    const MESSAGES: usize = 200;
    const SUBSCRIBERS: usize = MAX_SUBSCRIPTION_SERIES + 4;
    const REFUSED: usize = 3;
    let f = fixture(&[]).await;
    let url = format!("{}/console/api/history", f.broker.admin_url());
    let mut subscriptions = Vec::new();
    for _ in 0..SUBSCRIBERS {
        subscriptions.push(f.client.subscribe("history.>", Start::Latest).await?);
    }
    // The sampler has seen every subscription (and has a point before the load, for the rates).
    eventually("every subscription sampled", || async {
        let history: Value = serde_json::from_str(&http_get(&url).await.ok()?.body).ok()?;
        let charted = history["subscriptions"].as_array()?.len();
        let omitted = history["subscriptions_omitted"].as_u64()? as usize;
        (charted + omitted == SUBSCRIBERS).then_some(())
    })
    .await?;

    for i in 0..MESSAGES {
        f.client
            .publish(Publish::new(format!("history.m{}", i % 5), format!("{i}")))
            .await?;
    }
    for _ in 0..REFUSED {
        let refused = f.client.publish(Publish::new("history..bad", "{}")).await;
        assert!(refused.is_err(), "an empty segment is refused");
    }
    for subscription in &mut subscriptions {
        take(subscription, MESSAGES).await;
    }

    let history = eventually("the load in the rate series", || async {
        let history: Value = serde_json::from_str(&http_get(&url).await.ok()?.body).ok()?;
        // Within 1%: the rates divide by the monotonic clock, the times are wall clock.
        let seen = |series: &str, count: usize| integrated(&history, series) >= count as f64 * 0.99;
        let latency = history["deliver_p99_s"]
            .as_array()?
            .iter()
            .any(|p| p.as_f64().is_some_and(|s| s >= 0.0));
        (seen("publish_rate", MESSAGES)
            && seen("delivery_rate", MESSAGES * SUBSCRIBERS)
            && seen("refusal_rate", REFUSED)
            && latency)
            .then_some(history)
    })
    .await?;
    // Nothing counted twice: no more than the test did (+1% for the clocks).
    assert!(
        integrated(&history, "publish_rate") <= MESSAGES as f64 * 1.01,
        "{history}"
    );

    assert_eq!(history["capacity"], HISTORY_POINTS, "{history}");
    assert_eq!(
        history["max_subscription_series"], MAX_SUBSCRIPTION_SERIES,
        "{history}"
    );
    let points = history["times_us"].as_array().map_or(0, Vec::len);
    assert!(points as u64 <= HISTORY_POINTS, "{history}");
    for series in [
        "publish_rate",
        "delivery_rate",
        "refusal_rate",
        "deliver_p99_s",
    ] {
        assert_eq!(
            history[series].as_array().map(Vec::len),
            Some(points),
            "{series}"
        );
    }
    let charted = history["subscriptions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(charted.len(), MAX_SUBSCRIPTION_SERIES, "{history}");
    assert_eq!(
        history["subscriptions_omitted"],
        SUBSCRIBERS - MAX_SUBSCRIPTION_SERIES
    );
    for s in &charted {
        assert_eq!(s["pattern"], "history.>", "{s}");
        assert_eq!(s["lag"].as_array().map(Vec::len), Some(points), "{s}");
    }

    // Subscriptions that end are shown as ended.
    drop(subscriptions);
    eventually("the ended subscriptions marked", || async {
        let history: Value = serde_json::from_str(&http_get(&url).await.ok()?.body).ok()?;
        let series = history["subscriptions"].as_array()?.clone();
        (!series.is_empty() && series.iter().all(|s| s["live"] == false)).then_some(())
    })
    .await?;
    Ok(())
}
