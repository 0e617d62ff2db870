//! The public `switchboard.v1.Cluster` admin service: status and membership changes, run on the
//! leader wherever the call arrives.

use switchboard_proto::v1 as pb;
use switchboard_proto::v1::cluster_server::Cluster as ClusterRpc;
use tonic::{Request, Response, Status};

use super::{AdminRequest, ClusterView, Leader};
use crate::error::{BrokerError, Reason};
use crate::raft::Member;
use crate::security::caller::Caller;

/// The admin service over this node's [`Leader`] handle.
pub(crate) struct ClusterService {
    leader: Leader,
}

impl ClusterService {
    /// Serves membership requests through `leader`.
    pub(crate) fn new(leader: Leader) -> ClusterService {
        ClusterService { leader }
    }

    async fn run(&self, request: AdminRequest) -> Result<Response<pb::ClusterStatus>, Status> {
        let view = self.leader.admin(request).await?;
        Ok(Response::new(status(view)))
    }
}

fn status(view: ClusterView) -> pb::ClusterStatus {
    pb::ClusterStatus {
        leader_id: view.leader.unwrap_or(0),
        term: view.term,
        applied_index: view.applied_index,
        nodes: view
            .nodes
            .into_iter()
            .map(|n| pb::ClusterNode {
                id: n.id,
                raft_address: n.member.raft_addr,
                public_address: n.member.public_addr,
                role: n.role,
                matched_index: n.matched_index,
            })
            .collect(),
    }
}

fn node_id(id: u64) -> Result<u64, BrokerError> {
    if id == 0 {
        return Err(BrokerError::invalid(
            Reason::MembershipInvalid,
            "id must be a node id above 0",
        ));
    }
    Ok(id)
}

fn address(field: &str, value: &str, required: bool) -> Result<String, BrokerError> {
    let value = value.trim();
    if value.is_empty() && !required {
        return Ok(String::new());
    }
    let valid = value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        && !value.contains('/');
    if !valid {
        return Err(BrokerError::invalid(
            Reason::MembershipInvalid,
            format!("{field} must be \"host:port\", got {value:?}"),
        ));
    }
    Ok(value.to_owned())
}

#[tonic::async_trait]
impl ClusterRpc for ClusterService {
    async fn status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.run(AdminRequest::Status).await
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        // Membership decides who holds the data: only an `admin` grant may change it.
        Caller::of(request.extensions())?.check_admin("Cluster/AddLearner")?;
        let r = request.into_inner();
        let id = node_id(r.id)?;
        let member = Member {
            raft_addr: address("raft_address", &r.raft_address, true)?,
            public_addr: address("public_address", &r.public_address, false)?,
        };
        self.run(AdminRequest::AddLearner { id, member }).await
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        // Membership decides who holds the data: only an `admin` grant may change it.
        Caller::of(request.extensions())?.check_admin("Cluster/Promote")?;
        let id = node_id(request.into_inner().id)?;
        self.run(AdminRequest::Promote { id }).await
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        // Membership decides who holds the data: only an `admin` grant may change it.
        Caller::of(request.extensions())?.check_admin("Cluster/Remove")?;
        let id = node_id(request.into_inner().id)?;
        self.run(AdminRequest::Remove { id }).await
    }
}
