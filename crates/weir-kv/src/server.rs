//! `weir kv serve`: the broker loop around the [`Engine`].
//!
//! One exclusive consumer with manual acknowledgements and a prefetch window. Whatever the
//! broker has sent ahead is handled as one batch: every request applied in delivery order, the
//! batch's writes committed to the journal in one write, then the replies and dead letters
//! published and the whole batch acknowledged with one `multiple` ack. So nothing is
//! acknowledged before it is logged, and the per-request cost is parsing and one store
//! operation. Being the only consumer is what makes delivery order the order of application:
//! a second server on the same queue is refused by the broker (exclusive consume).
//!
//! AMQP does not answer acknowledgements, so an ack that was sent may still be lost with the
//! connection (or with the process) and its requests redelivered. The writes of a batch are
//! therefore kept as unacknowledged, in memory and in the journal, until a later request on
//! the same channel has been answered: the broker handles a channel's frames in order, so that
//! answer proves it has the acks. This confirmation is made whenever the queue is idle and
//! every few batches under load.
//!
//! With `--acks auto` (only without a journal) the broker forgets each request as it sends
//! it: nothing is acknowledged or matched, and deliveries come through [`auto_ack`], which
//! bounds what kv holds since the broker's prefetch window no longer does, and which is read
//! to its end at shutdown.
//!
//! [`auto_ack`]: crate::auto_ack
//!
//! When the broker goes away the loop reconnects with capped exponential backoff, never
//! spinning; the broker redelivers what was not acknowledged and the engine recognises the
//! copies it already applied.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weir_runtime::logs::LogLimiter;
use weir_runtime::Shutdown;

use crate::auto_ack::{AutoAckFeed, FeedEnded};
use crate::config::{Acks, Durability, KvConfig};
use crate::engine::{Engine, Incoming, Outcome};
use crate::journal::{Journal, JournalError, Recovered};
use crate::output::{Output, OutputError};
use crate::protocol::Malformed;

const CONSUMER_TAG: &str = "weir-kv";
const DEAD_LETTERS: &str = "weir_kv_dead_letters_total";
const QUEUE_DEPTH: &str = "weir_kv_queue_depth";
/// How often the request queue's depth is read.
const QUEUE_DEPTH_EVERY: Duration = Duration::from_secs(2);

static BROKER_ERRORS: LogLimiter = LogLimiter::per_second();
static MALFORMED: LogLimiter = LogLimiter::per_second();

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    DataDir(#[from] weir_runtime::datadir::DataDirError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("the snapshot task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why a broker session ended (it is retried, not fatal).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    ConsumerClosed,
    #[error(transparent)]
    Fatal(#[from] KvError),
}

impl From<FeedEnded> for SessionError {
    fn from(ended: FeedEnded) -> Self {
        match ended {
            FeedEnded::Broker(err) => SessionError::Broker(err),
            FeedEnded::ConsumerClosed => SessionError::ConsumerClosed,
        }
    }
}

/// Where a session's requests come from.
enum Deliveries {
    /// Manual acks: the broker's prefetch window bounds what kv holds.
    Window(Consumer),
    /// Automatic acks: the broker sends without a window; the feed bounds what kv holds.
    Feed(AutoAckFeed),
}

impl Deliveries {
    /// The next delivery if one is here already; `Ok(None)` once a stopped feed is drained.
    fn ready(&mut self) -> Option<Result<Option<Delivery>, SessionError>> {
        match self {
            Deliveries::Window(consumer) => consumer.next().now_or_never().map(window_next),
            Deliveries::Feed(feed) => match feed.deliveries.try_recv() {
                Ok(fed) => Some(fed.map(Some).map_err(SessionError::from)),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    Some(feed.closed().map_err(SessionError::from))
                }
            },
        }
    }

    async fn next(&mut self) -> Result<Option<Delivery>, SessionError> {
        match self {
            Deliveries::Window(consumer) => window_next(consumer.next().await),
            Deliveries::Feed(feed) => match feed.deliveries.recv().await {
                Some(fed) => fed.map(Some).map_err(SessionError::from),
                None => feed.closed().map_err(SessionError::from),
            },
        }
    }

    /// Whether shutdown ends reading at once. A feed stops itself at shutdown and must be
    /// read to its end: the broker has already forgotten what it holds.
    fn stops_on_shutdown(&self) -> bool {
        matches!(self, Deliveries::Window(_))
    }
}

