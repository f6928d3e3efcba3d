//! Who follows whom. A set of edges: following twice adds nothing, unfollowing a missing
//! edge does nothing, and memory is bounded by the edges that exist, not by the stream.

use rustc_hash::{FxHashMap, FxHashSet};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FollowGraph {
    /// Followed user -> their followers; a user with no followers has no entry.
    followers: FxHashMap<u64, FxHashSet<u64>>,
    edges: usize,
}

impl FollowGraph {
    pub fn new() -> Self {
        Self::default()
    }

    /// `follower` now follows `followed`. Returns whether the edge is new. Following oneself
    /// records nothing (the event is still delivered): a user's own status updates are not
    /// sent back to them, and the state file never holds such an edge.
    pub fn follow(&mut self, follower: u64, followed: u64) -> bool {
        if follower == followed {
            return false;
        }
        let added = self.followers.entry(followed).or_default().insert(follower);
        self.edges += usize::from(added);
        added
    }

    /// `follower` no longer follows `followed`. Returns whether there was such an edge.
    pub fn unfollow(&mut self, follower: u64, followed: u64) -> bool {
        let Some(set) = self.followers.get_mut(&followed) else {
            return false;
        };
        let removed = set.remove(&follower);
        if set.is_empty() {
            self.followers.remove(&followed);
        }
        self.edges -= usize::from(removed);
        removed
    }

    pub fn followers_of(&self, user: u64) -> impl Iterator<Item = u64> + '_ {
        self.followers.get(&user).into_iter().flatten().copied()
    }

    pub fn edges(&self) -> usize {
        self.edges
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Every edge as `(follower, followed)`, sorted, for the state file.
    /// `(follower, followed)` pairs, sorted.
    pub fn to_edges(&self) -> Vec<(u64, u64)> {
        let mut edges = self.unsorted_edges();
        edges.sort_unstable();
        edges
    }

    /// `(follower, followed)` pairs in no particular order: the cheap copy a busy task takes,
    /// leaving the sort to whoever writes them out.
    pub fn unsorted_edges(&self) -> Vec<(u64, u64)> {
        self.followers
            .iter()
            .flat_map(|(&followed, set)| set.iter().map(move |&follower| (follower, followed)))
            .collect()
    }

    pub fn from_edges(edges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut graph = Self::new();
        for (follower, followed) in edges {
            graph.follow(follower, followed);
        }
        graph
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_are_a_set() {
        let mut graph = FollowGraph::new();
        assert!(graph.follow(1, 2));
        assert!(!graph.follow(1, 2), "a repeated follow adds nothing");
        assert!(graph.follow(3, 2));
        let mut followers: Vec<_> = graph.followers_of(2).collect();
        followers.sort();
        assert_eq!(followers, vec![1, 3]);
        assert_eq!(graph.edges(), 2);
    }

    #[test]
    fn a_self_follow_is_not_recorded() {
        let mut graph = FollowGraph::new();
        assert!(!graph.follow(4, 4));
        assert_eq!((graph.edges(), graph.followers_of(4).count()), (0, 0));
    }

    #[test]
    fn unfollowing_a_missing_edge_is_a_no_op() {
        let mut graph = FollowGraph::new();
        assert!(!graph.unfollow(1, 2));
        graph.follow(1, 2);
        assert!(graph.unfollow(1, 2));
        assert!(!graph.unfollow(1, 2));
        assert_eq!(graph.followers_of(2).count(), 0);
        assert_eq!(graph.edges(), 0);
        assert!(graph.followers.is_empty(), "no empty sets are left behind");
    }

    proptest! {
        #[test]
        fn edges_round_trip_through_the_state_format(ops in proptest::collection::vec((any::<bool>(), 0u64..8, 0u64..8), 0..200)) {
            let mut graph = FollowGraph::new();
            for (follow, a, b) in ops {
                if follow { graph.follow(a, b); } else { graph.unfollow(a, b); }
            }
            let edges = graph.to_edges();
            prop_assert_eq!(edges.len(), graph.edges());
            prop_assert_eq!(FollowGraph::from_edges(edges), graph);
        }
    }
}
