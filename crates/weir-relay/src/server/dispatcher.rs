//! The dispatcher: the one task that owns the reorder window, the follow graph and the
//! router, so routing needs no locks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use weir_runtime::logs::LogLimiter;
use weir_runtime::{info_limited, warn_limited};

use super::state_writer::StateWriter;
use super::{ClientHandle, Control, SourceItem, SourceMessage};
use crate::config::{RelayConfig, RelayConfigError, SourceMode};
use crate::delivery::DeliveryClock;
use crate::event::Event;
use crate::gap_timer::GapTimer;
use crate::graph::FollowGraph;
use crate::queue_budget;
use crate::reorder::{Insert, Released, ReorderWindow};
use crate::router::Router;
use crate::state::StreamState;
use crate::stats::{Counts, RelayStats};

/// A held window slot: an event, or a sequence number whose line was malformed and which is
/// released as handled so the stream does not stall on it.
enum Slot {
    Event(Event),
    Skip,
}

pub(super) struct Dispatcher {
    config: Arc<RelayConfig>,
    stats: Arc<RelayStats>,
    router: Router<ClientHandle>,
    window: ReorderWindow<Slot>,
    released: Vec<Released<Slot>>,
    counts: Counts,
    /// With `--gap-timeout-ms`: how long held events have waited behind their gaps.
    gaps: Option<GapTimer<tokio::time::Instant>>,
    state_dirty: bool,
    state_writer: Option<StateWriter>,
    /// No save before this: a large graph is saved less often (see `state::save_spacing`).
    next_save: tokio::time::Instant,
    /// Bytes queued for all clients together (see `QueuedBytes`).
    queued_total: Arc<AtomicUsize>,
    /// Receipt times of held events: the delivery latency samples and the oldest's age.
    clock: DeliveryClock,
}

/// A source that connects and leaves in a loop must not write two lines each time.
static SOURCE_LOG: LogLimiter = LogLimiter::per_second();
static SLOW_CLIENT_LOG: LogLimiter = LogLimiter::per_second();
static QUEUE_BUDGET_LOG: LogLimiter = LogLimiter::per_second();
/// More releases than one 64 KiB read of the source can produce (16,384 lines of 4 bytes), so
/// ordinary batches never shrink and regrow it.
const RELEASED_KEEP: usize = 16_384;

/// How often the age of the oldest held event is refreshed while nothing else happens.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

static GAP_LOG: LogLimiter = LogLimiter::per_second();
static STALE_LOG: LogLimiter = LogLimiter::per_second();
static TOO_FAR_AHEAD_LOG: LogLimiter = LogLimiter::per_second();

impl Dispatcher {
    pub(super) fn new(
        config: Arc<RelayConfig>,
        stats: Arc<RelayStats>,
        saved: Option<StreamState>,
        state_writer: Option<StateWriter>,
        queued_total: Arc<AtomicUsize>,
    ) -> Result<Self, RelayConfigError> {
        let (next, graph) = match saved {
            Some(saved) => (saved.next_sequence, saved.graph()),
            None => (1, FollowGraph::new()),
        };
        let window =
            ReorderWindow::new(next, config.window_capacity()?, config.max_sequence_ahead());
        let gaps = config.gap_timeout().map(GapTimer::new);
        Ok(Dispatcher {
            window,
            router: Router::new(graph),
            config,
            stats,
            released: Vec::new(),
            counts: Counts::default(),
            gaps,
            state_dirty: false,
            state_writer,
            next_save: tokio::time::Instant::now(),
            queued_total,
            clock: DeliveryClock::default(),
        })
    }

