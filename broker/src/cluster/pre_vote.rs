//! Pre-vote: a node that stops hearing from its leader starts an election only when a majority
//! of the voters have stopped hearing from one too (the Raft thesis, §9.6).
//!
//! Without it, a node cut off from the others times out again and again, and every time it
//! becomes a candidate with a higher term. When the partition heals, the leader sees that term in
//! the node's answers, steps down, and writes stop until a new election ends (issue 19: a
//! follower cut off for ~27 s came back at term 35 from 6, and every heal stalled writes for
//! 1.3–2.2 s). openraft 0.9 has no pre-vote, but lets the application turn elections on and off
//! (`RuntimeConfigHandle::elect`). So on a node of a cluster elections start off (see
//! `raft::start`), and [`run`] turns them on only while a pre-vote would win:
//!
//! - every node records when it last heard from a leader ([`LeaderContact`]: an AppendEntries or
//!   snapshot chunk its raft accepted);
//! - once that is longer ago than the shortest election timeout, it asks every other voter
//!   `PreVote`; a voter says yes unless it leads or heard from a leader within that time itself;
//! - with yes from a majority (itself included), elections are on: openraft then runs an
//!   ordinary election. Otherwise they stay off, and the term stays where it is.
//!
//! A pre-vote changes nothing on the voter that answers it, so asking costs no term. The log
//! check of a real vote is left to the real vote: a pre-vote only decides whether an election may
//! disturb anyone, and it may when a majority has no leader. A lone node has no peers to ask and
//! keeps openraft's own elections.
//!
//! The first start of a static member goes through the same gate. openraft's `initialize` starts
//! an election at once, whatever the election switch says: a member started after the others had
//! elected their first leader became a candidate in that leader's term, refused its appends (a
//! vote of the same term for another node), and deposed it (issue 19). So [`run`] initializes a
//! member with its static voters only when a pre-vote among them wins; until then it waits, and
//! a leader that is already there brings it the membership with its log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};

use crate::raft::network::{decode, encode, Peers};
use crate::raft::{Member, Raft};
use crate::shutdown::ShutdownSignal;

/// When this node last heard from a leader; cheap to clone.
#[derive(Clone)]
pub(crate) struct LeaderContact {
    inner: Arc<ContactInner>,
}

struct ContactInner {
    epoch: Instant,
    /// Ms since `epoch` of the last contact; the start counts as one, so a node that just started
    /// waits a whole election timeout for a leader to show itself before it asks.
    last_ms: AtomicU64,
    /// How long a voter goes without a leader before it asks, and before it says yes.
    quiet: Duration,
}

impl LeaderContact {
    /// A node that counts a leader as gone after `quiet` without contact.
    pub(crate) fn new(quiet: Duration) -> LeaderContact {
        LeaderContact {
            inner: Arc::new(ContactInner {
                epoch: Instant::now(),
                last_ms: AtomicU64::new(0),
                quiet,
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A leader was heard from just now.
    pub(crate) fn heard(&self) {
        self.inner.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether no leader was heard from for the quiet time.
    fn leader_is_quiet(&self) -> bool {
        let since = self
            .now_ms()
            .saturating_sub(self.inner.last_ms.load(Ordering::Relaxed));
        Duration::from_millis(since) >= self.inner.quiet
    }

    /// The answer to a pre-vote: yes unless this node leads or heard from a leader lately.
    pub(crate) fn answer(&self, raft: &Raft, request: &PreVoteRequest) -> PreVoteAnswer {
        let leads = raft.metrics().borrow().state == ServerState::Leader;
        let granted = !leads && self.leader_is_quiet();
        tracing::debug!(candidate = request.candidate, granted, "pre-vote asked");
        PreVoteAnswer { granted }
    }
}

/// Would you vote for me, were I to stand?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PreVoteRequest {
    /// Who asks.
    pub candidate: u64,
}

/// The answer to a [`PreVoteRequest`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct PreVoteAnswer {
    /// Yes: this voter has no leader either.
    pub granted: bool,
}

/// Turns this node's elections on while a pre-vote would win and off otherwise, every `tick`,
/// until `shutdown`; first initializes `initial` (the static voters, `None` for a newcomer) when a
/// pre-vote among them wins, unless raft was initialized already. See the module docs.
pub(crate) async fn run(
    raft: Raft,
    me: u64,
    peers: Peers,
    contact: LeaderContact,
    tick: Duration,
    mut initial: Option<BTreeMap<u64, Member>>,
    mut shutdown: ShutdownSignal,
) {
    let mut elections = Elections {
        raft: raft.clone(),
        on: false,
    };
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait() => return,
        }
        if let Some(members) = &initial {
            // Initialized already: by an earlier start, or by a leader's appends.
            if raft.is_initialized().await.unwrap_or(true) {
                initial = None;
            } else {
                if contact.leader_is_quiet() {
                    let voters: Vec<(u64, String)> = members
                        .iter()
                        .map(|(id, member)| (*id, member.raft_addr.clone()))
                        .collect();
                    // The pre-vote takes round trips, in which another voter's vote request
                    // may have initialized this node: asked again, initializing then is not
                    // tried (openraft would refuse it, logging an error).
                    if pre_vote_wins(&peers, me, &voters, contact.inner.quiet).await
                        && !raft.is_initialized().await.unwrap_or(true)
                    {
                        tracing::info!(
                            "no leader heard from by a majority of the static voters: \
                             initializing the cluster"
                        );
                        initialize(&raft, members.clone()).await;
                        initial = None;
                    }
                }
                continue;
            }
        }
        let (state, voters) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let voters: Vec<(u64, String)> = membership
                .voter_ids()
                .filter_map(|id| {
                    membership
                        .get_node(&id)
                        .map(|member| (id, member.raft_addr.clone()))
                })
                .collect();
            (metrics.state, voters)
        };
        let is_voter = voters.iter().any(|(id, _)| *id == me);
        if state == ServerState::Leader || !is_voter || !contact.leader_is_quiet() {
            elections.set(false);
            continue;
        }
        elections.set(pre_vote_wins(&peers, me, &voters, contact.inner.quiet).await);
    }
}

