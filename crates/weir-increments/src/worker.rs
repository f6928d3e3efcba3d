//! The worker: reads the queue, sums per key, flushes on time, acknowledges after commit.
//!
//! A flush starts when the oldest held increment is `flushIntervalMs` old, so what is
//! persisted lags by at most that interval plus one commit, and retries back off within
//! the remaining staleness budget. A failed flush keeps everything it held (the queue is
//! not acknowledged, so nothing is lost even if this process then dies) and retries.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::aggregate::{Aggregator, Item, Pending};
use crate::config::IncrementsConfig;
use crate::metric_names::{
    APPLIED, BATCH_KEYS, BATCH_SIZE, DEAD_LETTERS, DUPLICATES_SKIPPED, ENTRIES_RELEASED,
    FLUSH_FAILURES, FLUSH_SECONDS, IDEMPOTENCY_KEYS_PRUNED, QUEUE_DEPTH, STALENESS_MAX_SECONDS,
    STALENESS_SECONDS, WORKER_HELD,
};
use crate::queue::embedded::now_ms;
use crate::queue::{Consumer, Next, QueueError};
use crate::store::{DeadLetterRetention, Fencing, FlushReport, Store};

pub use crate::health::WorkerHealth;

static DEAD_LETTER_LOG: weir_runtime::logs::LogLimiter =
    weir_runtime::logs::LogLimiter::per_second();

/// How often acknowledged entries are dropped from the stream and the applied table.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How often old and excess dead letters are deleted: they grow slowly, and the count
/// behind the row limit is not free.
const DEAD_LETTER_PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct Worker {
    consumer: Consumer,
    store: Store,
    aggregator: Aggregator,
    source: String,
    interval: Duration,
    max_staleness: Duration,
    max_pending: usize,
    claim_idle: Duration,
    shutdown_flush: Duration,
    health: Arc<WorkerHealth>,
    last_prune: Instant,
    dead_letter_retention: DeadLetterRetention,
    idempotency_retention: Duration,
    /// None until the first prune, which runs at once: a restart after a long stop
    /// prunes what expired meanwhile.
    last_dead_letter_prune: Option<Instant>,
    last_touch: Instant,
    last_depth: Instant,
}

impl Worker {
    pub fn new(
        consumer: Consumer,
        store: Store,
        config: &IncrementsConfig,
        health: Arc<WorkerHealth>,
    ) -> Self {
        Worker {
            source: consumer.source(),
            consumer,
            store,
            aggregator: Aggregator::default(),
            interval: config.flush_interval(),
            max_staleness: config.max_staleness(),
            max_pending: config.max_pending,
            claim_idle: Duration::from_millis(config.claim_idle_ms),
            shutdown_flush: Duration::from_millis(config.shutdown_flush_ms),
            health,
            last_prune: Instant::now(),
            dead_letter_retention: config.dead_letter_retention(),
            idempotency_retention: config.idempotency_retention(),
            last_dead_letter_prune: None,
            last_touch: Instant::now(),
            last_depth: Instant::now(),
        }
    }

    /// Runs until `token` is cancelled (Redis) or the embedded log closes, then flushes
    /// what it holds and acknowledges it.
    pub async fn run(mut self, token: CancellationToken) {
        let mut stopping_since: Option<Instant> = None;
        loop {
            if token.is_cancelled() {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                // The embedded log closes by itself once the API has drained; a Redis
                // worker stops reading at once. Either way the wait is bounded.
                if matches!(self.consumer, Consumer::Redis(_))
                    || since.elapsed() > self.shutdown_flush
                {
                    break;
                }
            }
            let wait = self.until_due().min(Duration::from_millis(200));
            match self.consumer.next(wait).await {
                Ok(Next::Items(items)) => {
                    self.hold(items);
                }
                Ok(Next::Idle) => {}
                Ok(Next::Closed) => break,
                Err(QueueError::StreamLost(_)) => self.recover_lost_stream().await,
                Err(err) => {
                    tracing::warn!(%err, "cannot read the queue; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = token.cancelled() => {}
                    }
                }
            }
            self.health
                .streams_lost
                .store(self.consumer.streams_lost(), Ordering::Relaxed);
            metrics::gauge!(WORKER_HELD).set(self.aggregator.len() as f64);
            if self.last_depth.elapsed() >= Duration::from_secs(1) {
                self.last_depth = Instant::now();
                if let Ok(depth) = self.consumer.depth().await {
                    metrics::gauge!(QUEUE_DEPTH).set(depth as f64);
                }
            }
            if self.until_due().is_zero() || self.aggregator.len() >= self.max_pending {
                self.catch_up().await;
                self.flush(&token).await;
            }
            self.housekeeping().await;
        }
        // What was not read stays in the log (or the stream) for the next start.
        self.flush(&token).await;
    }

