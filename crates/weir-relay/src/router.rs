//! Who gets each event, given the follow graph and the connected clients.
//!
//! The router does no I/O: it appends each notification to its client's pending bytes and
//! remembers which clients it touched, so the server can hand every client one write per
//! batch of events instead of one per notification.

use rustc_hash::FxHashMap;

use crate::event::{Event, Kind};
use crate::graph::FollowGraph;

/// A connection's identity, unique for the life of the process.
pub type ConnId = u64;

#[derive(Debug)]
struct Client<H> {
    user: u64,
    pending: Vec<u8>,
    handle: H,
}

/// `H` is whatever the I/O layer needs to reach a connection (a channel, in the server).
#[derive(Debug)]
pub struct Router<H> {
    graph: FollowGraph,
    clients: FxHashMap<ConnId, Client<H>>,
    /// User -> their connections (a user may be connected more than once).
    connections: FxHashMap<u64, Vec<ConnId>>,
    /// Clients with pending bytes, each listed once.
    touched: Vec<ConnId>,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Router {
            graph: FollowGraph::new(),
            clients: FxHashMap::default(),
            connections: FxHashMap::default(),
            touched: Vec::new(),
        }
    }
}

impl<H> Router<H> {
    pub fn new(graph: FollowGraph) -> Self {
        Router {
            graph,
            ..Self::default()
        }
    }

    pub fn graph(&self) -> &FollowGraph {
        &self.graph
    }

