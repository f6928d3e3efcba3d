//! The workers the coordinator routes to: whether each is alive, the order each shard
//! prefers them in, and which worker last wrote each shard.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::routing::preference;
use crate::config::WorkerAddr;
use crate::shard::SHARDS;

/// One configured worker.
pub struct Worker {
    pub addr: WorkerAddr,
    /// The configured `host:port`: the rendezvous key and the name in health reports.
    pub name: String,
    /// On this host, so spawned and supervised by the coordinator.
    pub local: bool,
    /// What the HTTP client connects to.
    pub authority: String,
    alive: AtomicBool,
    /// Requests in flight to this worker: a slow worker holds its own permits only, and
    /// the others keep theirs.
    pub permits: Semaphore,
    /// Times its process exited (or could not be started) and was started again.
    pub restarts: AtomicU64,
    /// The pid of its process, 0 when none runs (or it is not ours).
    pub pid: AtomicU32,
    last_error: Mutex<Option<String>>,
    /// The damaged shards its last health answer listed.
    damaged: Mutex<Vec<Value>>,
    /// Ends its health checks and, for a local worker, its process.
    pub stop: CancellationToken,
}

impl Worker {
    pub fn new(addr: WorkerAddr, hostname: &str, concurrency: usize) -> Self {
        Worker {
            name: addr.to_string(),
            local: addr.is_local(hostname),
            authority: addr.connect_authority(hostname),
            addr,
            alive: AtomicBool::new(false),
            permits: Semaphore::new(concurrency),
            restarts: AtomicU64::new(0),
            pid: AtomicU32::new(0),
            last_error: Mutex::new(None),
            damaged: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Records a health verdict; returns whether it changed.
    pub fn set_alive(&self, alive: bool, error: Option<String>) -> bool {
        if let Ok(mut last) = self.last_error.lock() {
            if alive {
                *last = None;
            } else if error.is_some() {
                *last = error;
            }
        }
        self.alive.swap(alive, Ordering::AcqRel) != alive
    }

    pub fn set_damaged(&self, damaged: Vec<Value>) {
        if let Ok(mut slot) = self.damaged.lock() {
            *slot = damaged;
        }
    }

    /// The damaged shards the worker reported: `{"shard", "file", "offset", "error"}`.
    pub fn damaged(&self) -> Vec<Value> {
        self.damaged
            .lock()
            .map(|damaged| damaged.clone())
            .unwrap_or_default()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }

    pub fn report(&self) -> Value {
        let pid = self.pid.load(Ordering::Relaxed);
        json!({
            "worker": self.name,
            "alive": self.is_alive(),
            "local": self.local,
            "pid": (pid != 0).then_some(pid),
            "restarts": self.restarts.load(Ordering::Relaxed),
            "error": self.last_error(),
            "damaged": self.damaged(),
        })
    }
}

/// The workers of the current config, and each shard's order of preference over them.
pub struct Table {
    pub workers: Vec<Arc<Worker>>,
    preferences: Vec<Vec<usize>>,
}

impl Table {
    pub fn new(workers: Vec<Arc<Worker>>) -> Self {
        let names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
        let preferences = (0..SHARDS).map(|shard| preference(shard, &names)).collect();
        Table {
            workers,
            preferences,
        }
    }
}

/// The routing state shared by the request handlers, the health checks and the reloads.
pub struct Pool {
    table: RwLock<Arc<Table>>,
    /// The worker that last committed each shard. It holds the shard's lock until it exits,
    /// so it is tried first even when the rendezvous order would now pick another (a worker
    /// added by a reload, or one restarted after a crash): that one would answer 503 until
    /// the owner dies.
    owners: Vec<Mutex<Option<Arc<Worker>>>>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            table: RwLock::new(Arc::new(Table::new(Vec::new()))),
            owners: (0..SHARDS).map(|_| Mutex::new(None)).collect(),
        }
    }
}

