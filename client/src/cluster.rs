//! Cluster administration: status and membership changes (the `switchboard.v1.Cluster` service).
//! Any node answers; the broker runs the request on the leader.

use switchboard_proto::v1::{
    AddLearnerRequest, ClusterStatus, ClusterStatusRequest, PromoteRequest, RemoveRequest,
};

use crate::{Client, Error};

impl Client {
    /// The cluster as its leader sees it: members, roles, term, each node's replicated index.
    ///
    /// # Errors
    /// UNAVAILABLE when no leader can be reached.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        let response = self.cluster_grpc().status(ClusterStatusRequest {}).await?;
        Ok(response.into_inner())
    }

    /// Adds node `id` as a non-voting learner, reached by its peers at `raft_address` and by
    /// clients at `public_address` (may be empty); returns once it has caught up (or after the
    /// broker's bound on that wait).
    ///
    /// # Errors
    /// FAILED_PRECONDITION `MEMBERSHIP_INVALID` when `id` is already a member.
    pub async fn cluster_add_learner(
        &self,
        id: u64,
        raft_address: impl Into<String>,
        public_address: impl Into<String>,
    ) -> Result<ClusterStatus, Error> {
        let request = AddLearnerRequest {
            id,
            raft_address: raft_address.into(),
            public_address: public_address.into(),
        };
        Ok(self.cluster_grpc().add_learner(request).await?.into_inner())
    }

    /// Makes learner `id` a voter.
    ///
    /// # Errors
    /// FAILED_PRECONDITION `MEMBERSHIP_INVALID` when it is not a learner.
    pub async fn cluster_promote(&self, id: u64) -> Result<ClusterStatus, Error> {
        let request = PromoteRequest { id };
        Ok(self.cluster_grpc().promote(request).await?.into_inner())
    }

    /// Removes node `id` (voter or learner) from the cluster.
    ///
    /// # Errors
    /// FAILED_PRECONDITION `MEMBERSHIP_INVALID` when it is not a member or is the last voter.
    pub async fn cluster_remove(&self, id: u64) -> Result<ClusterStatus, Error> {
        let request = RemoveRequest { id };
        Ok(self.cluster_grpc().remove(request).await?.into_inner())
    }
}
