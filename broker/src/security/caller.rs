//! Who made a call: the principal the gate established (or none, on a broker without
//! authentication), the connection's address, and when the call's streams must end.
//!
//! Every grant check goes through a [`Caller`] method, so each refusal is decided, counted
//! (`switchboard_access_refusals_total`) and written to the audit log in one place, whichever
//! handler — gRPC, gateway or cluster admin — asked. The edge's gate ([`crate::edge::auth`]) builds
//! a `Caller` and leaves it in the call's extensions; handlers take it back with [`Caller::of`].

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use crate::channel::Pattern;
use crate::error::BrokerError;
use crate::message::Owner;
use crate::observability::{audit, metrics};
use crate::security::permissions::{PermissionDenied, Permissions};
use crate::security::token::Principal;

/// What a broker without authentication lets every caller do: everything but publish to `$`.
static UNRESTRICTED: LazyLock<Permissions> = LazyLock::new(Permissions::unrestricted);

/// Who made a call, as the gate established it; handlers find it in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The token's principal; `None` on a broker without authentication.
    principal: Option<Arc<Principal>>,
    /// The connection's remote address, when the transport knows it.
    peer: Option<SocketAddr>,
    /// When streams opened by this call must end: the token's `exp` plus the leeway.
    stream_deadline: Option<SystemTime>,
}

/// A call reached its handler without passing the gate: a wiring mistake, never a client's.
#[derive(Debug, thiserror::Error)]
#[error("the call did not pass the authentication gate")]
pub struct Ungated;

impl Caller {
    /// A caller on a broker without authentication (also what tests of handlers use).
    pub(crate) fn anonymous(peer: Option<SocketAddr>) -> Caller {
        Caller {
            principal: None,
            peer,
            stream_deadline: None,
        }
    }

    /// A caller whose token verified as `principal`; its streams end at `stream_deadline`.
    pub(crate) fn authenticated(
        principal: Principal,
        peer: Option<SocketAddr>,
        stream_deadline: Option<SystemTime>,
    ) -> Caller {
        Caller {
            principal: Some(Arc::new(principal)),
            peer,
            stream_deadline,
        }
    }

    /// The caller the gate left in a call's `extensions`.
    ///
    /// # Errors
    /// [`Ungated`] when the call did not pass the gate.
    pub(crate) fn of(extensions: &http::Extensions) -> Result<Caller, Ungated> {
        extensions.get::<Caller>().cloned().ok_or(Ungated)
    }

    /// What this caller may do; asked only through the checks below, so every refusal is
    /// counted and audited the same way.
    fn permissions(&self) -> &Permissions {
        match &self.principal {
            Some(principal) => &principal.permissions,
            None => &UNRESTRICTED,
        }
    }

    /// The connection's remote address.
    pub(crate) fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The authenticated subject, if any.
    pub(crate) fn subject(&self) -> Option<&str> {
        self.principal.as_deref().map(|p| p.subject.as_str())
    }

    /// The verified principal, if the broker authenticates.
    pub(crate) fn principal(&self) -> Option<&Principal> {
        self.principal.as_deref()
    }

    /// When streams opened by this call must end (the token's `exp` plus the leeway); `None`
    /// without a token.
    pub(crate) fn stream_deadline(&self) -> Option<SystemTime> {
        self.stream_deadline
    }

    /// Writes the audit line for a refusal of this caller's request about `target` (a channel,
    /// a pattern, `type.id`): who from this caller, what from `target`.
    pub(crate) fn audit_refused(&self, target: &str, error: &BrokerError) {
        audit::refused(self.peer, self.subject(), Some(target), error);
    }

    /// Refuses, counts and audits a denied operation; `target` names what was refused (built
    /// only for a refusal).
    fn refuse(
        &self,
        check: Result<(), PermissionDenied>,
        target: impl FnOnce() -> String,
    ) -> Result<(), BrokerError> {
        check.map_err(|denied| {
            let error = BrokerError::Denied(denied);
            metrics::access_refused(error.reason());
            self.audit_refused(&target(), &error);
            error
        })
    }

    /// Whether this caller may publish to `channel`.
    ///
    /// # Errors
    /// PERMISSION_DENIED `PUBLISH_DENIED`, or INVALID_ARGUMENT `CHANNEL_RESERVED` for a `$`
    /// channel.
    pub(crate) fn check_publish(&self, channel: &str) -> Result<(), BrokerError> {
        self.refuse(self.permissions().check_publish(channel), || {
            channel.to_owned()
        })
    }

