//! The cluster around raft: reaching the leader from any node.
//!
//! - [`Leader`]: what a node does with work only the leader can do — a proposer batch, a read
//!   index for a linearizable read, a membership change — either itself (when it leads) or
//!   through the leader's internal `Propose` / `ReadIndex` / `Admin` RPC, waiting at most
//!   `cluster.forward_timeout` for a leader to be known.
//! - [`internal`]: the leader's (and every node's) side of those RPCs, plus raft's own.
//! - [`service`]: the public `switchboard.v1.Cluster` admin service.
//! - [`pre_vote`]: elections only when a majority of the voters has lost its leader, so a node
//!   that was cut off cannot depose a healthy leader when it comes back.
//!
//! A forwarded write is retried only when the leader answered that it no longer leads (it then
//! stored nothing). When the leader does not answer, the write may or may not have been
//! committed; the client is told UNAVAILABLE `LEADER_UNREACHABLE` and a retry with the same
//! idempotency key is deduplicated.

pub(crate) mod internal;
pub(crate) mod pre_vote;
pub(crate) mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{BrokerError, Reason};
use crate::message::{Command, CommandOutcome};
use crate::raft::network::{decode, encode, Peers};
use crate::raft::{Member, Raft};

/// Pause before asking again when the node asked no longer leads and no new leader is known yet.
const LEADER_CHANGE_PAUSE: Duration = Duration::from_millis(50);

/// Why the leader (or the node that thought it was) could not do what was forwarded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Refused {
    /// It does not lead (any more); nothing was done.
    NotLeader {
        /// Who it thinks leads.
        leader: Option<u64>,
    },
    /// A membership change that cannot be made as asked.
    Membership(String),
    /// Anything else, as text.
    Failed(String),
}

/// A membership operation or question, run on the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum AdminRequest {
    /// The cluster as the leader sees it.
    Status,
    /// Add a non-voting learner: a read replica until Promote, which nothing sends by itself.
    AddLearner {
        /// Its raft id.
        id: u64,
        /// Its addresses.
        member: Member,
    },
    /// Make a learner a voter.
    Promote {
        /// Its raft id.
        id: u64,
    },
    /// Remove a voter or learner.
    Remove {
        /// Its raft id.
        id: u64,
    },
    /// A member tells the leader its own public address (static members start without one).
    Announce {
        /// Its raft id.
        id: u64,
        /// Its public address.
        public_addr: String,
    },
}

/// One member as the leader sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct NodeView {
    /// Raft id.
    pub id: u64,
    /// Addresses.
    pub member: Member,
    /// "leader", "voter" or "learner" (a read replica, as `sb` and the console name it).
    pub role: String,
    /// Highest log index known to be on it.
    pub matched_index: Option<u64>,
}

/// The cluster as the leader sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ClusterView {
    /// The leader's id.
    pub leader: Option<u64>,
    /// Its term.
    pub term: u64,
    /// Its last applied log index.
    pub applied_index: u64,
    /// Voters first, then learners, each in id order.
    pub nodes: Vec<NodeView>,
}

/// Runs leader-only work here or on the leader. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Leader {
    raft: Raft,
    peers: Peers,
    me: u64,
    timeout: Duration,
    clustered: bool,
}

impl Leader {
    /// Over this node's raft (`me` is its id); gives up on reaching a leader after `timeout`.
    /// `clustered` is false for a single node, which is its own majority.
    pub(crate) fn new(
        raft: Raft,
        peers: Peers,
        me: u64,
        timeout: Duration,
        clustered: bool,
    ) -> Leader {
        Leader {
            raft,
            peers,
            me,
            timeout,
            clustered,
        }
    }

    /// How long a write proposed here may wait for a majority before the client is answered
    /// UNAVAILABLE `NO_QUORUM`: a leader cut off from its peers keeps believing it leads (raft
    /// has it step down only when it hears a higher term), and its writes would wait for ever.
    /// `None` for a single node, whose writes need nobody else.
    pub(crate) fn commit_timeout(&self) -> Option<Duration> {
        self.clustered.then_some(self.timeout)
    }

