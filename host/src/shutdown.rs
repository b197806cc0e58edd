//! Shutdown is announced on a `watch` channel that turns `true` once; tasks
//! select on [`requested`] next to their work, as in mini-redis.

use tokio::sync::watch;

/// Resolves once shutdown has been requested (or the sender is gone).
pub async fn requested(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here.
    let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
}