    /// Whether this caller may subscribe to `pattern` (or read its history, or follow it as a
    /// durable consumer).
    ///
    /// # Errors
    /// PERMISSION_DENIED `SUBSCRIBE_DENIED` (or `ENTITY_READ_DENIED` for `$state.` patterns).
    pub(crate) fn check_subscribe(&self, pattern: &Pattern) -> Result<(), BrokerError> {
        self.refuse(self.permissions().check_subscribe(pattern), || {
            pattern.as_str().to_owned()
        })
    }

    /// Whether this caller could subscribe to `pattern`, asked to decide what it may see (a
    /// listing), not to refuse it: nothing is counted or audited.
    pub(crate) fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.permissions().may_subscribe(pattern)
    }

    /// Whether this caller may read entity `entity_type`.`id` (the grant is per type).
    ///
    /// # Errors
    /// PERMISSION_DENIED `ENTITY_READ_DENIED`.
    pub(crate) fn check_read_entity(&self, entity_type: &str, id: &str) -> Result<(), BrokerError> {
        self.refuse(self.permissions().check_read_entity(entity_type), || {
            format!("{entity_type}.{id}")
        })
    }

    /// Whether this caller may update or delete entity `entity_type`.`id` (the grant is per
    /// type).
    ///
    /// # Errors
    /// PERMISSION_DENIED `ENTITY_UPDATE_DENIED`.
    pub(crate) fn check_update_entity(
        &self,
        entity_type: &str,
        id: &str,
    ) -> Result<(), BrokerError> {
        self.refuse(self.permissions().check_update_entity(entity_type), || {
            format!("{entity_type}.{id}")
        })
    }

    /// What this caller creates belongs to: its token's issuer and subject; `None` without
    /// authentication (every caller is then the same anonymous one).
    pub(crate) fn owner(&self) -> Option<Owner> {
        self.principal.as_deref().map(|p| Owner {
            issuer: p.issuer.clone().unwrap_or_default(),
            subject: p.subject.clone(),
        })
    }

    /// Whether this caller has the `admin` grant (every caller on a broker without
    /// authentication has it).
    pub(crate) fn is_admin(&self) -> bool {
        self.permissions().check_admin().is_ok()
    }

    /// Whether this caller may manage what `owner` created: it is the owner, or an `admin`.
    /// Something owned by nobody (created without authentication, or before owners were
    /// recorded) is an `admin`'s alone.
    pub(crate) fn may_manage(&self, owner: Option<&Owner>) -> bool {
        self.is_admin() || owner.is_some_and(|owner| self.owner().as_ref() == Some(owner))
    }

    /// Whether this caller may open, acknowledge for or delete durable consumer `name`, which
    /// belongs to `owner`.
    ///
    /// # Errors
    /// PERMISSION_DENIED `CONSUMER_NOT_OWNED`.
    pub(crate) fn check_consumer_owner(
        &self,
        name: &str,
        owner: Option<&Owner>,
    ) -> Result<(), BrokerError> {
        let check = if self.may_manage(owner) {
            Ok(())
        } else {
            Err(PermissionDenied::ConsumerNotOwned {
                name: name.to_owned(),
            })
        };
        self.refuse(check, || format!("consumer {name}"))
    }

    /// Whether this caller may change cluster membership; `operation` names the change for the
    /// audit log (`Cluster/AddLearner`, …).
    ///
    /// # Errors
    /// PERMISSION_DENIED `ADMIN_DENIED`.
    pub(crate) fn check_admin(&self, operation: &str) -> Result<(), BrokerError> {
        self.refuse(self.permissions().check_admin(), || operation.to_owned())
    }

    /// Whether this caller may read KPI view `view` (its values or its definition).
    ///
    /// # Errors
    /// PERMISSION_DENIED `KPI_DENIED`.
    pub(crate) fn check_read_kpi(&self, view: &str) -> Result<(), BrokerError> {
        self.refuse(self.permissions().check_read_kpi(view), || {
            format!("KPI view {view}")
        })
    }

    /// Whether this caller could read KPI view `view`, asked to decide what a listing shows:
    /// nothing is counted or audited.
    pub(crate) fn may_read_kpi(&self, view: &str) -> bool {
        self.permissions().may_read_kpi(view)
    }

    /// Whether the caller may change the schema registry; `target` names what it would change.
    pub(crate) fn check_schema(&self, target: &str) -> Result<(), BrokerError> {
        self.refuse(self.permissions().check_schema(), || target.to_owned())
    }
}