/// A manual-ack consumer never ends by itself: its end is the broker cancelling it.
fn window_next(
    next: Option<Result<Delivery, lapin::Error>>,
) -> Result<Option<Delivery>, SessionError> {
    match next {
        Some(delivery) => Ok(Some(delivery?)),
        None => Err(SessionError::ConsumerClosed),
    }
}

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct KvHealth {
    pub broker_connected: AtomicBool,
    pub store_loaded: AtomicBool,
    pub keys: AtomicU64,
}

/// A started server: data dir locked, store loaded; the broker is connected by [`serve`].
///
/// [`serve`]: Running::serve
pub struct Running {
    config: KvConfig,
    engine: Engine,
    journal: Option<Journal>,
    output: Option<Output>,
    health: Arc<KvHealth>,
    token: CancellationToken,
    /// The last write covered by an ack that was sent but is not yet known to the broker.
    ack_unconfirmed: Option<u64>,
    /// `weir_kv_dead_letters_total` by reason, in the order of [`Malformed::REASONS`].
    dead_letters: Vec<metrics::Counter>,
    _data_dir: Option<weir_runtime::datadir::DataDirLock>,
}

pub fn register_metrics() {
    metrics::describe_counter!(
        "weir_kv_requests_total",
        "Requests handled, by action and outcome (applied, duplicate, malformed)."
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        "Messages ready in the request queue, waiting for kv (read every 2 s by a passive declare on its own channel); 0 while disconnected."
    );
    metrics::describe_counter!(
        "weir_kv_reconnects_total",
        "Broker sessions that ended and were retried."
    );
    metrics::describe_histogram!(
        "weir_kv_batch_seconds",
        "From a batch's first delivery to its acknowledgement (apply, log, reply)."
    );
    metrics::describe_gauge!("weir_kv_store_keys", "Keys in the store.");
    metrics::describe_counter!(
        "weir_kv_consumer_pauses_total",
        "Times kv stopped consuming because it held 2 x prefetch requests not yet handled (--acks auto only: the broker's prefetch window does not apply)."
    );
    metrics::describe_gauge!(
        "weir_kv_store_bytes",
        "Bytes of keys and values in the store."
    );
    metrics::describe_gauge!(
        "weir_kv_broker_connected",
        "1 while consuming from the broker."
    );
    metrics::describe_gauge!(
        "weir_kv_journal_bytes",
        "Bytes in the journal since the last snapshot."
    );
    for action in ["add", "remove", "get", "getall"] {
        for outcome in [Outcome::Applied, Outcome::Duplicate] {
            metrics::counter!("weir_kv_requests_total", "action" => action, "outcome" => outcome.label())
                .absolute(0);
        }
    }
    metrics::counter!("weir_kv_requests_total", "action" => "malformed", "outcome" => "malformed")
        .absolute(0);
    let _handles = register_dead_letters();
    metrics::counter!("weir_kv_reconnects_total").absolute(0);
    metrics::counter!("weir_kv_consumer_pauses_total").absolute(0);
    metrics::gauge!(QUEUE_DEPTH).set(0.0);
    metrics::gauge!("weir_kv_broker_connected").set(0.0);
    // Set to the journal's real size once it is open; present from the first scrape either way.
    metrics::gauge!("weir_kv_journal_bytes").set(0.0);
    let _created = metrics::histogram!("weir_kv_batch_seconds");
}

/// `weir_kv_dead_letters_total` at zero for every reason, and its handles, in the order of
/// [`Malformed::REASONS`].
fn register_dead_letters() -> Vec<metrics::Counter> {
    weir_runtime::telemetry::register_labelled_counters(
        DEAD_LETTERS,
        "Malformed requests sent to the dead-letter queue, by reason: invalid_json (not a JSON object with known fields), unknown_action, missing_field, unexpected_field, too_long (a key or value over its limit), bad_limit (getall's limit out of range).",
        "reason",
        &Malformed::REASONS,
    )
}