    /// Reads whatever the queue holds right now and flushes it: one step of the loop
    /// without its clock, for tests and tools.
    pub async fn flush_once(&mut self, token: &CancellationToken) -> Option<FlushReport> {
        self.catch_up().await;
        self.flush(token).await
    }

    /// Before a flush, takes what is already waiting in the queue (within a small time
    /// budget). Without this a worker that fell behind would flush one read at a time, each
    /// already due, and never catch up; with it a backlog goes out in a few large flushes.
    async fn catch_up(&mut self) {
        let budget = Instant::now() + (self.interval / 4).min(Duration::from_millis(250));
        while self.aggregator.len() < self.max_pending && Instant::now() < budget {
            match self.consumer.next(Duration::from_millis(1)).await {
                Ok(Next::Items(items)) => self.hold(items),
                Ok(Next::Idle) | Ok(Next::Closed) | Err(_) => return,
            }
        }
    }

    fn hold(&mut self, items: Vec<Item>) {
        match self.consumer {
            Consumer::Embedded(_) => items
                .into_iter()
                .for_each(|item| self.aggregator.push(item)),
            Consumer::Redis(_) => {
                let received = now_ms();
                for item in items {
                    self.aggregator.push_received(item, received);
                }
            }
        }
    }

    fn until_due(&self) -> Duration {
        match self.aggregator.oldest_ms() {
            None => self.interval,
            Some(oldest) => {
                let due = oldest.saturating_add(self.interval.as_millis() as u64);
                Duration::from_millis(due.saturating_sub(now_ms()))
            }
        }
    }

    /// Commits everything held, retrying with backoff until it succeeds (or, while
    /// stopping, until the shutdown budget is spent: the queue still holds it all).
    pub async fn flush(&mut self, token: &CancellationToken) -> Option<FlushReport> {
        if self.aggregator.is_empty() {
            return None;
        }
        let pending = Arc::new(self.aggregator.take());
        let mut backoff = Duration::from_millis(50);
        // Each failed attempt waits at most half the claim threshold (the store's lock
        // bound); with a third more of backoff the held entries are still refreshed before
        // other workers would take them over.
        let cap = (self.max_staleness / 4)
            .min(self.claim_idle / 3)
            .max(Duration::from_millis(50));
        let started = Instant::now();
        let dedupe = self.consumer.dedupe();
        // Entries taken over from another worker, or a retry that cannot know whether its
        // last attempt committed, need the exclusive path (see `store::fence`).
        let mut exclusive = self.consumer.take_claimed();
        loop {
            let attempt = Instant::now();
            let fencing = self
                .consumer
                .fence()
                .map(|fence| Fencing { fence, exclusive });
            let flushed = self
                .store
                .flush(
                    &self.source,
                    dedupe,
                    pending.clone(),
                    now_ms() as i64,
                    fencing,
                )
                .await;
            exclusive = true;
            match flushed {
                Ok(report) => {
                    self.record(&pending, &report, attempt.elapsed());
                    if let Err(err) = self.consumer.publish_dead(&report.dead).await {
                        // The store holds every dead letter; the stream copy is a courtesy.
                        tracing::warn!(%err, "cannot copy dead letters to the dead-letter stream");
                    }
                    self.acknowledge(&pending, &report.released).await;
                    return Some(report);
                }
                Err(err) => {
                    self.health
                        .flush_failed(err.to_string(), pending.oldest_ms, now_ms());
                    metrics::counter!(FLUSH_FAILURES).increment(1);
                    tracing::warn!(%err, retry_in_ms = backoff.as_millis() as u64, "flush failed; retrying");
                    if token.is_cancelled() && started.elapsed() > self.shutdown_flush {
                        tracing::error!("giving up the final flush; the queue keeps the increments for the next start");
                        return None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cap);
                    self.keep_alive(&pending).await;
                }
            }
        }
    }

