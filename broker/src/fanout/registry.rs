//! The live subscriptions of this node: their ids (for `Ack`), their flow state (pending
//! deliveries, credits), durable names (one live subscription per name, the newest taking over),
//! and the limits on how many there may be.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::error::{BrokerError, Reason};
use crate::fanout::hub::{Mailbox, MailboxStats};
use crate::message::Owner;

/// What a subscription does when its consumer falls behind (see docs/FLOW.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowPolicy {
    /// Every matching message, in order, however slow the consumer.
    Lossless,
    /// When behind, only the latest message per channel.
    Conflate,
    /// A bounded window; skipped messages are announced as gaps.
    DropOldest,
}

/// A delivery sent and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    /// When it was (last) sent.
    pub sent_at: Instant,
    /// How many times it was sent.
    pub deliveries: u32,
}

/// A subscription's delivery bookkeeping, shared by its task and the `Ack` handler.
#[derive(Debug, Default)]
pub(crate) struct Flight {
    /// Deliveries sent and not acknowledged, by offset (tracked with credits or when durable).
    pub pending: BTreeMap<u64, Pending>,
    /// The next offset the subscription may deliver.
    pub next_offset: u64,
    /// The highest offset delivered.
    pub last_sent: u64,
    /// Deliveries sent.
    pub delivered: u64,
    /// Every delivery at or below this is acknowledged.
    pub acked_floor: u64,
    /// Redeliveries not yet written to the durable consumer's record.
    pub unsaved_redeliveries: u64,
    /// The task holds deliveries back until acknowledgements return credits.
    pub waiting_for_credit: bool,
}

impl Flight {
    /// Offsets below the oldest pending delivery (or everything sent, when none is pending) are
    /// acknowledged: offsets between deliveries did not match, so they need no acknowledgement.
    fn floor(&self) -> u64 {
        let floor = match self.pending.keys().next() {
            Some(oldest) => oldest.saturating_sub(1),
            None => self.last_sent,
        };
        floor.max(self.acked_floor)
    }
}

/// One live subscription's shared state.
pub(crate) struct Control {
    /// Its id on this node.
    pub id: u64,
    /// Its pattern.
    pub pattern: String,
    /// Its policy.
    pub policy: FlowPolicy,
    /// Its durable name, if any.
    pub durable: Option<String>,
    /// Who opened it (`None` without authentication): only it, or an `admin`, may acknowledge
    /// for it or see it listed.
    pub owner: Option<Owner>,
    /// The most unacknowledged deliveries, if limited.
    pub max_unacked: Option<u32>,
    peer: Option<SocketAddr>,
    mailbox: Mutex<Option<Arc<Mailbox>>>,
    flight: Mutex<Flight>,
    /// Woken when acknowledgements return credits.
    pub acked: Notify,
    cancelled: AtomicBool,
    /// Woken when the subscription must stop (taken over, or its consumer deleted).
    pub cancel: Notify,
}

impl Control {
    /// The delivery bookkeeping.
    pub(crate) fn flight(&self) -> MutexGuard<'_, Flight> {
        self.flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the mailbox the hub feeds, for accounting.
    pub(crate) fn set_mailbox(&self, mailbox: Arc<Mailbox>) {
        *self.mailbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(mailbox);
    }

