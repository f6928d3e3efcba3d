//! The deterministic event stream: which events, in sequence order ([`Generator`]), and the
//! shuffled batches they are sent in ([`Batches`]).
//!
//! The checker walks the stream twice (once to compute what every user must receive, once to
//! send it), so everything here is a pure function of [`StreamParams`] and never stores the
//! stream itself.

use rustc_hash::FxHashMap;

use super::rng::Rng;

/// Longest line [`GeneratedEvent::write_line`] produces: a 20-digit sequence number, two 10-digit ids,
/// separators and CRLF.
pub const MAX_LINE: usize = 48;

/// Sequence numbers share their `u64` with the kind (see [`GeneratedEvent`]).
pub const MAX_SEQ: u64 = (1 << KIND_SHIFT) - 1;
const KIND_SHIFT: u32 = 61;

/// Out of a million events; about 0.01 % broadcasts, 15 % follows, 15 % unfollows, 15 %
/// private messages, the rest status updates.
const BROADCAST_PPM: u64 = 100;
const FOLLOW_PPM: u64 = 150_000;
const UNFOLLOW_PPM: u64 = 150_000;
const PRIVATE_PPM: u64 = 150_000;

/// Purposes for [`Rng::derive`]; fixed forever, like the generator.
pub const EVENTS_RNG: u64 = 1;
pub const ORDER_RNG: u64 = 2;
pub const USERS_RNG: u64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GeneratedKind {
    Follow,
    Unfollow,
    Broadcast,
    Private,
    Status,
}

impl GeneratedKind {
    fn code(self) -> u64 {
        match self {
            GeneratedKind::Follow => 0,
            GeneratedKind::Unfollow => 1,
            GeneratedKind::Broadcast => 2,
            GeneratedKind::Private => 3,
            GeneratedKind::Status => 4,
        }
    }

    fn from_code(code: u64) -> GeneratedKind {
        match code {
            0 => GeneratedKind::Follow,
            1 => GeneratedKind::Unfollow,
            2 => GeneratedKind::Broadcast,
            3 => GeneratedKind::Private,
            _ => GeneratedKind::Status,
        }
    }

    fn letter(self) -> u8 {
        match self {
            GeneratedKind::Follow => b'F',
            GeneratedKind::Unfollow => b'U',
            GeneratedKind::Broadcast => b'B',
            GeneratedKind::Private => b'P',
            GeneratedKind::Status => b'S',
        }
    }
}

/// One event in 16 bytes (the kind rides in the top bits of the sequence number), because the
/// expected streams hold millions of these and the line itself is rebuilt on demand.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GeneratedEvent {
    seq_kind: u64,
    from: u32,
    to: u32,
}

impl GeneratedEvent {
    /// `seq` must be at most [`MAX_SEQ`] (the configuration is validated against it).
    pub fn new(seq: u64, kind: GeneratedKind, from: u32, to: u32) -> GeneratedEvent {
        debug_assert!(seq <= MAX_SEQ);
        GeneratedEvent {
            seq_kind: (seq & MAX_SEQ) | (kind.code() << KIND_SHIFT),
            from,
            to,
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq_kind & MAX_SEQ
    }

    pub fn kind(&self) -> GeneratedKind {
        GeneratedKind::from_code(self.seq_kind >> KIND_SHIFT)
    }

    pub fn from(&self) -> u32 {
        self.from
    }

    pub fn to(&self) -> u32 {
        self.to
    }

    /// The payload line, terminator included, into `buf`; returns its length. A stack buffer
    /// instead of a `String` because the receivers format one line per notification checked.
    pub fn write_line(&self, crlf: bool, buf: &mut [u8; MAX_LINE]) -> usize {
        let mut at = put_decimal(buf, 0, self.seq());
        let kind = self.kind();
        buf[at] = b'|';
        buf[at + 1] = kind.letter();
        at += 2;
        match kind {
            GeneratedKind::Broadcast => {}
            GeneratedKind::Status => {
                buf[at] = b'|';
                at = put_decimal(buf, at + 1, u64::from(self.from));
            }
            GeneratedKind::Follow | GeneratedKind::Unfollow | GeneratedKind::Private => {
                buf[at] = b'|';
                at = put_decimal(buf, at + 1, u64::from(self.from));
                buf[at] = b'|';
                at = put_decimal(buf, at + 1, u64::from(self.to));
            }
        }
        if crlf {
            buf[at] = b'\r';
            at += 1;
        }
        buf[at] = b'\n';
        at + 1
    }

    pub fn line(&self, crlf: bool) -> String {
        let mut buf = [0u8; MAX_LINE];
        let len = self.write_line(crlf, &mut buf);
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }
}

impl std::fmt::Debug for GeneratedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.line(false).trim_end())
    }
}