    /// The refusal of a write this node proposed as leader that no majority confirmed within
    /// [`Leader::commit_timeout`].
    pub(crate) fn no_quorum(&self) -> BrokerError {
        BrokerError::NoQuorum {
            waited_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The refusal of a write that could not be committed within [`Leader::commit_timeout`] of its
    /// arrival, because earlier writes still held the way: `NO_QUORUM` when this node leads (no
    /// majority confirms its entries), `LEADER_UNREACHABLE` when the known leader did not take
    /// the earlier writes, `NO_LEADER` when none is known.
    pub(crate) fn overdue(&self) -> BrokerError {
        let leader = self.raft.metrics().borrow().current_leader;
        match leader {
            Some(id) if id == self.me => self.no_quorum(),
            Some(id) => BrokerError::LeaderUnavailable {
                reason: Reason::LeaderUnreachable,
                message: format!(
                    "the leader (node {id}) did not take the writes queued before this one within \
                     {:?}",
                    self.timeout
                ),
                leader: Some(id),
                leader_address: None,
            },
            None => BrokerError::LeaderUnavailable {
                reason: Reason::NoLeader,
                message: format!(
                    "no raft leader took the writes queued before this one within {:?}: a \
                     majority of the cluster may be down or cut off from this node",
                    self.timeout
                ),
                leader: None,
                leader_address: None,
            },
        }
    }

    /// Whether this node leads right now (as far as it knows).
    pub(crate) fn is_me(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.me)
    }

    /// Waits (until `deadline`) for a known leader and its addresses.
    async fn current(&self, deadline: Instant) -> Result<(u64, Member), BrokerError> {
        let mut metrics = self.raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                if let Some(id) = m.current_leader {
                    if let Some(node) = m.membership_config.membership().get_node(&id) {
                        return Ok((id, node.clone()));
                    }
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(BrokerError::ShuttingDown),
                Err(_) => {
                    return Err(BrokerError::LeaderUnavailable {
                        reason: Reason::NoLeader,
                        message: format!(
                            "no raft leader is known after {:?}: a majority of the cluster may be \
                             down or cut off from this node",
                            self.timeout
                        ),
                        leader: None,
                        leader_address: None,
                    })
                }
            }
        }
    }

    /// Waits a moment for leadership to settle after a node said it does not lead.
    async fn settle(&self, deadline: Instant) {
        let mut metrics = self.raft.metrics();
        let until = deadline.min(Instant::now() + LEADER_CHANGE_PAUSE);
        let _ = tokio::time::timeout_at(until, metrics.changed()).await;
    }