/// Locks the data directory, loads the snapshot and journal, and opens `--output`.
pub fn start(config: KvConfig, shutdown: &Shutdown) -> Result<Running, KvError> {
    register_metrics();
    let mut output = config.output.as_deref().map(Output::open).transpose()?;
    let (data_dir, journal, engine) = if config.durability == Durability::None {
        // No journal to number writes from: continue the file's numbering.
        let last_op = output.as_ref().map_or(0, Output::last_op);
        (
            None,
            None,
            Engine::new(Default::default(), last_op, Vec::new()),
        )
    } else {
        let lock = weir_runtime::datadir::lock(&config.data_dir, "--data-dir")?;
        let tail_after = output.as_ref().map(Output::last_op);
        let (journal, recovered) = Journal::open(&config.data_dir, config.repair, tail_after)?;
        if let Some(output) = &mut output {
            reconcile_output(output, &recovered)?;
        }
        tracing::info!(
            keys = recovered.store.len(),
            last_op = recovered.last_op,
            unacknowledged = recovered.unacked.len(),
            "kv store loaded"
        );
        let engine = Engine::new(recovered.store, recovered.last_op, recovered.unacked);
        (Some(lock), Some(journal), engine)
    };
    let health = Arc::new(KvHealth::default());
    health.store_loaded.store(true, Ordering::Relaxed);
    let running = Running {
        config,
        engine,
        journal,
        output,
        health,
        token: shutdown.token.clone(),
        ack_unconfirmed: None,
        dead_letters: register_dead_letters(),
        _data_dir: data_dir,
    };
    running.publish_sizes();
    Ok(running)
}

impl Running {
    pub fn health(&self) -> Arc<KvHealth> {
        self.health.clone()
    }

