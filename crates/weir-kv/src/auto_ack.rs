//! Deliveries of an auto-ack consumer (`--acks auto`), with a bound on what kv holds.
//!
//! With automatic acknowledgements the broker ignores the prefetch window and sends as fast as
//! the socket takes it, and lapin buffers whatever arrives without limit. So a task moves the
//! consumer's deliveries into a channel of `2 × prefetch` places; when that channel is full
//! it cancels the consumer, hands on what the broker had already sent (the broker sends
//! nothing for a consumer after confirming its cancellation), and consumes again once half
//! the places are free. One consumer at a time, each drained to its end before the next
//! starts, keeps the queue's order.
//!
//! At shutdown the task cancels the consumer and hands on everything already sent before it
//! closes the channel: the broker forgot those requests when it sent them, so they are
//! applied before kv stops.

use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use futures::StreamExt;

/// What the feed hands on: a delivery, or why consuming ended.
pub type Fed = Result<Delivery, FeedEnded>;

#[derive(Debug, thiserror::Error)]
pub enum FeedEnded {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    ConsumerClosed,
}

/// The receiving side; the task stops when this is dropped (its sends fail) or is aborted
/// with the session.
pub struct AutoAckFeed {
    pub deliveries: mpsc::Receiver<Fed>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AutoAckFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where and how to consume again after a pause.
struct Subscription {
    channel: Channel,
    queue: String,
    tag: String,
}

impl Subscription {
    async fn consume(&self) -> Result<Consumer, lapin::Error> {
        let options = BasicConsumeOptions {
            exclusive: true,
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        self.channel
            .basic_consume(
                self.queue.as_str().into(),
                self.tag.as_str().into(),
                options,
                FieldTable::default(),
            )
            .await
    }

    async fn cancel(&self) -> Result<(), lapin::Error> {
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
    }
}

impl AutoAckFeed {
    /// Starts consuming `queue` with automatic acknowledgements, holding at most `2 × window`
    /// deliveries. `stop` ends consuming; the channel closes once the rest is handed on.
    pub async fn start(
        channel: Channel,
        queue: String,
        tag: String,
        window: u16,
        stop: CancellationToken,
    ) -> Result<Self, lapin::Error> {
        let subscription = Subscription {
            channel,
            queue,
            tag,
        };
        let consumer = subscription.consume().await?;
        let places = 2 * usize::from(window);
        let (sender, deliveries) = mpsc::channel(places);
        let task = tokio::spawn(forward(
            subscription,
            consumer,
            sender,
            places,
            stop.clone(),
        ));
        Ok(AutoAckFeed {
            deliveries,
            stop,
            task,
        })
    }

    /// What the closed channel means: the end of a stop, or a task that ended without
    /// saying why (which must not pass for a clean stop).
    pub fn closed(&self) -> Result<Option<Delivery>, FeedEnded> {
        if self.stop.is_cancelled() {
            Ok(None)
        } else {
            Err(FeedEnded::ConsumerClosed)
        }
    }
}

/// Runs [`hand_on`] and passes on why it ended, if it says.
async fn forward(
    subscription: Subscription,
    consumer: Consumer,
    sender: mpsc::Sender<Fed>,
    places: usize,
    stop: CancellationToken,
) {
    if let Err(ended) = hand_on(&subscription, consumer, &sender, places, &stop).await {
        let _ = sender.send(Err(ended)).await;
    }
}

/// Moves deliveries to `sender`, pausing and resuming the consumer. `Ok` once stopped with
/// everything handed on, or once the receiver is gone (nobody to tell).
async fn hand_on(
    subscription: &Subscription,
    mut consumer: Consumer,
    sender: &mpsc::Sender<Fed>,
    places: usize,
    stop: &CancellationToken,
) -> Result<(), FeedEnded> {
    // Whether a cancel was sent for the current consumer (to pause, or to stop).
    let mut cancelled = false;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled(), if !cancelled => {
                cancelled = true;
                subscription.cancel().await?;
                continue;
            }
            next = consumer.next() => next,
        };
        match next {
            Some(delivery) => match sender.try_send(Ok(delivery?)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(fed)) => {
                    if !cancelled {
                        cancelled = true;
                        metrics::counter!("weir_kv_consumer_pauses_total").increment(1);
                        subscription.cancel().await?;
                    }
                    if sender.send(fed).await.is_err() {
                        return Ok(());
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
            },
            None if !cancelled => return Err(FeedEnded::ConsumerClosed),
            // Stopped and everything the broker sent is handed on: closing the channel says so.
            None if stop.is_cancelled() => return Ok(()),
            None => {
                // Paused: resume once half the places are free.
                tokio::select! {
                    room = sender.reserve_many(places / 2) => if room.is_err() { return Ok(()) },
                    _ = stop.cancelled() => return Ok(()),
                }
                consumer = subscription.consume().await?;
                cancelled = false;
            }
        }
    }
}
