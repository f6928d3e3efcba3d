//! What every connected user must receive, computed from the stream before anything is sent.
//!
//! Only edges whose follower is connected can ever cause a notification, so the follow graph
//! kept here is limited to those: a status update then costs one short list walk.

use rustc_hash::FxHashMap;

use super::stream::{GeneratedEvent, GeneratedKind, Generator, StreamParams};

/// The expected notifications of each connected user, in sequence order. `streams[slot]`
/// belongs to `users[slot]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectations {
    pub users: Vec<u32>,
    pub streams: Vec<Vec<GeneratedEvent>>,
}

impl Expectations {
    pub fn total(&self) -> u64 {
        self.streams.iter().map(|s| s.len() as u64).sum()
    }

    /// Heap bytes held by the expected streams.
    pub fn bytes(&self) -> u64 {
        self.streams
            .iter()
            .map(|s| (s.capacity() * std::mem::size_of::<GeneratedEvent>()) as u64)
            .sum()
    }
}

/// `users` are the connected users (distinct).
pub fn compute(params: StreamParams, users: &[u32]) -> Expectations {
    let slot_of: FxHashMap<u32, usize> = users
        .iter()
        .enumerate()
        .map(|(slot, user)| (*user, slot))
        .collect();
    let mut streams: Vec<Vec<GeneratedEvent>> = vec![Vec::new(); users.len()];
    // Followed user -> slots of its connected followers.
    let mut followers: FxHashMap<u32, Vec<usize>> = FxHashMap::default();

    for event in Generator::new(params) {
        match event.kind() {
            GeneratedKind::Follow => {
                if let Some(&slot) = slot_of.get(&event.to()) {
                    streams[slot].push(event);
                }
                if let Some(&follower) = slot_of.get(&event.from()) {
                    let list = followers.entry(event.to()).or_default();
                    if !list.contains(&follower) {
                        list.push(follower);
                    }
                }
            }
            GeneratedKind::Unfollow => {
                if let Some(&follower) = slot_of.get(&event.from()) {
                    if let Some(list) = followers.get_mut(&event.to()) {
                        if let Some(at) = list.iter().position(|s| *s == follower) {
                            list.swap_remove(at);
                        }
                    }
                }
            }
            GeneratedKind::Broadcast => {
                for stream in &mut streams {
                    stream.push(event);
                }
            }
            GeneratedKind::Private => {
                if let Some(&slot) = slot_of.get(&event.to()) {
                    streams[slot].push(event);
                }
            }
            GeneratedKind::Status => {
                if let Some(list) = followers.get(&event.from()) {
                    for &slot in list {
                        streams[slot].push(event);
                    }
                }
            }
        }
    }
    for stream in &mut streams {
        stream.shrink_to_fit();
    }
    Expectations {
        users: users.to_vec(),
        streams,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The rules as written, with nothing optimised: every edge, every user.
    fn naive(params: StreamParams, users: &[u32]) -> BTreeMap<u32, Vec<GeneratedEvent>> {
        let connected: BTreeSet<u32> = users.iter().copied().collect();
        let mut edges: BTreeSet<(u32, u32)> = BTreeSet::new();
        let mut out: BTreeMap<u32, Vec<GeneratedEvent>> =
            users.iter().map(|u| (*u, Vec::new())).collect();
        for event in Generator::new(params) {
            let recipients: Vec<u32> = match event.kind() {
                GeneratedKind::Follow => {
                    edges.insert((event.from(), event.to()));
                    vec![event.to()]
                }
                GeneratedKind::Unfollow => {
                    edges.remove(&(event.from(), event.to()));
                    vec![]
                }
                GeneratedKind::Broadcast => connected.iter().copied().collect(),
                GeneratedKind::Private => vec![event.to()],
                GeneratedKind::Status => edges
                    .iter()
                    .filter(|(_, followed)| *followed == event.from())
                    .map(|(follower, _)| *follower)
                    .collect(),
            };
            for user in recipients {
                if let Some(stream) = out.get_mut(&user) {
                    stream.push(event);
                }
            }
        }
        out
    }

    fn as_map(expectations: &Expectations) -> BTreeMap<u32, Vec<GeneratedEvent>> {
        expectations
            .users
            .iter()
            .copied()
            .zip(expectations.streams.iter().cloned())
            .collect()
    }

    #[test]
    fn a_hand_checked_case() {
        // Every user connected and random pairs: self-contained semantics on a tiny graph.
        let params = StreamParams {
            total_events: 500,
            users: 3,
            seed: 9,
            random_pairs: true,
        };
        let got = compute(params, &[1, 2, 3]);
        assert_eq!(as_map(&got), naive(params, &[1, 2, 3]));
        for stream in &got.streams {
            assert!(stream.windows(2).all(|w| w[0].seq() < w[1].seq()));
            assert!(stream.iter().all(|e| e.kind() != GeneratedKind::Unfollow));
        }
    }

    proptest! {
        #[test]
        fn matches_the_rules_as_written(
            total in 0u64..3_000,
            users in 1u32..40,
            connected in 1u32..40,
            seed in any::<u64>(),
            random_pairs in any::<bool>(),
        ) {
            let params = StreamParams { total_events: total, users, seed, random_pairs };
            let chosen = super::super::stream::connected_users(seed, users, connected);
            let got = compute(params, &chosen);
            prop_assert_eq!(as_map(&got), naive(params, &chosen));
        }
    }
}