    fn record(&self, pending: &Pending, report: &FlushReport, took: Duration) {
        let now = now_ms();
        tracing::debug!(
            took_ms = took.as_millis() as u64,
            applied = report.applied,
            keys = report.keys,
            "flushed"
        );
        self.health.flush_succeeded(now);
        metrics::histogram!(FLUSH_SECONDS).record(took.as_secs_f64());
        metrics::histogram!(BATCH_SIZE).record(pending.len as f64);
        metrics::histogram!(BATCH_KEYS).record(report.keys as f64);
        metrics::counter!(APPLIED).increment(report.applied as u64);
        metrics::counter!(DUPLICATES_SKIPPED).increment(report.duplicates as u64);
        if !report.released.is_empty() {
            metrics::counter!(ENTRIES_RELEASED).increment(report.released.len() as u64);
            tracing::info!(
                released = report.released.len(),
                "left held entries to the worker that took them over (this worker was paused or slow)"
            );
        }
        if let Some(oldest) = pending.oldest_ms {
            let staleness = now.saturating_sub(oldest);
            metrics::histogram!(STALENESS_SECONDS).record(staleness as f64 / 1000.0);
            let max = self
                .health
                .max_staleness_ms
                .fetch_max(staleness, Ordering::Relaxed)
                .max(staleness);
            metrics::gauge!(STALENESS_MAX_SECONDS).set(max as f64 / 1000.0);
        }
        if !report.dead.is_empty() {
            metrics::counter!(DEAD_LETTERS, "reason" => "overflow")
                .increment(report.dead.len() as u64);
            // A client can send overflowing increments on purpose: one line each would let
            // it fill the disk, so the metric counts them all and the log shows a sample.
            for letter in &report.dead {
                weir_runtime::warn_limited!(DEAD_LETTER_LOG, key = %letter.key, value = letter.value, reason = %letter.reason, "increment dead-lettered");
            }
        }
    }