fn put_decimal(buf: &mut [u8; MAX_LINE], at: usize, mut value: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    let len = digits.len() - start;
    buf[at..at + len].copy_from_slice(&digits[start..]);
    at + len
}

/// Everything the stream depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamParams {
    pub total_events: u64,
    /// User ids are `1..=users`.
    pub users: u32,
    pub seed: u64,
    /// Follows and unfollows also name random pairs, so repeated follows and unfollows of
    /// missing edges occur.
    pub random_pairs: bool,
}

/// The follow edges the generator has emitted and not yet unfollowed: a vector for uniform
/// random picks, an index for membership and O(1) removal.
#[derive(Default)]
struct Edges {
    list: Vec<u64>,
    index: FxHashMap<u64, usize>,
}

impl Edges {
    fn key(from: u32, to: u32) -> u64 {
        (u64::from(from) << 32) | u64::from(to)
    }

    fn contains(&self, from: u32, to: u32) -> bool {
        self.index.contains_key(&Edges::key(from, to))
    }

    fn insert(&mut self, from: u32, to: u32) {
        let key = Edges::key(from, to);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.index.entry(key) {
            slot.insert(self.list.len());
            self.list.push(key);
        }
    }

    fn remove(&mut self, from: u32, to: u32) {
        if let Some(at) = self.index.remove(&Edges::key(from, to)) {
            self.list.swap_remove(at);
            if let Some(moved) = self.list.get(at) {
                self.index.insert(*moved, at);
            }
        }
    }

    fn pick(&self, rng: &mut Rng) -> Option<(u32, u32)> {
        if self.list.is_empty() {
            return None;
        }
        let key = self.list[rng.below(self.list.len() as u64) as usize];
        Some(((key >> 32) as u32, key as u32))
    }
}

/// The events in sequence order, `1..=total_events`.
///
/// Unless `random_pairs` is set, follows name a pair that does not follow yet and unfollows an
/// existing edge, so that the follow graph stays sparse and every event means something. With
/// `random_pairs`, half the follows repeat an existing edge or hit one by chance and half the
/// unfollows name a random (usually missing) pair; plain uniform pairs would instead drive the
/// graph to half of all pairs and turn each status update into a near-broadcast.
pub struct Generator {
    rng: Rng,
    params: StreamParams,
    next_seq: u64,
    edges: Edges,
}

impl Generator {
    pub fn new(params: StreamParams) -> Generator {
        Generator {
            rng: Rng::derive(params.seed, EVENTS_RNG),
            params,
            next_seq: 1,
            edges: Edges::default(),
        }
    }

    fn user(&mut self) -> u32 {
        1 + self.rng.below(u64::from(self.params.users)) as u32
    }

    /// Two distinct users (unless there is only one).
    fn pair(&mut self) -> (u32, u32) {
        let users = u64::from(self.params.users);
        if users < 2 {
            return (1, 1);
        }
        let from = 1 + self.rng.below(users) as u32;
        let mut to = 1 + self.rng.below(users - 1) as u32;
        if to >= from {
            to += 1;
        }
        (from, to)
    }

    fn follow(&mut self, seq: u64) -> GeneratedEvent {
        let (from, to) = if self.params.random_pairs {
            match self.rng.below(2) {
                0 => self
                    .edges
                    .pick(&mut self.rng)
                    .unwrap_or_else(|| self.pair()),
                _ => self.pair(),
            }
        } else {
            // A dense graph could make a new pair rare; after a few tries a repeat is fine.
            let mut pair = self.pair();
            for _ in 0..16 {
                if !self.edges.contains(pair.0, pair.1) {
                    break;
                }
                pair = self.pair();
            }
            pair
        };
        self.edges.insert(from, to);
        GeneratedEvent::new(seq, GeneratedKind::Follow, from, to)
    }

    fn unfollow(&mut self, seq: u64) -> GeneratedEvent {
        let existing = if self.params.random_pairs && self.rng.below(2) == 0 {
            None
        } else {
            self.edges.pick(&mut self.rng)
        };
        let (from, to) = match existing {
            Some(pair) => pair,
            None if self.params.random_pairs => self.pair(),
            // Nothing to unfollow yet: keep the stream meaningful.
            None => return self.follow(seq),
        };
        self.edges.remove(from, to);
        GeneratedEvent::new(seq, GeneratedKind::Unfollow, from, to)
    }
}

impl Iterator for Generator {
    type Item = GeneratedEvent;