    /// Sends `frame` to the leader with `call`, retrying while the node asked no longer leads;
    /// `local` runs the work here when this node is (or becomes) the leader.
    async fn on_leader<T, Call, CallFut, Local, LocalFut>(
        &self,
        what: &str,
        deadline: Instant,
        frame: switchboard_proto::internal::v1::Frame,
        call: Call,
        local: Local,
    ) -> Result<T, BrokerError>
    where
        T: serde::de::DeserializeOwned,
        Call: Fn(
            switchboard_proto::internal::v1::raft_client::RaftClient<tonic::transport::Channel>,
            tonic::Request<switchboard_proto::internal::v1::Frame>,
        ) -> CallFut,
        CallFut: std::future::Future<
            Output = Result<tonic::Response<switchboard_proto::internal::v1::Frame>, tonic::Status>,
        >,
        Local: FnOnce() -> LocalFut,
        LocalFut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        loop {
            let (leader, node) = self.current(deadline).await?;
            if leader == self.me {
                return local().await;
            }
            let unreachable = |detail: String| BrokerError::LeaderUnavailable {
                reason: Reason::LeaderUnreachable,
                message: format!("the leader (node {leader}) did not answer {what}: {detail}"),
                leader: Some(leader),
                leader_address: Some(node.public_addr.clone()).filter(|a| !a.is_empty()),
            };
            let client = self.peers.client(&node.raft_addr).map_err(unreachable)?;
            let mut request = tonic::Request::new(frame.clone());
            request.set_timeout(deadline.saturating_duration_since(Instant::now()));
            // grpc-timeout is enforced by the server; this bounds the wait on our side too (a
            // peer that accepted the connection and then went silent).
            let answer = tokio::time::timeout_at(deadline, call(client, request))
                .await
                .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
                .map_err(|status| {
                    unreachable(format!("{}: {}", status.code(), status.message()))
                })?;
            let result: Result<T, Refused> = decode(answer.get_ref()).map_err(unreachable)?;
            match result {
                Ok(value) => return Ok(value),
                Err(Refused::NotLeader { .. }) if Instant::now() < deadline => {
                    self.settle(deadline).await;
                }
                Err(refused) => return Err(refused_error(refused, leader)),
            }
        }
    }

    /// Proposes an already batched command on the leader and returns its outcome, by `deadline`
    /// (a batch's is [`Leader::commit_timeout`] after its first write arrived).
    ///
    /// # Errors
    /// No leader, leader unreachable, or the write failed there.
    pub(crate) async fn propose(
        &self,
        command: Command,
        deadline: Instant,
    ) -> Result<CommandOutcome, BrokerError> {
        let frame = encode(&command).map_err(BrokerError::Consensus)?;
        let raft = self.raft.clone();
        let no_quorum = self.no_quorum();
        self.on_leader(
            "a forwarded write",
            deadline,
            frame,
            |mut c, r| async move { c.propose(r).await },
            move || async move {
                match tokio::time::timeout_at(deadline, propose_here(&raft, command)).await {
                    Ok(result) => result.map_err(local_error),
                    Err(_) => Err(no_quorum),
                }
            },
        )
        .await
    }

    /// Waits until this node has applied everything committed before the call began, as the
    /// leader confirms with a quorum (read index): a read after this sees every write
    /// acknowledged before it, on any node.
    ///
    /// # Errors
    /// No leader could confirm in time.
    pub(crate) async fn read_barrier(&self) -> Result<(), BrokerError> {
        let frame = encode(&()).map_err(BrokerError::Consensus)?;
        let raft = self.raft.clone();
        let index: Option<u64> = self
            .on_leader(
                "a read index request",
                Instant::now() + self.timeout,
                frame,
                |mut c, r| async move { c.read_index(r).await },
                move || async move { read_index_here(&raft).await.map_err(read_error) },
            )
            .await?;
        let Some(index) = index else { return Ok(()) };
        self.raft
            .wait(Some(self.timeout))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| match e {
                openraft::metrics::WaitError::ShuttingDown => BrokerError::ShuttingDown,
                openraft::metrics::WaitError::Timeout(..) => BrokerError::LeaderUnavailable {
                    reason: Reason::NoLeader,
                    message: format!(
                        "this node did not apply up to the leader's read index {index} within {:?}",
                        self.timeout
                    ),
                    leader: None,
                    leader_address: None,
                },
            })
    }

    /// Runs a membership request on the leader.
    ///
    /// # Errors
    /// No leader, leader unreachable, or the change is refused.
    pub(crate) async fn admin(&self, request: AdminRequest) -> Result<ClusterView, BrokerError> {
        let frame = encode(&request).map_err(BrokerError::Consensus)?;
        let raft = self.raft.clone();
        let me = self.me;
        let catch_up = catch_up_wait(self.timeout);
        self.on_leader(
            "a cluster admin request",
            Instant::now() + self.timeout,
            frame,
            |mut c, r| async move { c.admin(r).await },
            move || async move {
                admin_here(&raft, me, request, catch_up)
                    .await
                    .map_err(local_error)
            },
        )
        .await
    }
}

/// What the client sees when the leader refused forwarded work.
fn refused_error(refused: Refused, asked: u64) -> BrokerError {
    match refused {
        Refused::NotLeader { leader } => BrokerError::LeaderUnavailable {
            reason: Reason::NoLeader,
            message: format!(
                "leadership is changing (node {asked} no longer leads); no leader accepted the \
                 request in time"
            ),
            leader,
            leader_address: None,
        },
        Refused::Membership(message) => BrokerError::Precondition {
            reason: Reason::MembershipInvalid,
            message,
        },
        Refused::Failed(message) => BrokerError::Consensus(message),
    }
}