    async fn acknowledge(&mut self, pending: &Pending, released: &[crate::aggregate::EntryId]) {
        // A failed ack loses nothing: the entries come back and the store recognises them.
        for attempt in 0..3 {
            match self.consumer.ack(pending, released).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(%err, attempt, "cannot acknowledge a committed flush");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn keep_alive(&mut self, pending: &Pending) {
        if self.last_touch.elapsed() < self.claim_idle / 3 {
            return;
        }
        self.last_touch = Instant::now();
        let mut held: Vec<_> = pending.ids().collect();
        if let Err(err) = self.consumer.keep_alive(std::mem::take(&mut held)).await {
            tracing::warn!(%err, "cannot refresh held entries");
        }
    }

    /// Forgets what can never be delivered again: acknowledged entries leave the stream,
    /// and their ids leave the store's applied table, so neither grows with the traffic
    /// ever accepted. Often enough that a busy stream stays small, rarely enough that it
    /// costs nothing next to the flushes.
    async fn housekeeping(&mut self) {
        self.prune_dead_letters().await;
        if self.last_prune.elapsed() < PRUNE_EVERY {
            return;
        }
        self.last_prune = Instant::now();
        let bound = match self.consumer.prune_bound().await {
            // Not past what this worker holds: after the group was lost and recreated, the
            // group's state says nothing of the entries read from the old one.
            Ok(Some(bound)) => self
                .aggregator
                .lowest_id()
                .map_or(bound, |held| bound.min(held)),
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(%err, "cannot read the queue position for pruning");
                return;
            }
        };
        match self.consumer.trim_below(bound).await {
            Ok(removed) if removed > 0 => {
                tracing::debug!(removed, "trimmed acknowledged entries from the stream")
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "cannot trim the stream"),
        }
        match self.store.prune_applied(&self.source, bound).await {
            Ok(removed) if removed > 0 => {
                tracing::debug!(removed, "forgot acknowledged entry ids")
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "cannot prune applied entry ids"),
        }
    }
}

impl Worker {
    /// The stream (or its group) is gone: see `RedisConsumer::recover_lost_group`.
    async fn recover_lost_stream(&mut self) {
        if let Err(err) = self.consumer.recover_lost_group(&self.store).await {
            tracing::warn!(%err, "cannot recover the lost stream; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Keeps the dead letters (store table and Redis stream) within their retention and
    /// row limit.
    async fn prune_dead_letters(&mut self) {
        if self
            .last_dead_letter_prune
            .is_some_and(|at| at.elapsed() < DEAD_LETTER_PRUNE_EVERY)
        {
            return;
        }
        self.last_dead_letter_prune = Some(Instant::now());
        let retention = self.dead_letter_retention;
        let now = now_ms();
        let before_ms = now.saturating_sub(retention.max_age.as_millis() as u64);
        let keep = retention.max_rows;
        match self
            .store
            .prune_dead_letters(&self.source, now as i64, retention)
            .await
        {
            Ok(removed) if removed > 0 => {
                tracing::info!(removed, "pruned dead letters beyond their retention")
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "cannot prune the dead-letter table"),
        }
        if let Err(err) = self.consumer.trim_dead_letters(before_ms, keep).await {
            tracing::warn!(%err, "cannot trim the dead-letter stream");
        }
        // Keys of the embedded mode live in the store (Redis expires its own).
        let keys_before = now.saturating_sub(self.idempotency_retention.as_millis() as u64);
        match self.store.prune_keys(keys_before as i64).await {
            Ok(removed) => {
                metrics::counter!(IDEMPOTENCY_KEYS_PRUNED).increment(removed);
                if removed > 0 {
                    tracing::info!(removed, "forgot idempotency keys beyond their retention");
                }
            }
            Err(err) => tracing::warn!(%err, "cannot prune idempotency keys"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::embedded;
    use crate::validate::Increment;
    use uuid::Uuid;

    #[tokio::test]
    async fn a_flush_commits_then_releases_and_a_reopened_log_replays_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = IncrementsConfig {
            data_dir: dir.path().to_path_buf(),
            ..IncrementsConfig::default()
        };
        let store = Store::open(&config).await.unwrap();
        let key = Uuid::from_u128(7);
        let token = CancellationToken::new();
        {
            let (producer, consumer) = embedded::open(&config.log_dir(), 0, false).unwrap();
            let health = Arc::new(WorkerHealth::default());
            let mut worker = Worker::new(
                Consumer::Embedded(consumer),
                store.clone(),
                &config,
                health.clone(),
            );
            for value in [3, 4] {
                producer.enqueue(Increment { key, value }).await.unwrap();
            }
            let report = worker.flush_once(&token).await.unwrap();
            assert_eq!((report.applied, report.duplicates), (2, 0));
            assert!(health.last_flush_ms.load(Ordering::Relaxed) > 0);
            assert_eq!(
                producer.depth(),
                0,
                "committed increments leave the queue depth"
            );
            assert!(
                worker.flush_once(&token).await.is_none(),
                "nothing left to flush"
            );
        }
        assert_eq!(store.count(key).await.unwrap().unwrap().total, 7);
        // A restart reads the log above the committed watermark: nothing to apply twice.
        let watermark = store.watermark("embedded").await.unwrap();
        assert_eq!(watermark, 2);
        let (_producer, mut consumer) =
            embedded::open(&config.log_dir(), watermark, false).unwrap();
        assert!(consumer.try_next().unwrap().is_none());
    }
}
