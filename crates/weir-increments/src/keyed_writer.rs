//! The embedded mode's keyed requests: each one's key and increment commit to the store in
//! one transaction ([`Store::apply_keyed`]), with group commit, so requests that arrive
//! while a commit runs share the next one (and its sync).

use tokio::sync::{mpsc, oneshot};

use crate::idempotency::Recorded;
use crate::queue::embedded::now_ms;
use crate::store::{KeyedIncrement, Store};

/// Requests per transaction at most: bounds one commit's time.
const MAX_GROUP: usize = 1_024;

type Reply = oneshot::Sender<Result<Recorded, String>>;

/// Hands keyed requests to the writer task; cloned into every handler. The task ends when
/// the last handle is dropped, after answering what it holds.
#[derive(Clone)]
pub struct KeyedWriter {
    tx: mpsc::Sender<(KeyedIncrement, Reply)>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyedError {
    #[error("the keyed writer has stopped")]
    Closed,
    #[error("{0}")]
    Failed(String),
}

impl KeyedWriter {
    pub fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
        tokio::spawn(run(store, rx));
        KeyedWriter { tx }
    }

    /// Resolves once the key and (if it was new) the increment are committed.
    pub async fn apply(&self, keyed: KeyedIncrement) -> Result<Recorded, KeyedError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((keyed, reply))
            .await
            .map_err(|_| KeyedError::Closed)?;
        answer
            .await
            .map_err(|_| KeyedError::Closed)?
            .map_err(KeyedError::Failed)
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<(KeyedIncrement, Reply)>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let (batch, replies): (Vec<_>, Vec<_>) = group.drain(..).unzip();
        match store.apply_keyed(batch, now_ms() as i64).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                // Nothing of the transaction committed: every request may be retried.
                let message = err.to_string();
                for reply in replies {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
    }
}