    /// Consumes until the shutdown token, reconnecting whenever the broker goes away.
    pub async fn serve(mut self) -> Result<(), KvError> {
        let mut backoff = Duration::from_millis(100);
        while !self.token.is_cancelled() {
            let started = Instant::now();
            match self.session().await {
                Ok(()) => break,
                Err(SessionError::Fatal(err)) => return Err(err),
                Err(err) => {
                    // Whether the broker got the last acks is unknown: their writes stay
                    // unacknowledged and are matched against the redeliveries.
                    self.ack_unconfirmed = None;
                    self.set_connected(false);
                    metrics::counter!("weir_kv_reconnects_total").increment(1);
                    weir_runtime::warn_limited!(BROKER_ERRORS, %err, retry_in_ms = backoff.as_millis() as u64, "kv lost the broker; reconnecting");
                }
            }
            // A session that lasted a while earned a fresh start on the backoff.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.token.cancelled() => {}
            }
            backoff = (backoff * 2).min(self.config.reconnect_max());
        }
        if let Some(journal) = &mut self.journal {
            journal.commit(self.config.durability == Durability::Fsync)?;
        }
        Ok(())
    }

    fn set_connected(&self, connected: bool) {
        self.health
            .broker_connected
            .store(connected, Ordering::Relaxed);
        metrics::gauge!("weir_kv_broker_connected").set(if connected { 1.0 } else { 0.0 });
    }

    async fn session(&mut self) -> Result<(), SessionError> {
        let properties = ConnectionProperties::default().with_connection_name("weir-kv".into());
        let connection = Connection::connect(&self.config.amqp_url, properties).await?;
        let channel = connection.create_channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for queue in [self.config.queue.clone(), self.config.dead_letter_queue()] {
            channel
                .queue_declare(queue.into(), durable, FieldTable::default())
                .await?;
        }
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let mut deliveries = match self.config.acks {
            Acks::Manual => {
                let options = BasicConsumeOptions {
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                };
                let consumer = channel
                    .basic_consume(
                        self.config.queue.clone().into(),
                        CONSUMER_TAG.into(),
                        options,
                        FieldTable::default(),
                    )
                    .await?;
                Deliveries::Window(consumer)
            }
            Acks::Auto => Deliveries::Feed(
                AutoAckFeed::start(
                    channel.clone(),
                    self.config.queue.clone(),
                    CONSUMER_TAG.into(),
                    self.config.prefetch,
                    self.token.child_token(),
                )
                .await?,
            ),
        };
        // On a channel of its own: a probe that fails cannot close the consuming channel.
        let _depth = QueueDepthProbe::start(
            connection.create_channel().await?,
            self.config.queue.clone(),
        );
        self.engine.new_session();
        self.set_connected(true);
        tracing::info!(queue = %self.config.queue, "kv consuming");
        loop {
            if deliveries.stops_on_shutdown() && self.token.is_cancelled() {
                break;
            }
            let first = match deliveries.ready() {
                Some(next) => next,
                None => {
                    // Idle: the round trip of the confirmation costs no throughput here.
                    self.confirm_acks(&channel).await?;
                    tokio::select! {
                        next = deliveries.next() => next,
                        _ = self.token.cancelled(), if deliveries.stops_on_shutdown() => break,
                    }
                }
            };
            let Some(first) = first? else { break };
            let mut batch = vec![first];
            let mut ended = None;
            while batch.len() < usize::from(self.config.prefetch) {
                match deliveries.ready() {
                    Some(Ok(Some(delivery))) => batch.push(delivery),
                    Some(end) => {
                        ended = Some(end);
                        break;
                    }
                    None => break,
                }
            }
            self.handle_batch(&channel, batch).await?;
            match ended {
                Some(Err(err)) => return Err(err),
                Some(Ok(_)) => break,
                None => {}
            }
        }
        // Stop deliveries, then close: what was not acknowledged goes back to the queue.
        self.confirm_acks(&channel).await?;
        if deliveries.stops_on_shutdown() {
            let _ = channel
                .basic_cancel(CONSUMER_TAG.into(), BasicCancelOptions::default())
                .await;
        }
        let _ = connection.close(200, "weir kv shutting down".into()).await;
        Ok(())
    }

    async fn handle_batch(
        &mut self,
        channel: &Channel,
        batch: Vec<Delivery>,
    ) -> Result<(), SessionError> {
        let started = Instant::now();
        let mut outgoing = Vec::with_capacity(batch.len());
        for delivery in &batch {
            let properties = &delivery.properties;
            let handled = self.engine.handle(Incoming {
                body: &delivery.data,
                redelivered: delivery.redelivered,
                correlation_id: properties
                    .correlation_id()
                    .as_ref()
                    .map(ShortString::as_str),
                reply_to: properties.reply_to().as_ref().map(ShortString::as_str),
                message_id: properties.message_id().as_ref().map(ShortString::as_str),
            });
            metrics::counter!("weir_kv_requests_total", "action" => handled.action, "outcome" => handled.outcome.label())
                .increment(1);
            if let Some(write) = &handled.write {
                if let Some(journal) = &mut self.journal {
                    journal.append(write);
                }
                // Queued only: the lines are written after the journal commit, so the file
                // never holds a write the journal may lose (see `output`).
                if let Some(output) = &mut self.output {
                    output.push(write);
                }
            }
            if let Some(reason) = &handled.dead_letter {
                weir_runtime::warn_limited!(MALFORMED, %reason, body = %weir_runtime::logs::escape(&delivery.data), "malformed kv request; dead-lettered");
            }
            outgoing.push((
                handled.reply,
                handled.dead_letter,
                handled.dead_letter_reason,
            ));
        }
        if let Some(journal) = &mut self.journal {
            journal
                .commit(self.config.durability == Durability::Fsync)
                .map_err(KvError::from)?;
        }
        if let Some(output) = &mut self.output {
            output.flush().map_err(KvError::from)?;
        }
        // Queued together and awaited once (awaiting each costs a wake-up of the connection's
        // I/O loop per message); all are written before the ack is queued, so a request is
        // never acknowledged ahead of its reply or dead letter.
        let dead_letter_queue: ShortString = self.config.dead_letter_queue().into();
        let mut publishes = Vec::with_capacity(batch.len());
        let mut dead_letters = [0u64; Malformed::REASONS.len()];
        for (delivery, (reply, dead_letter, label)) in batch.iter().zip(&outgoing) {
            if let Some(reason) = dead_letter {
                if let Some(at) = label
                    .and_then(|label| Malformed::REASONS.iter().position(|&known| known == label))
                {
                    dead_letters[at] += 1;
                }
                let properties = dead_letter_properties(delivery, reason);
                publishes.push((dead_letter_queue.clone(), &delivery.data[..], properties));
            }
            if let Some(reply_to) = delivery.properties.reply_to() {
                publishes.push((reply_to.clone(), &reply[..], reply_properties(delivery)));
            }
        }
        futures::future::try_join_all(publishes.into_iter().map(
            |(routing_key, body, properties)| {
                channel.basic_publish(
                    "".into(),
                    routing_key,
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
            },
        ))
        .await?;
        for (counter, &count) in self.dead_letters.iter().zip(&dead_letters) {
            if count > 0 {
                counter.increment(count);
            }
        }
        match self.config.acks {
            Acks::Manual => {
                if let Some(last) = batch.last() {
                    channel
                        .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                        .await?;
                }
                self.ack_unconfirmed = Some(self.engine.last_op());
            }
            Acks::Auto => {
                // The broker forgot these when it sent them: nothing can come back to match.
                self.engine.acked_through(self.engine.last_op());
            }
        }
        metrics::histogram!("weir_kv_batch_seconds").record(started.elapsed().as_secs_f64());
        self.publish_sizes();
        // Under steady load the queue is never idle: confirm every few batches, which bounds
        // the writes kept for matching and lets snapshots happen.
        if self.engine.unacked_len() >= 4 * usize::from(self.config.prefetch) {
            self.confirm_acks(channel).await?;
        }
        Ok(())
    }

    /// Makes sure the broker has the acks sent so far (see the module docs); only then are
    /// their writes forgotten as unacknowledged, in memory and in the journal.
    async fn confirm_acks(&mut self, channel: &Channel) -> Result<(), SessionError> {
        let Some(acked) = self.ack_unconfirmed else {
            return Ok(());
        };
        // Any request with an answer would do; this one changes nothing.
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        self.ack_unconfirmed = None;
        let acked = self.engine.acked_through(acked);
        if let Some(journal) = &mut self.journal {
            journal.append_acked(acked);
        }
        self.snapshot_if_due().await?;
        Ok(())
    }

    /// Once the journal is large, writes a snapshot (the file work off the async threads) and
    /// restarts the journal. Runs right after acks are confirmed, so nothing is
    /// unacknowledged and the acknowledged mark is the snapshot's own.
    async fn snapshot_if_due(&mut self) -> Result<(), KvError> {
        let Some(journal) = &mut self.journal else {
            return Ok(());
        };
        metrics::gauge!("weir_kv_journal_bytes").set(journal.len() as f64);
        // A write still awaiting its redelivered copy must stay in the journal.
        if journal.len() < self.config.snapshot_after_bytes || self.engine.unacked_len() > 0 {
            return Ok(());
        }
        journal.commit(true)?;
        // The journal is about to forget these writes: the output file must not need them.
        if let Some(output) = &mut self.output {
            output.sync()?;
        }
        let op = self.engine.last_op();
        let encoded = Journal::encode_snapshot(&self.engine.store, op);
        let dir = self.config.data_dir.clone();
        tokio::task::spawn_blocking(move || Journal::install_snapshot(&dir, &encoded)).await??;
        journal.reset(op)?;
        tracing::info!(
            keys = self.engine.store.len(),
            "kv snapshot written, journal restarted"
        );
        Ok(())
    }

    fn publish_sizes(&self) {
        let store = &self.engine.store;
        self.health
            .keys
            .store(store.len() as u64, Ordering::Relaxed);
        metrics::gauge!("weir_kv_store_keys").set(store.len() as f64);
        metrics::gauge!("weir_kv_store_bytes").set(store.payload_bytes() as f64);
    }
}