/// Whether a majority of `voters` (this node, `me`, among them) grants a pre-vote; each answer is
/// awaited for at most `timeout`.
async fn pre_vote_wins(
    peers: &Peers,
    me: u64,
    voters: &[(u64, String)],
    timeout: Duration,
) -> bool {
    let others: Vec<&str> = voters
        .iter()
        .filter(|(id, _)| *id != me)
        .map(|(_, addr)| addr.as_str())
        .collect();
    // Bounded by the timeout, so an unreachable voter delays the next round by no more.
    let asked =
        futures::future::join_all(others.iter().map(|addr| ask(peers, addr, me, timeout))).await;
    let granted = 1 + asked.into_iter().filter(|yes| *yes).count();
    granted * 2 > voters.len()
}

/// Initializes raft with `members`; openraft starts an election at once.
async fn initialize(raft: &Raft, members: BTreeMap<u64, Member>) {
    match raft.initialize(members).await {
        Ok(()) => {}
        // A leader's appends got here first: the same cluster.
        Err(openraft::error::RaftError::APIError(
            openraft::error::InitializeError::NotAllowed(_),
        )) => {}
        Err(e) => tracing::error!(error = %e, "cannot initialize the cluster membership"),
    }
}

/// This node's elections, switched only when they change.
struct Elections {
    raft: Raft,
    on: bool,
}

impl Elections {
    fn set(&mut self, on: bool) {
        if self.on != on {
            self.on = on;
            tracing::info!(
                elections = on,
                "{}",
                if on {
                    "no leader heard from by a majority of the voters: elections on"
                } else {
                    "a leader is known or a majority still hears from one: elections off"
                }
            );
            self.raft.runtime_config().elect(on);
        }
    }
}

/// Asks the voter at `addr` for a pre-vote; no answer within `timeout` is a no.
async fn ask(peers: &Peers, addr: &str, me: u64, timeout: Duration) -> bool {
    let Ok(mut client) = peers.client(addr) else {
        return false;
    };
    let Ok(frame) = encode(&PreVoteRequest { candidate: me }) else {
        return false;
    };
    let mut request = tonic::Request::new(frame);
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.pre_vote(request)).await {
        Ok(Ok(answer)) => decode::<PreVoteAnswer>(answer.get_ref()).is_ok_and(|a| a.granted),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_counts_a_leader_as_gone_only_after_the_quiet_time() {
        let contact = LeaderContact::new(Duration::from_secs(3600));
        assert!(!contact.leader_is_quiet(), "the start counts as contact");
        contact.heard();
        assert!(!contact.leader_is_quiet());
        let impatient = LeaderContact::new(Duration::ZERO);
        assert!(impatient.leader_is_quiet());
    }
}
