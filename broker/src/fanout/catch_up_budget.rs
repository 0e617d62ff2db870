//! The broker-wide budget for messages read from the store for subscriptions.
//!
//! A subscription that fell behind (it started in the past, or its mailbox overflowed) reads the
//! store in pages. What it reads is its own copy — not shared with other subscriptions the way
//! live messages are — and a subscription whose client stopped reading holds it for as long as
//! its stream does not move: the rest of its page, and what waits in its stream's buffer.
//! Thousands of them would add up to gigabytes (issue 20). So every message read for a
//! subscription is charged, to the broker's [`CatchUpBudget`] and to the subscription's own
//! [`Reader`], until the last reference to it goes (it was encoded onto the wire, or its
//! subscription ended).
//!
//! A page asks for no more than what the budget has left. When the budget is spent, a
//! subscription may still hold [`READER_FLOOR`] bytes of its own: its page is what is left of
//! that, and when it holds the whole floor it waits until its client takes some. So every
//! subscription progresses, one that stopped reading holds little, and what all of them hold is
//! at most the budget plus, per subscription, the floor and one message.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// What one subscription may hold from the store when the broker-wide budget is spent: a page
/// of this size still amortises the decoding of the batch it comes from.
pub(crate) const READER_FLOOR: usize = 32 * 1024;

/// Bytes of messages read from the store and held for subscriptions, and the bound on them.
#[derive(Debug)]
pub(crate) struct CatchUpBudget {
    held: AtomicUsize,
    limit: usize,
}

impl CatchUpBudget {
    /// A budget of `limit` bytes (`subscriptions.catch_up_bytes`).
    pub(crate) fn new(limit: usize) -> Arc<CatchUpBudget> {
        Arc::new(CatchUpBudget {
            held: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now, by every subscription.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn left(&self) -> usize {
        self.limit.saturating_sub(self.held())
    }

    /// The account of one subscription that reads from the store.
    pub(crate) fn reader(self: &Arc<CatchUpBudget>) -> Reader {
        Reader {
            budget: Arc::clone(self),
            own: Arc::new(Own {
                held: AtomicUsize::new(0),
                released: Notify::new(),
            }),
        }
    }
}

/// One subscription's account against the [`CatchUpBudget`].
#[derive(Debug)]
pub(crate) struct Reader {
    budget: Arc<CatchUpBudget>,
    own: Arc<Own>,
}

#[derive(Debug)]
struct Own {
    held: AtomicUsize,
    /// Notified whenever a charge of this subscription is given back.
    released: Notify,
}

impl Reader {
    /// How many bytes the next page may read, at most `wanted`, once it may read any (see the
    /// module docs). A page always holds at least one message, so the store reads one when
    /// this is 0.
    pub(crate) async fn page_bytes(&self, wanted: usize) -> usize {
        loop {
            let left = self.budget.left();
            if left >= READER_FLOOR {
                return wanted.min(left);
            }
            let own = self.own.held.load(Ordering::Relaxed);
            if own < READER_FLOOR {
                return wanted.min(READER_FLOOR - own);
            }
            // `notify_one` keeps a permit when nobody waits: a release between the load above
            // and this await is not missed.
            self.own.released.notified().await;
        }
    }

    /// Charges `bytes` read from the store until the returned charge is dropped.
    pub(crate) fn charge(&self, bytes: usize) -> Charge {
        self.budget.held.fetch_add(bytes, Ordering::Relaxed);
        self.own.held.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            budget: Arc::clone(&self.budget),
            own: Arc::clone(&self.own),
            bytes,
        }
    }
}

/// Bytes charged to a [`Reader`] and its [`CatchUpBudget`], given back on drop.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<CatchUpBudget>,
    own: Arc<Own>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.own.held.fetch_sub(self.bytes, Ordering::Relaxed);
        self.own.released.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll};

    fn now<F: Future>(future: F) -> Poll<F::Output> {
        let waker = futures::task::noop_waker();
        std::pin::pin!(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn pages_shrink_as_the_budget_is_spent_and_grow_as_charges_go() {
        let budget = CatchUpBudget::new(4 * READER_FLOOR);
        let (a, b) = (budget.reader(), budget.reader());
        assert_eq!(now(a.page_bytes(1 << 20)), Poll::Ready(4 * READER_FLOOR));
        let first = a.charge(3 * READER_FLOOR);
        assert_eq!(now(b.page_bytes(1 << 20)), Poll::Ready(READER_FLOOR));
        let second = b.charge(READER_FLOOR + 10);
        assert_eq!(budget.held(), 4 * READER_FLOOR + 10);
        // Spent: `b` holds its floor already and must wait; `a` holds more than its floor too.
        assert!(now(b.page_bytes(1 << 20)).is_pending());
        assert!(now(a.page_bytes(1 << 20)).is_pending());
        // A third subscription still gets its floor.
        assert_eq!(
            now(budget.reader().page_bytes(1 << 20)),
            Poll::Ready(READER_FLOOR)
        );
        drop(first);
        assert_eq!(
            now(a.page_bytes(1 << 20)),
            Poll::Ready(3 * READER_FLOOR - 10)
        );
        drop(second);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_reader_at_its_floor_goes_on_when_its_client_takes_a_message() {
        let budget = CatchUpBudget::new(READER_FLOOR);
        let other = budget.reader().charge(READER_FLOOR);
        let reader = budget.reader();
        let held = reader.charge(READER_FLOOR);
        let page = tokio::spawn(async move { reader.page_bytes(1 << 20).await });
        tokio::task::yield_now().await;
        assert!(!page.is_finished());
        drop(held);
        assert_eq!(page.await.unwrap(), READER_FLOOR);
        drop(other);
    }
}
