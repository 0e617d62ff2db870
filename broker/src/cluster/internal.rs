//! The internal `switchboard.internal.v1.Raft` service, served on `cluster.listen`: raft's own
//! RPCs handed to the local raft, and the leader's side of forwarded writes, read indexes and
//! membership requests. Requests and answers are bincode frames (see the proto).

use serde::de::DeserializeOwned;
use serde::Serialize;
use switchboard_proto::internal::v1::raft_server::Raft as RaftRpc;
use switchboard_proto::internal::v1::Frame;
use tonic::{Request, Response, Status};

use std::time::Duration;

use openraft::raft::AppendEntriesResponse;

use super::pre_vote::{LeaderContact, PreVoteRequest};
use super::{admin_here, catch_up_wait, propose_here, read_index_here, AdminRequest};
use crate::fanout::ephemeral;
use crate::fanout::hub::Hub;
use crate::message::{Command, StoredMessage};
use crate::raft::network::{decode, encode};
use crate::raft::Raft;

/// The internal service over this node's raft.
pub(crate) struct InternalService {
    raft: Raft,
    me: u64,
    catch_up: Duration,
    /// Recorded whenever raft accepts a leader's AppendEntries or snapshot chunk.
    contact: LeaderContact,
    /// Where ephemeral messages from peers go.
    hub: Hub,
}

impl InternalService {
    /// Serves `raft`, whose id is `me`; forwarding callers give up after `forward_timeout`;
    /// contact with a leader is recorded in `contact`; ephemeral messages from peers go to `hub`.
    pub(crate) fn new(
        raft: Raft,
        me: u64,
        forward_timeout: Duration,
        contact: LeaderContact,
        hub: Hub,
    ) -> InternalService {
        InternalService {
            raft,
            me,
            catch_up: catch_up_wait(forward_timeout),
            contact,
            hub,
        }
    }
}

fn request<T: DeserializeOwned>(request: Request<Frame>) -> Result<T, Status> {
    decode(request.get_ref()).map_err(Status::invalid_argument)
}

fn answer<T: Serialize>(value: &T) -> Result<Response<Frame>, Status> {
    encode(value).map(Response::new).map_err(Status::internal)
}

#[tonic::async_trait]
impl RaftRpc for InternalService {
    async fn append_entries(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let result = self.raft.append_entries(request(r)?).await;
        // Anything but a higher vote means the sender leads this node's term.
        if matches!(&result, Ok(answer) if !matches!(answer, AppendEntriesResponse::HigherVote(_)))
        {
            self.contact.heard();
        }
        answer(&result)
    }

    async fn vote(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let result = self.raft.vote(request(r)?).await;
        answer(&result)
    }

    async fn install_snapshot(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let result = self.raft.install_snapshot(request(r)?).await;
        if result.is_ok() {
            self.contact.heard();
        }
        answer(&result)
    }

    async fn propose(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let command: Command = request(r)?;
        answer(&propose_here(&self.raft, command).await)
    }

    async fn read_index(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let () = request(r)?;
        answer(&read_index_here(&self.raft).await)
    }

    async fn pre_vote(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let asked: PreVoteRequest = request(r)?;
        answer(&self.contact.answer(&self.raft, &asked))
    }

    async fn ephemeral(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let messages: Vec<StoredMessage> = request(r)?;
        ephemeral::received(&self.hub, messages);
        answer(&())
    }

    async fn admin(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let admin: AdminRequest = request(r)?;
        answer(&admin_here(&self.raft, self.me, admin, self.catch_up).await)
    }
}