/// Reads how many messages are ready in the request queue every [`QUEUE_DEPTH_EVERY`], into
/// `weir_kv_queue_depth`, for as long as a broker session lasts: dropped with the session, it
/// stops and sets the gauge to 0.
struct QueueDepthProbe(tokio::task::JoinHandle<()>);

impl QueueDepthProbe {
    fn start(channel: Channel, queue: String) -> Self {
        QueueDepthProbe(tokio::spawn(async move {
            let gauge = metrics::gauge!(QUEUE_DEPTH);
            let mut tick = tokio::time::interval(QUEUE_DEPTH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match ready_messages(&channel, &queue).await {
                    Ok(ready) => gauge.set(f64::from(ready)),
                    Err(err) => {
                        // The session is ending (or the queue is gone): it reports why.
                        tracing::debug!(%err, "cannot read the request queue's depth");
                        gauge.set(0.0);
                        return;
                    }
                }
            }
        }))
    }
}

impl Drop for QueueDepthProbe {
    fn drop(&mut self) {
        self.0.abort();
        metrics::gauge!(QUEUE_DEPTH).set(0.0);
    }
}

/// Messages ready for delivery in `queue` (not those delivered and unacknowledged), by a
/// passive declare: it creates nothing, and fails if the queue does not exist.
pub async fn ready_messages(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(declared.message_count())
}