    fn next(&mut self) -> Option<GeneratedEvent> {
        if self.next_seq > self.params.total_events {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let roll = self.rng.below(1_000_000);
        let event = if roll < BROADCAST_PPM {
            GeneratedEvent::new(seq, GeneratedKind::Broadcast, 0, 0)
        } else if roll < BROADCAST_PPM + FOLLOW_PPM {
            self.follow(seq)
        } else if roll < BROADCAST_PPM + FOLLOW_PPM + UNFOLLOW_PPM {
            self.unfollow(seq)
        } else if roll < BROADCAST_PPM + FOLLOW_PPM + UNFOLLOW_PPM + PRIVATE_PPM {
            let (from, to) = self.pair();
            GeneratedEvent::new(seq, GeneratedKind::Private, from, to)
        } else {
            let from = self.user();
            GeneratedEvent::new(seq, GeneratedKind::Status, from, 0)
        };
        Some(event)
    }
}

/// The stream cut into consecutive sequence ranges of random size `1..=max_batch`, each
/// shuffled: out of order, but never further than one batch, like the original source.
pub struct Batches {
    events: Generator,
    order: Rng,
    max_batch: u64,
    batch: Vec<GeneratedEvent>,
}

impl Batches {
    pub fn new(params: StreamParams, max_batch: u32) -> Batches {
        Batches {
            events: Generator::new(params),
            order: Rng::derive(params.seed, ORDER_RNG),
            max_batch: u64::from(max_batch.max(1)),
            batch: Vec::with_capacity(max_batch.max(1) as usize),
        }
    }