    pub(super) async fn run(
        mut self,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut source: mpsc::Receiver<SourceMessage>,
        token: CancellationToken,
    ) {
        let mut state_tick = tokio::time::interval(self.config.state_interval());
        state_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While events are held and nothing arrives, their age still grows: the gauge is
        // refreshed at least this often.
        let mut gauge_tick = tokio::time::interval(GAUGE_REFRESH);
        gauge_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.window.next_expected();
            let gap_deadline = self.gaps.as_mut().and_then(|gaps| gaps.deadline(next));
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                Some(message) = control.recv() => self.on_control(message),
                Some(message) = source.recv() => self.on_source(message),
                _ = sleep_until(gap_deadline), if gap_deadline.is_some() => self.give_up_late_gaps(),
                _ = state_tick.tick(), if self.state_writer.is_some() => self.save_state(),
                _ = gauge_tick.tick(), if self.window.held() > 0 => {}
            }
            self.publish();
        }
        // Shutdown: what the sources already read is accepted; route it, then let go of
        // every client so its session writes what is queued and closes.
        source.close();
        while let Some(message) = source.recv().await {
            self.on_source(message);
        }
        while let Ok(message) = control.try_recv() {
            self.on_control(message);
        }
        if let Some(writer) = self.state_writer.take() {
            writer.finish(self.capture_state()).await;
        }
        let clients = self.router.drain_clients();
        self.publish();
        tracing::info!(clients = clients.len(), "relay stopped");
    }

    fn on_control(&mut self, message: Control) {
        match message {
            Control::Connect { conn, user, handle } => self.router.connect(conn, user, handle),
            Control::Disconnect { conn } => {
                self.router.disconnect(conn);
            }
            Control::Rejected => self.counts.clients_rejected += 1,
            Control::Refused => self.counts.clients_refused += 1,
        }
    }

    fn on_source(&mut self, message: SourceMessage) {
        match message {
            SourceMessage::Started { peer, position } => {
                let resume = self.config.source_mode == SourceMode::Resume;
                self.stats.set_sources_connected(1);
                if !resume {
                    self.window.reset(1);
                    self.router.graph_mut().clear();
                    if let Some(gaps) = &mut self.gaps {
                        gaps.clear();
                    }
                    self.clock.clear();
                }
                // The session may be gone already; then there is nobody to tell.
                let _ = position.send(self.window.next_expected());
                info_limited!(
                    SOURCE_LOG,
                    %peer,
                    next_sequence = self.window.next_expected(),
                    "stream {}",
                    if resume { "continues" } else { "starts" }
                );
            }
            SourceMessage::Batch { items, received } => self.on_batch(items, received),
            SourceMessage::Ended { peer } => {
                if self.config.source_mode == SourceMode::Reset {
                    // The stream is over: nothing can fill the gaps any more.
                    let mut released = std::mem::take(&mut self.released);
                    self.window.drain_all(&mut released);
                    self.released = released;
                    if let Some(gaps) = &mut self.gaps {
                        gaps.clear();
                    }
                    self.deliver_released();
                }
                info_limited!(
                    SOURCE_LOG,
                    %peer,
                    next_sequence = self.window.next_expected(),
                    held = self.window.held(),
                    "source gone; everything deliverable was delivered"
                );
                self.stats.set_sources_connected(0);
                self.state_dirty = true;
            }
            SourceMessage::Refused => self.counts.sources_refused += 1,
        }
    }

    fn on_batch(&mut self, items: Vec<SourceItem>, received: Instant) {
        let mut released = std::mem::take(&mut self.released);
        // The highest number accepted from this read: while it is held, so is the read.
        let mut highest = None;
        for item in items {
            let (seq, slot) = match item {
                SourceItem::Event(event) => {
                    self.counts.events_received += 1;
                    (event.seq, Slot::Event(event))
                }
                SourceItem::Malformed(bad) => {
                    self.counts.events_malformed += 1;
                    match bad.seq {
                        Some(seq) => (seq, Slot::Skip),
                        None => continue,
                    }
                }
            };
            let next = self.window.next_expected();
            let sampled = DeliveryClock::is_sampled(seq) && matches!(slot, Slot::Event(_));
            match self.window.insert(seq, slot, &mut released) {
                Insert::Accepted => {
                    highest = highest.max(Some(seq));
                    if sampled {
                        self.clock.sample(seq, received);
                    }
                }
                Insert::Stale | Insert::Duplicate => {
                    self.counts.events_stale += 1;
                    warn_limited!(
                        STALE_LOG,
                        seq,
                        next_expected = next,
                        "dropped an event whose sequence number was already handled"
                    );
                }
                Insert::TooFarAhead => {
                    self.counts.events_too_far_ahead += 1;
                    warn_limited!(
                        TOO_FAR_AHEAD_LOG,
                        seq,
                        next_expected = next,
                        max_ahead = self.config.max_sequence_ahead(),
                        "dropped an event whose sequence number is implausibly far ahead"
                    );
                }
            }
        }
        self.released = released;
        let next = self.window.next_expected();
        self.clock.read(received, highest, next);
        if let (Some(gaps), Some(highest)) = (&mut self.gaps, highest) {
            if highest >= next {
                // The dispatcher's clock, not the read's: tests pause tokio's.
                gaps.held(tokio::time::Instant::now(), highest);
            }
        }
        self.deliver_released();
    }

    /// The gap timeout passed for some held events: every missing number before the last
    /// of them is given up on at once.
    fn give_up_late_gaps(&mut self) {
        let Some(through) = self
            .gaps
            .as_mut()
            .and_then(|gaps| gaps.expired(tokio::time::Instant::now()))
        else {
            return;
        };
        let mut released = std::mem::take(&mut self.released);
        self.window.give_up_through(through, &mut released);
        self.released = released;
        self.deliver_released();
    }

    /// Routes everything the window released, then hands each client its bytes.
    fn deliver_released(&mut self) {
        for released in self.released.drain(..) {
            match released {
                Released::Event(Slot::Event(event)) => {
                    self.counts.events_delivered += 1;
                    self.counts.notifications_sent += self.router.route(&event) as u64;
                }
                Released::Event(Slot::Skip) => {}
                Released::Gap { first, count } => {
                    self.counts.gaps_skipped += count;
                    warn_limited!(GAP_LOG, first, count, "skipped missing sequence numbers");
                }
            }
        }
        // A window drained at once (the source left with 100,000 events held) fills this
        // far beyond one read's worth; that memory is not kept for the rest of the stream.
        if self.released.capacity() > RELEASED_KEEP {
            self.released.shrink_to(RELEASED_KEEP);
        }
        self.hand_out_pending();
        self.enforce_queue_budget();
        self.state_dirty = true;
        let stats = &self.stats;
        self.clock
            .released(self.window.next_expected(), Instant::now, |wait| {
                stats.record_delivery(wait)
            });
    }

    /// Hands each client its bytes; a client whose queue would pass `clientBuffer` is
    /// dropped instead.
    fn hand_out_pending(&mut self) {
        let limit = self.config.client_buffer;
        let dropped = self.router.flush(|client, bytes| {
            let len = bytes.len();
            if client.queued.client() + len > limit {
                return false;
            }
            client.queued.add(len);
            if client.tx.send(Bytes::from(bytes)).is_err() {
                // The session is already leaving (its disconnect follows) and never saw these.
                client.queued.sub(len);
            }
            true
        });
        for (conn, client) in dropped {
            client.kick.cancel();
            self.counts.clients_dropped_slow += 1;
            warn_limited!(
                SLOW_CLIENT_LOG,
                conn,
                limit,
                "dropped a client that fell too far behind"
            );
        }
    }

    /// Drops the clients with the largest queues while all queues together are over
    /// `maxQueuedBytes`. The shared total also holds bytes of clients already dropped whose
    /// sessions have not discarded them yet, so it only triggers the check; the decision is
    /// made on the queues of the clients still connected.
    fn enforce_queue_budget(&mut self) {
        let budget = self.config.max_queued_bytes;
        if self.queued_total.load(Ordering::Acquire) <= budget {
            return;
        }
        let queues = self
            .router
            .handles()
            .map(|(conn, client)| (conn, client.queued.client()))
            .collect();
        for conn in queue_budget::over_budget(queues, budget) {
            let Some(client) = self.router.disconnect(conn) else {
                continue;
            };
            let queued = client.queued.client();
            client.kick.cancel();
            self.counts.clients_dropped_queue_budget += 1;
            warn_limited!(
                QUEUE_BUDGET_LOG,
                conn,
                queued,
                budget,
                "dropped the client with the largest queue: all clients together queued more than maxQueuedBytes"
            );
        }
    }

    fn publish(&mut self) {
        self.stats.add(&std::mem::take(&mut self.counts));
        let oldest = self
            .clock
            .oldest_held()
            .map_or(Duration::ZERO, |received| received.elapsed());
        self.stats
            .set_gauges(self.router.client_count(), self.window.held(), oldest);
    }

    /// Hands the state writer a snapshot if anything changed since the last one, unless the
    /// last save was too recent for what saves cost.
    fn save_state(&mut self) {
        let now = tokio::time::Instant::now();
        if !self.state_dirty || now < self.next_save {
            return;
        }
        let Some(writer) = &self.state_writer else {
            return;
        };
        self.state_dirty = false;
        let started = Instant::now();
        let snapshot = StreamState::capture(self.window.next_expected(), self.router.graph());
        let cost = started.elapsed() + writer.last_cost();
        writer.submit(snapshot);
        self.next_save = now + crate::state::save_spacing(self.config.state_interval(), cost);
    }

    fn capture_state(&self) -> StreamState {
        StreamState::capture(self.window.next_expected(), self.router.graph())
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
