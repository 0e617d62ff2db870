//! Graceful shutdown, one mechanism for every task: a trigger flipped once (on SIGTERM or SIGINT),
//! and signals that tasks clone and wait on. The gRPC server stops accepting, streams end with
//! UNAVAILABLE `SHUTTING_DOWN` so clients reconnect elsewhere or later, in-flight publishes finish,
//! then the stores are synced.

use tokio::sync::watch;

/// Flips every [`ShutdownSignal`] made from the same [`channel`].
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Resolves once shutdown has begun; cheap to clone.
#[derive(Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

/// A new trigger and its signal.
pub fn channel() -> (ShutdownTrigger, ShutdownSignal) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), ShutdownSignal(rx))
}

impl ShutdownTrigger {
    /// Begins shutdown. Idempotent.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// A signal for this trigger.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.0.subscribe())
    }
}

impl ShutdownSignal {
    /// Waits until shutdown begins (returns at once if it has). Also returns if the trigger is
    /// dropped, which only happens when the broker is going away anyway.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }

    /// Whether shutdown has begun.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// Installs the SIGTERM and SIGINT (Ctrl-C) handlers now and returns the wait for either.
///
/// Installing is not left to the first poll: a signal that arrives between the broker announcing
/// its address and the wait being polled would otherwise meet the default action and kill the
/// process without a graceful shutdown.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn os_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