    pub fn next_batch(&mut self) -> Option<&[GeneratedEvent]> {
        let size = 1 + self.order.below(self.max_batch);
        self.batch.clear();
        self.batch.extend(self.events.by_ref().take(size as usize));
        if self.batch.is_empty() {
            return None;
        }
        self.order.shuffle(&mut self.batch);
        Some(&self.batch)
    }
}

/// Appends the lines of `events` to `out`.
pub fn encode(events: &[GeneratedEvent], crlf: bool, out: &mut Vec<u8>) {
    let mut line = [0u8; MAX_LINE];
    for event in events {
        let len = event.write_line(crlf, &mut line);
        out.extend_from_slice(&line[..len]);
    }
}

/// `count` distinct users out of `1..=users`, chosen by the seed (Floyd's sampling: O(count)
/// whatever the population, and independent of the event stream).
pub fn connected_users(seed: u64, users: u32, count: u32) -> Vec<u32> {
    let mut rng = Rng::derive(seed, USERS_RNG);
    let count = count.min(users);
    let mut chosen = rustc_hash::FxHashSet::default();
    let mut order = Vec::with_capacity(count as usize);
    for j in (users - count + 1)..=users {
        let pick = 1 + rng.below(u64::from(j)) as u32;
        let user = if chosen.contains(&pick) { j } else { pick };
        chosen.insert(user);
        order.push(user);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(total_events: u64, users: u32, seed: u64, random_pairs: bool) -> StreamParams {
        StreamParams {
            total_events,
            users,
            seed,
            random_pairs,
        }
    }

    #[test]
    fn lines_follow_the_protocol() {
        let cases = [
            (
                GeneratedEvent::new(666, GeneratedKind::Follow, 60, 50),
                "666|F|60|50\n",
            ),
            (
                GeneratedEvent::new(1, GeneratedKind::Unfollow, 12, 9),
                "1|U|12|9\n",
            ),
            (
                GeneratedEvent::new(542_532, GeneratedKind::Broadcast, 0, 0),
                "542532|B\n",
            ),
            (
                GeneratedEvent::new(43, GeneratedKind::Private, 32, 56),
                "43|P|32|56\n",
            ),
            (
                GeneratedEvent::new(634, GeneratedKind::Status, 32, 0),
                "634|S|32\n",
            ),
        ];
        for (event, line) in cases {
            assert_eq!(event.line(false), line);
        }
        assert_eq!(
            GeneratedEvent::new(634, GeneratedKind::Status, 32, 0).line(true),
            "634|S|32\r\n"
        );
    }

    #[test]
    fn the_longest_line_fits() {
        let event = GeneratedEvent::new(MAX_SEQ, GeneratedKind::Private, u32::MAX, u32::MAX);
        assert_eq!(event.seq(), MAX_SEQ);
        assert_eq!(event.kind(), GeneratedKind::Private);
        let line = event.line(true);
        assert_eq!(line, format!("{MAX_SEQ}|P|{}|{}\r\n", u32::MAX, u32::MAX));
        assert!(line.len() <= MAX_LINE);
        assert_eq!(std::mem::size_of::<GeneratedEvent>(), 16);
    }

    #[test]
    fn the_mix_is_roughly_as_specified() {
        let mut counts = FxHashMap::default();
        for event in Generator::new(params(200_000, 1_000, 666, false)) {
            *counts.entry(event.kind()).or_insert(0u64) += 1;
        }
        let share = |kind| counts.get(&kind).copied().unwrap_or(0) as f64 / 200_000.0;
        assert!(
            (share(GeneratedKind::Follow) - 0.15).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share(GeneratedKind::Unfollow) - 0.15).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share(GeneratedKind::Private) - 0.15).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share(GeneratedKind::Status) - 0.55).abs() < 0.01,
            "{counts:?}"
        );
        assert!(share(GeneratedKind::Broadcast) > 0.0 && share(GeneratedKind::Broadcast) < 0.001);
    }

    #[test]
    fn by_default_follows_are_new_and_unfollows_existing() {
        let mut edges = std::collections::HashSet::new();
        for event in Generator::new(params(100_000, 1_000, 1, false)) {
            let edge = (event.from(), event.to());
            match event.kind() {
                GeneratedKind::Follow => assert!(edges.insert(edge), "repeated follow {event:?}"),
                GeneratedKind::Unfollow => {
                    assert!(edges.remove(&edge), "missing unfollow {event:?}")
                }
                _ => {}
            }
            if event.kind() != GeneratedKind::Broadcast && event.kind() != GeneratedKind::Status {
                assert_ne!(event.from(), event.to());
            }
        }
    }

    #[test]
    fn random_pairs_repeat_follows_and_unfollow_missing_edges() {
        let mut edges = std::collections::HashSet::new();
        let (mut repeats, mut missing) = (0, 0);
        for event in Generator::new(params(100_000, 1_000, 1, true)) {
            let edge = (event.from(), event.to());
            match event.kind() {
                GeneratedKind::Follow if !edges.insert(edge) => repeats += 1,
                GeneratedKind::Unfollow if !edges.remove(&edge) => missing += 1,
                _ => {}
            }
        }
        assert!(repeats > 1_000, "{repeats}");
        assert!(missing > 1_000, "{missing}");
        assert!(
            edges.len() < 20_000,
            "the graph stays sparse: {}",
            edges.len()
        );
    }

    #[test]
    fn connected_users_are_distinct_and_in_range() {
        let users = connected_users(666, 1_000, 100);
        assert_eq!(users.len(), 100);
        let distinct: std::collections::HashSet<_> = users.iter().collect();
        assert_eq!(distinct.len(), 100);
        assert!(users.iter().all(|u| (1..=1_000).contains(u)));
        assert_eq!(users, connected_users(666, 1_000, 100));
        assert_ne!(users, connected_users(667, 1_000, 100));
        let all = connected_users(5, 10, 10);
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=10).collect::<Vec<_>>());
    }

    proptest! {
        #[test]
        fn batches_are_shuffled_contiguous_ranges_covering_1_to_n(
            total in 0u64..3_000,
            max_batch in 1u32..200,
            seed in any::<u64>(),
            random_pairs in any::<bool>(),
        ) {
            let mut batches = Batches::new(params(total, 50, seed, random_pairs), max_batch);
            let mut next = 1u64;
            while let Some(batch) = batches.next_batch() {
                prop_assert!(!batch.is_empty() && batch.len() <= max_batch as usize);
                let mut seqs: Vec<u64> = batch.iter().map(GeneratedEvent::seq).collect();
                seqs.sort_unstable();
                let expected: Vec<u64> = (next..next + batch.len() as u64).collect();
                prop_assert_eq!(seqs, expected);
                next += batch.len() as u64;
            }
            prop_assert_eq!(next, total + 1);
        }

        #[test]
        fn the_stream_is_a_function_of_its_parameters(
            total in 0u64..2_000,
            users in 1u32..100,
            seed in any::<u64>(),
            random_pairs in any::<bool>(),
            max_batch in 1u32..50,
        ) {
            let p = params(total, users, seed, random_pairs);
            let collect = || {
                let mut out = Vec::new();
                let mut batches = Batches::new(p, max_batch);
                while let Some(batch) = batches.next_batch() {
                    encode(batch, false, &mut out);
                }
                out
            };
            prop_assert_eq!(collect(), collect());
            // The batches hold exactly the generator's events.
            let mut from_batches = Vec::new();
            let mut batches = Batches::new(p, max_batch);
            while let Some(batch) = batches.next_batch() {
                from_batches.extend_from_slice(batch);
            }
            from_batches.sort_unstable_by_key(GeneratedEvent::seq);
            let in_order: Vec<GeneratedEvent> = Generator::new(p).collect();
            prop_assert_eq!(from_batches, in_order.clone());
            for event in &in_order {
                prop_assert!(event.kind() == GeneratedKind::Broadcast
                    || (1..=users).contains(&event.from()));
            }
        }
    }
}