fn reply_properties(request: &Delivery) -> BasicProperties {
    let properties = BasicProperties::default().with_content_type("application/json".into());
    match request.properties.correlation_id() {
        Some(id) => properties.with_correlation_id(id.clone()),
        None => properties,
    }
}

/// The most the headers of a dead letter may take. The request's own header frame fitted
/// the negotiated frame size (128 KiB on RabbitMQ by default); the copy adds a reason, so one
/// near that size would make the broker close the connection (FRAME_ERROR), bring the request
/// back, and fail the same way forever.
pub const DEAD_LETTER_HEADER_BYTES: usize = 32 * 1024;
const REASON_HEADER: &str = "x-weir-reason";
const DROPPED_HEADER: &str = "x-weir-dropped-headers";

/// The request's own properties, persistent, with the reason in `x-weir-reason`, and only the
/// headers that fit [`DEAD_LETTER_HEADER_BYTES`]: the others are dropped and named in
/// `x-weir-dropped-headers`.
fn dead_letter_properties(request: &Delivery, reason: &str) -> BasicProperties {
    let headers = request.properties.headers().clone().unwrap_or_default();
    request
        .properties
        .clone()
        .with_headers(dead_letter_headers(&headers, reason))
        .with_delivery_mode(2)
}

/// See [`dead_letter_properties`]. Headers are kept in their (sorted) order while they fit;
/// the reason and the list of dropped names are bounded, so the whole stays within the limit.
pub fn dead_letter_headers(headers: &FieldTable, reason: &str) -> FieldTable {
    const NAMES_BYTES: usize = 1024;
    let reason: String = bounded(reason, 1024);
    let mut budget = DEAD_LETTER_HEADER_BYTES
        - field_bytes(
            REASON_HEADER,
            &AMQPValue::LongString(reason.as_str().into()),
        )
        - (1 + DROPPED_HEADER.len() + 5 + NAMES_BYTES);
    let mut kept = FieldTable::default();
    let mut dropped: Vec<&str> = Vec::new();
    for (name, value) in headers.inner() {
        if name.as_str() == REASON_HEADER || name.as_str() == DROPPED_HEADER {
            continue;
        }
        let size = field_bytes(name.as_str(), value);
        if size <= budget {
            budget -= size;
            kept.insert(name.clone(), value.clone());
        } else {
            dropped.push(name.as_str());
        }
    }
    kept.insert(
        REASON_HEADER.into(),
        AMQPValue::LongString(reason.as_str().into()),
    );
    if !dropped.is_empty() {
        let names = bounded(&dropped.join(","), NAMES_BYTES);
        kept.insert(
            DROPPED_HEADER.into(),
            AMQPValue::LongString(names.as_str().into()),
        );
    }
    kept
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn bounded(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The encoded size of one table entry (name and typed value), as AMQP 0-9-1 frames it.
fn field_bytes(name: &str, value: &AMQPValue) -> usize {
    1 + name.len() + value_bytes(value)
}

fn value_bytes(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::ShortString(text) => 1 + text.as_str().len(),
        AMQPValue::LongString(text) => 4 + text.as_bytes().len(),
        AMQPValue::ByteArray(bytes) => 4 + bytes.as_slice().len(),
        AMQPValue::FieldArray(values) => {
            4 + values.as_slice().iter().map(value_bytes).sum::<usize>()
        }
        AMQPValue::FieldTable(table) => {
            4 + table
                .inner()
                .iter()
                .map(|(name, value)| field_bytes(name.as_str(), value))
                .sum::<usize>()
        }
        // Numbers, booleans, decimals, timestamps: at most eight bytes (decimals nine).
        _ => 9,
    }
}

/// Brings `--output` in line with the journal (see `output`): lines past it cut, the
/// journal's writes the file lacks appended.
fn reconcile_output(output: &mut Output, recovered: &Recovered) -> Result<(), KvError> {
    if output.last_op() > recovered.last_op {
        return Ok(output.cut_after(recovered.last_op)?);
    }
    let wanted = output.last_op() + 1;
    let available = recovered
        .tail
        .first()
        .map_or(recovered.last_op + 1, |w| w.op);
    if available > wanted && recovered.last_op >= wanted {
        tracing::warn!(
            from = wanted,
            through = available - 1,
            "kv --output lacks writes that only the snapshot holds; it continues after them"
        );
    }
    for write in &recovered.tail {
        output.push(write);
    }
    Ok(output.flush()?)
}

/// `/healthz` and `/readyz` (broker connected and store loaded), for the metrics listener.
pub fn health_router(health: Arc<KvHealth>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    let broker = health.broker_connected.load(Ordering::Relaxed);
                    let store = health.store_loaded.load(Ordering::Relaxed);
                    let status = if broker && store {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let body = serde_json::json!({
                        "ready": broker && store,
                        "broker": if broker { "connected" } else { "reconnecting" },
                        "store": if store { "loaded" } else { "loading" },
                        "keys": health.keys.load(Ordering::Relaxed),
                    });
                    (status, Json(body)).into_response()
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_the_headers_that_fit_and_names_the_others() {
        let mut headers = FieldTable::default();
        headers.insert(
            "big".into(),
            AMQPValue::LongString("x".repeat(131_000).into()),
        );
        headers.insert("small".into(), AMQPValue::LongString("s".into()));
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString("forged".into()));
        let copy = dead_letter_headers(&headers, "invalid JSON");
        let table = copy.inner();
        assert!(!table.contains_key("big"));
        assert_eq!(table.get("small"), Some(&AMQPValue::LongString("s".into())));
        assert_eq!(
            table.get(REASON_HEADER),
            Some(&AMQPValue::LongString("invalid JSON".into()))
        );
        assert_eq!(
            table.get(DROPPED_HEADER),
            Some(&AMQPValue::LongString("big".into()))
        );
        let size: usize = table.iter().map(|(k, v)| field_bytes(k.as_str(), v)).sum();
        assert!(size <= DEAD_LETTER_HEADER_BYTES, "{size}");
    }

    #[test]
    fn headers_that_fit_are_kept_whole() {
        let mut headers = FieldTable::default();
        headers.insert("n".into(), AMQPValue::LongLongInt(7));
        let copy = dead_letter_headers(&headers, "why");
        assert_eq!(copy.inner().get("n"), Some(&AMQPValue::LongLongInt(7)));
        assert!(!copy.inner().contains_key(DROPPED_HEADER));
    }
}