impl Pool {
    pub fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(table) => table.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Routes to `workers` from now on; a worker left out gets nothing new.
    pub fn replace(&self, workers: Vec<Arc<Worker>>) {
        let table = Arc::new(Table::new(workers));
        match self.table.write() {
            Ok(mut slot) => *slot = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
        self.publish_alive();
    }

    /// The alive workers in the order `shard` tries them: its last writer, then rendezvous.
    pub fn candidates(&self, shard: u16) -> Vec<Arc<Worker>> {
        let table = self.table();
        let Some(order) = table.preferences.get(usize::from(shard)) else {
            return Vec::new();
        };
        let owner = self.owner(shard).filter(|owner| {
            owner.is_alive() && table.workers.iter().any(|w| Arc::ptr_eq(w, owner))
        });
        let mut candidates = Vec::with_capacity(table.workers.len());
        if let Some(owner) = &owner {
            candidates.push(owner.clone());
        }
        for index in order {
            let worker = &table.workers[*index];
            let is_owner = owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, worker));
            if worker.is_alive() && !is_owner {
                candidates.push(worker.clone());
            }
        }
        candidates
    }

    fn owner(&self, shard: u16) -> Option<Arc<Worker>> {
        let slot = self.owners.get(usize::from(shard))?;
        slot.lock().ok().and_then(|owner| owner.clone())
    }

    /// `worker` committed `shard`'s items, so it holds the shard's lock.
    pub fn settle(&self, shard: u16, worker: &Arc<Worker>) {
        if let Some(slot) = self.owners.get(usize::from(shard)) {
            if let Ok(mut owner) = slot.lock() {
                if !owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, worker)) {
                    *owner = Some(worker.clone());
                }
            }
        }
    }

    /// How many shards `worker` last committed, as far as this coordinator has seen.
    pub fn shards_of(&self, worker: &Arc<Worker>) -> usize {
        self.owners
            .iter()
            .filter(|slot| {
                slot.lock()
                    .ok()
                    .is_some_and(|owner| owner.as_ref().is_some_and(|o| Arc::ptr_eq(o, worker)))
            })
            .count()
    }

    /// Sets the alive gauge from the current table.
    pub fn publish_alive(&self) {
        let alive = self.table().workers.iter().filter(|w| w.is_alive()).count();
        metrics::gauge!(super::metrics::WORKERS_ALIVE).set(alive as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(port: u16) -> Arc<Worker> {
        let addr = WorkerAddr::parse(&format!("localhost:{port}")).unwrap();
        Arc::new(Worker::new(addr, "box1", 4))
    }

    #[test]
    fn only_alive_workers_are_candidates_and_the_owner_comes_first() {
        let pool = Pool::default();
        let workers: Vec<_> = (5001..=5004).map(worker).collect();
        pool.replace(workers.clone());
        assert!(pool.candidates(7).is_empty());
        for w in &workers {
            w.set_alive(true, None);
        }
        let order = pool.candidates(7);
        assert_eq!(order.len(), 4);
        let last = order[3].clone();
        pool.settle(7, &last);
        assert!(Arc::ptr_eq(&pool.candidates(7)[0], &last));
        assert_eq!(pool.shards_of(&last), 1);
        last.set_alive(false, Some("gone".into()));
        let order = pool.candidates(7);
        assert_eq!(order.len(), 3);
        assert!(order.iter().all(|w| !Arc::ptr_eq(w, &last)));
        assert_eq!(last.last_error().as_deref(), Some("gone"));
    }

    #[test]
    fn a_worker_dropped_from_the_table_is_no_longer_routed_to_even_as_owner() {
        let pool = Pool::default();
        let a = worker(5001);
        let b = worker(5002);
        a.set_alive(true, None);
        b.set_alive(true, None);
        pool.replace(vec![a.clone(), b.clone()]);
        pool.settle(3, &a);
        pool.replace(vec![b.clone()]);
        let order = pool.candidates(3);
        assert_eq!(order.len(), 1);
        assert!(Arc::ptr_eq(&order[0], &b));
    }
}