    pub fn graph_mut(&mut self) -> &mut FollowGraph {
        &mut self.graph
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub fn connect(&mut self, conn: ConnId, user: u64, handle: H) {
        self.clients.insert(
            conn,
            Client {
                user,
                pending: Vec::new(),
                handle,
            },
        );
        self.connections.entry(user).or_default().push(conn);
    }

    /// Forgets a connection and anything still pending for it. Returns its handle.
    pub fn disconnect(&mut self, conn: ConnId) -> Option<H> {
        let client = self.clients.remove(&conn)?;
        if let Some(conns) = self.connections.get_mut(&client.user) {
            conns.retain(|&other| other != conn);
            if conns.is_empty() {
                self.connections.remove(&client.user);
            }
        }
        Some(client.handle)
    }

    /// Applies `event` to the graph and queues its notifications. Returns how many clients
    /// were notified.
    pub fn route(&mut self, event: &Event) -> usize {
        let payload = event.payload.as_bytes();
        match event.kind {
            Kind::Follow => {
                self.graph.follow(event.from, event.to);
                self.notify_user(event.to, payload)
            }
            Kind::Unfollow => {
                self.graph.unfollow(event.from, event.to);
                0
            }
            Kind::Private => self.notify_user(event.to, payload),
            Kind::Broadcast => {
                for (&conn, client) in self.clients.iter_mut() {
                    push(&mut self.touched, conn, &mut client.pending, payload);
                }
                self.clients.len()
            }
            Kind::Status => {
                let mut notified = 0;
                for follower in self.graph.followers_of(event.from) {
                    notified += notify(
                        &self.connections,
                        &mut self.clients,
                        &mut self.touched,
                        follower,
                        payload,
                    );
                }
                notified
            }
        }
    }

    fn notify_user(&mut self, user: u64, payload: &[u8]) -> usize {
        notify(
            &self.connections,
            &mut self.clients,
            &mut self.touched,
            user,
            payload,
        )
    }

    /// Hands each touched client's pending bytes to `send`, leaving none pending. `send`
    /// returns `false` to have the client disconnected (it could not take the bytes); those
    /// handles are returned.
    pub fn flush(&mut self, mut send: impl FnMut(&H, Vec<u8>) -> bool) -> Vec<(ConnId, H)> {
        let mut rejected = Vec::new();
        for conn in std::mem::take(&mut self.touched) {
            let Some(client) = self.clients.get_mut(&conn) else {
                continue;
            };
            let bytes = std::mem::take(&mut client.pending);
            if !send(&client.handle, bytes) {
                rejected.push(conn);
            }
        }
        rejected
            .into_iter()
            .filter_map(|conn| self.disconnect(conn).map(|handle| (conn, handle)))
            .collect()
    }

    /// Every connection and its handle.
    pub fn handles(&self) -> impl Iterator<Item = (ConnId, &H)> {
        self.clients
            .iter()
            .map(|(&conn, client)| (conn, &client.handle))
    }

    /// Every connection, for shutdown.
    pub fn drain_clients(&mut self) -> Vec<H> {
        self.connections.clear();
        self.touched.clear();
        self.clients
            .drain()
            .map(|(_, client)| client.handle)
            .collect()
    }
}

fn notify<H>(
    connections: &FxHashMap<u64, Vec<ConnId>>,
    clients: &mut FxHashMap<ConnId, Client<H>>,
    touched: &mut Vec<ConnId>,
    user: u64,
    payload: &[u8],
) -> usize {
    let Some(conns) = connections.get(&user) else {
        return 0;
    };
    for &conn in conns {
        if let Some(client) = clients.get_mut(&conn) {
            push(touched, conn, &mut client.pending, payload);
        }
    }
    conns.len()
}

fn push(touched: &mut Vec<ConnId>, conn: ConnId, pending: &mut Vec<u8>, payload: &[u8]) {
    if pending.is_empty() {
        touched.push(conn);
    }
    pending.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse;

    /// Routes `lines` and returns what each connection would be sent, by connection id.
    fn deliver(router: &mut Router<ConnId>, lines: &[&str]) -> Vec<(ConnId, String)> {
        for line in lines {
            router.route(&parse(line.as_bytes()).unwrap());
        }
        let mut sent = Vec::new();
        router.flush(|&conn, bytes| {
            sent.push((conn, String::from_utf8(bytes).unwrap()));
            true
        });
        sent.sort();
        sent
    }

    fn router_with(users: &[(ConnId, u64)]) -> Router<ConnId> {
        let mut router = Router::default();
        for &(conn, user) in users {
            router.connect(conn, user, conn);
        }
        router
    }

    #[test]
    fn follow_notifies_only_the_followed_user() {
        let mut router = router_with(&[(1, 60), (2, 50)]);
        assert_eq!(
            deliver(&mut router, &["666|F|60|50\n"]),
            vec![(2, "666|F|60|50\n".into())]
        );
    }

    #[test]
    fn unfollow_notifies_nobody_and_removes_the_edge() {
        let mut router = router_with(&[(1, 12), (2, 9)]);
        assert!(
            deliver(&mut router, &["1|F|12|9\n", "2|U|12|9\n", "3|S|9\n"])
                .iter()
                .all(|(conn, text)| *conn == 2 && text == "1|F|12|9\n")
        );
    }

    #[test]
    fn broadcast_reaches_every_connection() {
        let mut router = router_with(&[(1, 1), (2, 2), (3, 2)]);
        let sent = deliver(&mut router, &["9|B\n"]);
        assert_eq!(sent.len(), 3);
    }

    #[test]
    fn private_message_reaches_every_connection_of_the_recipient_only() {
        let mut router = router_with(&[(1, 32), (2, 56), (3, 56)]);
        assert_eq!(
            deliver(&mut router, &["43|P|32|56\n"]),
            vec![(2, "43|P|32|56\n".into()), (3, "43|P|32|56\n".into())]
        );
    }

    #[test]
    fn status_update_reaches_current_followers_recorded_even_while_offline() {
        // 7 and 8 follow 32 before anyone is connected.
        let mut router = router_with(&[]);
        deliver(&mut router, &["1|F|7|32\n", "2|F|8|32\n", "3|F|8|32\n"]);
        router.connect(10, 7, 10);
        router.connect(11, 8, 11);
        router.connect(12, 9, 12);
        assert_eq!(
            deliver(&mut router, &["4|U|8|32\n", "5|S|32\n"]),
            vec![(10, "5|S|32\n".into())]
        );
    }

    #[test]
    fn notifications_for_absent_users_are_dropped() {
        let mut router = router_with(&[(1, 1)]);
        assert!(deliver(&mut router, &["1|P|1|2\n", "2|F|1|3\n"]).is_empty());
    }

    #[test]
    fn a_batch_becomes_one_write_per_client_in_order() {
        let mut router = router_with(&[(1, 5)]);
        assert_eq!(
            deliver(&mut router, &["1|P|2|5\n", "2|B\n", "3|F|9|5\n"]),
            vec![(1, "1|P|2|5\n2|B\n3|F|9|5\n".into())]
        );
    }

    #[test]
    fn a_client_that_cannot_take_its_bytes_is_disconnected() {
        let mut router = router_with(&[(1, 1), (2, 2)]);
        router.route(&parse(b"1|B\n").unwrap());
        let dropped = router.flush(|&conn, _| conn != 2);
        assert_eq!(dropped, vec![(2, 2)]);
        assert_eq!(router.client_count(), 1);
        assert!(deliver(&mut router, &["2|P|1|2\n"]).is_empty());
    }

    #[test]
    fn a_disconnected_client_gets_nothing_more() {
        let mut router = router_with(&[(1, 1), (2, 1)]);
        router.route(&parse(b"1|P|9|1\n").unwrap());
        router.disconnect(1);
        assert_eq!(deliver(&mut router, &[]), vec![(2, "1|P|9|1\n".into())]);
    }
}