/// A read index refused on this node itself: said in terms of the read, not of writes.
fn read_error(refused: Refused) -> BrokerError {
    match refused {
        Refused::NotLeader { leader } => BrokerError::LeaderUnavailable {
            reason: Reason::NoLeader,
            message: "no leader could confirm with a majority that it still leads, so a \
                      linearizable read cannot be answered now (a stale_ok read is answered from \
                      this node's own state)"
                .into(),
            leader,
            leader_address: None,
        },
        other => local_error(other),
    }
}

/// A refusal met on this node itself.
fn local_error(refused: Refused) -> BrokerError {
    match refused {
        Refused::NotLeader { leader } => BrokerError::NotLeader { leader },
        Refused::Membership(message) => BrokerError::Precondition {
            reason: Reason::MembershipInvalid,
            message,
        },
        Refused::Failed(message) => BrokerError::Consensus(message),
    }
}

fn write_refusal(e: RaftError<u64, ClientWriteError<u64, Member>>) -> Refused {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Refused::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Refused::Membership(e.to_string())
        }
        RaftError::Fatal(e) => Refused::Failed(e.to_string()),
    }
}

/// Proposes `command` on this node, which must lead.
pub(crate) async fn propose_here(raft: &Raft, command: Command) -> Result<CommandOutcome, Refused> {
    raft.client_write(command)
        .await
        .map(|written| written.data)
        .map_err(write_refusal)
}

/// Confirms leadership with a quorum and returns the log index a linearizable read waits for.
pub(crate) async fn read_index_here(raft: &Raft) -> Result<Option<u64>, Refused> {
    use openraft::error::CheckIsLeaderError;
    // Every write acknowledged before this read is in the leader's log by now. openraft's read
    // index is the larger of its committed id and the first entry of its term; a leader that
    // came back from a crash as leader (its vote saved as committed, no election) resumes with
    // the committed id it saved last, lazily, so older than what it acknowledged, and reads
    // waiting only for that went back in time (issue 19). Waiting for its last log entry too
    // makes them see every acknowledged write; it costs a read the commit of the entries in
    // flight when it arrives.
    let last_log = raft.metrics().borrow().last_log_index;
    match raft.get_read_log_id().await {
        Ok((read, _applied)) => Ok(read.map(|l| l.index).max(last_log)),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(Refused::NotLeader {
                leader: f.leader_id,
            })
        }
        // It could not hear from a majority: as good as no leader, for a reader.
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
            tracing::debug!(error = %e, "read index: no quorum");
            Err(Refused::NotLeader { leader: None })
        }
        Err(RaftError::Fatal(e)) => Err(Refused::Failed(e.to_string())),
    }
}

/// How long AddLearner waits for the learner to catch up before answering anyway (it keeps
/// catching up in the background): half the forwarding budget, so a forwarded AddLearner is
/// answered before the follower that forwarded it gives up on the leader.
pub(crate) fn catch_up_wait(forward_timeout: Duration) -> Duration {
    forward_timeout / 2
}

/// One membership change at a time from this process: openraft refuses a change while the last
/// one is uncommitted, and requests that arrive together are ordinary (three nodes announcing
/// their addresses at start, an operator adding nodes), so they queue here instead.
static MEMBERSHIP_CHANGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Pause before asking again when another node's change slipped in first.
const MEMBERSHIP_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Whether no membership change is in flight: the effective membership's entry is applied (so
/// committed) and it is not a joint configuration.
fn membership_settled(metrics: &openraft::RaftMetrics<u64, Member>) -> bool {
    let config = metrics.membership_config.log_id().map(|l| l.index);
    let applied = metrics.last_applied.map(|l| l.index);
    config <= applied
        && metrics
            .membership_config
            .membership()
            .get_joint_config()
            .len()
            <= 1
}