    /// The mailbox's accounting.
    pub(crate) fn mailbox_stats(&self) -> MailboxStats {
        self.mailbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|m| m.stats())
            .unwrap_or_default()
    }

    /// Whether this subscription tracks pending deliveries (credits or durable).
    pub(crate) fn tracks_pending(&self) -> bool {
        self.max_unacked.is_some() || self.durable.is_some()
    }

    /// Whether another delivery may be sent now.
    pub(crate) fn has_credit(&self) -> bool {
        match self.max_unacked {
            Some(max) => self.flight().pending.len() < max as usize,
            None => true,
        }
    }

    /// Acknowledges `offsets`; returns the pending count and the new floor.
    pub(crate) fn ack(&self, offsets: &[u64]) -> (usize, u64) {
        let mut flight = self.flight();
        for offset in offsets {
            flight.pending.remove(offset);
        }
        let floor = flight.floor();
        flight.acked_floor = floor;
        let pending = flight.pending.len();
        drop(flight);
        self.acked.notify_one();
        (pending, floor)
    }

    /// Asks the subscription to stop.
    pub(crate) fn stop(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.cancel.notify_one();
    }

    /// Whether the subscription was asked to stop.
    pub(crate) fn is_stopped(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// What a new subscription is.
pub(crate) struct Opening {
    /// Its pattern.
    pub pattern: String,
    /// Its policy.
    pub policy: FlowPolicy,
    /// Its durable name.
    pub durable: Option<String>,
    /// Who opens it.
    pub owner: Option<Owner>,
    /// Its credit limit.
    pub max_unacked: Option<u32>,
    /// The client connection it belongs to.
    pub peer: Option<SocketAddr>,
    /// For a durable consumer: its acknowledged offset.
    pub acked_floor: u64,
}

#[derive(Default)]
struct RegistryState {
    by_id: HashMap<u64, Arc<Control>>,
    durable: HashMap<String, u64>,
    per_peer: HashMap<SocketAddr, usize>,
    next_id: u64,
}

/// The live subscriptions of this node; cheap to clone.
#[derive(Clone)]
pub(crate) struct Registry {
    state: Arc<Mutex<RegistryState>>,
    max_per_connection: usize,
    max_per_broker: usize,
}

/// Removes its subscription from the registry when dropped.
pub(crate) struct Registered {
    registry: Registry,
    /// The subscription's shared state.
    pub control: Arc<Control>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        state.by_id.remove(&self.control.id);
        if let Some(name) = &self.control.durable {
            if state.durable.get(name) == Some(&self.control.id) {
                state.durable.remove(name);
            }
        }
        if let Some(peer) = self.control.peer {
            if let Some(n) = state.per_peer.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    state.per_peer.remove(&peer);
                }
            }
        }
    }
}

impl Registry {
    /// A registry with these limits.
    pub(crate) fn new(max_per_connection: usize, max_per_broker: usize) -> Registry {
        Registry {
            state: Arc::new(Mutex::new(RegistryState {
                next_id: 1,
                ..RegistryState::default()
            })),
            max_per_connection,
            max_per_broker,
        }
    }

    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live subscriptions.
    pub(crate) fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Registers a subscription, within the limits. A durable name already live is taken over:
    /// the older subscription is stopped.
    ///
    /// # Errors
    /// RESOURCE_EXHAUSTED `SUBSCRIPTION_LIMIT` past a limit.
    pub(crate) fn open(&self, opening: Opening) -> Result<Registered, BrokerError> {
        let mut state = self.lock();
        if state.by_id.len() >= self.max_per_broker {
            return Err(BrokerError::Exhausted {
                reason: Reason::SubscriptionLimit,
                message: format!(
                    "this broker already serves {} subscriptions (subscriptions.max_per_broker)",
                    self.max_per_broker
                ),
            });
        }
        if let Some(peer) = opening.peer {
            if state.per_peer.get(&peer).copied().unwrap_or(0) >= self.max_per_connection {
                return Err(BrokerError::Exhausted {
                    reason: Reason::SubscriptionLimit,
                    message: format!(
                        "this connection already has {} subscriptions (subscriptions.max_per_connection)",
                        self.max_per_connection
                    ),
                });
            }
            *state.per_peer.entry(peer).or_default() += 1;
        }
        let id = state.next_id;
        state.next_id += 1;
        let control = Arc::new(Control {
            id,
            pattern: opening.pattern,
            policy: opening.policy,
            durable: opening.durable,
            owner: opening.owner,
            max_unacked: opening.max_unacked,
            peer: opening.peer,
            mailbox: Mutex::new(None),
            flight: Mutex::new(Flight {
                acked_floor: opening.acked_floor,
                ..Flight::default()
            }),
            acked: Notify::new(),
            cancelled: AtomicBool::new(false),
            cancel: Notify::new(),
        });
        if let Some(name) = &control.durable {
            if let Some(old) = state.durable.insert(name.clone(), id) {
                if let Some(old) = state.by_id.get(&old) {
                    old.stop();
                }
            }
        }
        state.by_id.insert(id, Arc::clone(&control));
        Ok(Registered {
            registry: self.clone(),
            control,
        })
    }

    /// A live subscription by id.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<Control>> {
        self.lock().by_id.get(&id).cloned()
    }

    /// The live subscription of a durable consumer.
    pub(crate) fn durable(&self, name: &str) -> Option<Arc<Control>> {
        let state = self.lock();
        state
            .durable
            .get(name)
            .and_then(|id| state.by_id.get(id))
            .cloned()
    }

    /// Every live subscription, by id.
    pub(crate) fn list(&self) -> Vec<Arc<Control>> {
        let mut all: Vec<_> = self.lock().by_id.values().cloned().collect();
        all.sort_by_key(|c| c.id);
        all
    }
}