/// Makes a membership change once no other is in flight, waiting up to `within` for the one
/// before it; a change that still meets one in progress (made through another node's leadership
/// a moment ago, between the wait and the call) is asked again until `within` has passed. The
/// caller holds [`MEMBERSHIP_CHANGES`]. So concurrent requests are made
/// one after the other instead of one being refused "already undergoing a configuration change"
/// (which openraft also logs as an error).
async fn change_membership_when_settled<T, F, Fut>(
    raft: &Raft,
    within: Duration,
    mut change: F,
) -> Result<T, Refused>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RaftError<u64, ClientWriteError<u64, Member>>>>,
{
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // A wait that times out is not an answer: the change itself then says what holds.
        let _ = raft
            .wait(Some(left))
            .metrics(membership_settled, "the last membership change committed")
            .await;
        match change().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if Instant::now() + MEMBERSHIP_RETRY_PAUSE < deadline => {
                tokio::time::sleep(MEMBERSHIP_RETRY_PAUSE).await;
            }
            answer => return answer.map_err(write_refusal),
        }
    }
}

/// Entries a learner may still be behind the leader's log when it is promoted: a learner that
/// is replicating closes such a gap in moments, one that is not replicating never does.
const PROMOTE_MAX_LAG: u64 = 1024;

/// Waits up to `within` for learner `id` to have replicated the leader's log to within
/// [`PROMOTE_MAX_LAG`] entries. A voter that never received the log (an address nothing
/// answers at, a node that is down) would count towards every majority from its promotion on:
/// with two voters, one of them unreachable, no write would commit again.
async fn learner_caught_up(raft: &Raft, id: u64, within: Duration) -> Result<(), Refused> {
    let behind = |metrics: &openraft::RaftMetrics<u64, Member>| -> Option<(Option<u64>, u64)> {
        let last = metrics.last_log_index.unwrap_or(0);
        let matched = metrics
            .replication
            .as_ref()
            .and_then(|replication| replication.get(&id).cloned().flatten())
            .map(|log_id| log_id.index);
        let caught_up = matched.is_some_and(|m| m + PROMOTE_MAX_LAG >= last);
        (!caught_up).then_some((matched, last))
    };
    let mut metrics = raft.metrics();
    let deadline = Instant::now() + within;
    loop {
        let Some((matched, last)) = behind(&metrics.borrow()) else {
            return Ok(());
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let changed = tokio::time::timeout(remaining, metrics.changed()).await;
        if !matches!(changed, Ok(Ok(()))) {
            let has = matched.map_or("nothing".to_owned(), |m| format!("entries up to {m}"));
            return Err(Refused::Membership(format!(
                "node {id} has not caught up with the leader's log (it has {has} of {last}): a                  voter that cannot be reached would cost the cluster its majority. Check that it                  runs and that the leader reaches it at its raft address, then promote it again"
            )));
        }
    }
}

/// Runs a membership request on this node, which must lead. AddLearner waits up to `catch_up`.
pub(crate) async fn admin_here(
    raft: &Raft,
    me: u64,
    request: AdminRequest,
    catch_up: Duration,
) -> Result<ClusterView, Refused> {
    // Decided on the membership as it is once the changes before this one are made, not as it
    // was when the request arrived.
    let _one_at_a_time = match request {
        AdminRequest::Status => None,
        _ => Some(MEMBERSHIP_CHANGES.lock().await),
    };
    let membership = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let is_voter = |id: u64| membership.voter_ids().any(|v| v == id);
    let is_member = |id: u64| membership.get_node(&id).is_some();
    match request {
        AdminRequest::Status => {}
        AdminRequest::AddLearner { id, member } => {
            if let Some(existing) = membership.get_node(&id) {
                // A retry of an add that did commit (its answer lost with a leader that died, or
                // a deployment that adds its replicas at every start) finds the node there with
                // the addresses it asks for: the state it wants holds, whether the node is still
                // a learner or was promoted since. Other addresses are a different request.
                if *existing != member {
                    return Err(Refused::Membership(format!(
                        "node {id} is already a member at {existing}; remove it first to change \
                         its addresses"
                    )));
                }
            } else {
                let adding = change_membership_when_settled(raft, catch_up, || {
                    raft.add_learner(id, member.clone(), true)
                });
                match tokio::time::timeout(catch_up, adding).await {
                    Ok(result) => {
                        result?;
                    }
                    Err(_) => tracing::info!(
                        node = id,
                        "the new learner has not caught up within {catch_up:?}; it keeps catching \
                         up"
                    ),
                }
            }
        }
        AdminRequest::Promote { id } => {
            if !is_member(id) {
                return Err(Refused::Membership(format!(
                    "node {id} is not a member: add it with AddLearner first"
                )));
            }
            // Promoting a voter is a retry of a promote that did commit: nothing to change.
            if !is_voter(id) {
                learner_caught_up(raft, id, catch_up).await?;
                change_membership_when_settled(raft, catch_up, || {
                    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                })
                .await?;
            }
        }
        AdminRequest::Remove { id } => {
            if !is_member(id) {
                return Err(Refused::Membership(format!("node {id} is not a member")));
            }
            let change = if is_voter(id) {
                if membership.voter_ids().count() == 1 {
                    return Err(Refused::Membership(format!(
                        "node {id} is the last voter; a cluster needs one"
                    )));
                }
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            change_membership_when_settled(raft, catch_up, || {
                raft.change_membership(change.clone(), false)
            })
            .await?;
        }
        AdminRequest::Announce { id, public_addr } => {
            if let Some(node) = membership.get_node(&id) {
                if node.public_addr != public_addr {
                    // Only the public address changes: raft keeps reaching the node where it did,
                    // which is what makes replacing a node's record safe here.
                    let member = Member {
                        raft_addr: node.raft_addr.clone(),
                        public_addr,
                    };
                    change_membership_when_settled(raft, catch_up, || {
                        raft.change_membership(
                            ChangeMembers::SetNodes(BTreeMap::from([(id, member.clone())])),
                            false,
                        )
                    })
                    .await?;
                }
            }
        }
    }
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader != Some(me) {
        return Err(Refused::NotLeader {
            leader: metrics.current_leader,
        });
    }
    Ok(view(&metrics))
}

/// The cluster as these (the leader's) metrics show it.
fn view(metrics: &openraft::RaftMetrics<u64, Member>) -> ClusterView {
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let replication = metrics.replication.clone().unwrap_or_default();
    let mut nodes: Vec<NodeView> = membership
        .nodes()
        .map(|(id, member)| {
            let role = if Some(*id) == metrics.current_leader {
                "leader"
            } else if voters.contains(id) {
                "voter"
            } else {
                "learner"
            };
            let matched_index = if Some(*id) == metrics.current_leader {
                metrics.last_log_index
            } else {
                replication.get(id).cloned().flatten().map(|l| l.index)
            };
            NodeView {
                id: *id,
                member: member.clone(),
                role: role.to_owned(),
                matched_index,
            }
        })
        .collect();
    nodes.sort_by_key(|n| (!voters.contains(&n.id), n.id));
    ClusterView {
        leader: metrics.current_leader,
        term: metrics.current_term,
        applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
        nodes,
    }
}

/// Tells the leader this node's public address once a leader is known, if the membership does
/// not have it yet (static members start without their peers' public addresses). Retries with a
/// pause until done or `shutdown`.
pub(crate) async fn announce(
    leader: Leader,
    public_addr: String,
    mut shutdown: crate::shutdown::ShutdownSignal,
) {
    let mut metrics = leader.raft.metrics();
    loop {
        let known = {
            let m = metrics.borrow_and_update();
            m.membership_config
                .membership()
                .get_node(&leader.me)
                .map(|n| n.public_addr == public_addr)
        };
        // Not a member (yet): a newcomer is announced by whoever adds it.
        if known == Some(false) {
            let request = AdminRequest::Announce {
                id: leader.me,
                public_addr: public_addr.clone(),
            };
            if let Err(e) = leader.admin(request).await {
                tracing::debug!(error = %e, "cannot announce this node's public address yet");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.wait() => return,
                }
                continue;
            }
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}
