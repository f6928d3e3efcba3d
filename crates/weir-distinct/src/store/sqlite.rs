//! The embedded store: one SQLite file per shard, `<database>/shard-NN/items.sqlite`, in
//! WAL mode. A worker writes a shard only while it holds `<database>/shard-NN/LOCK` (an
//! `flock`, freed by the kernel when the process dies, `kill -9` included), so two workers
//! never decide concurrently whether the same item is new. Any process may read counts.
//!
//! Each shard a worker owns has one writer thread. Requests queue their (sorted, deduped)
//! items to it; the thread takes everything waiting, up to a bound, and commits it as one
//! transaction: rows inserted in key order with `INSERT OR IGNORE`, and the number actually
//! inserted added to the tenant's row in `counts`. Requests are answered after the commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};
use weir_runtime::datadir::{self, DataDirError, DataDirLock};

use super::{StoreError, StoreOptions};
use crate::shard::{sort_dedup, Item};

const DB_FILE: &str = "items.sqlite";
/// Requests waiting for one shard's writer before senders wait too.
const QUEUE_DEPTH: usize = 1024;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS items (
        tenant TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS counts (
        tenant TEXT PRIMARY KEY, n INTEGER NOT NULL
    ) WITHOUT ROWID;";

struct Job {
    items: Vec<Item>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

struct Writer {
    jobs: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    options: StoreOptions,
    writers: tokio::sync::Mutex<HashMap<u16, Writer>>,
    readers: Vec<Mutex<Option<Connection>>>,
}

impl SqliteStore {
    /// A store under `root` (created if missing). Shards are opened, and their locks taken,
    /// on first write.
    pub fn open(root: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let database = |message: String| StoreError::Database {
            path: root.display().to_string(),
            message,
        };
        if root.exists() && !root.is_dir() {
            return Err(database("exists and is not a directory".into()));
        }
        std::fs::create_dir_all(root).map_err(|err| database(err.to_string()))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                options,
                writers: tokio::sync::Mutex::new(HashMap::new()),
                readers: (0..options.shards).map(|_| Mutex::new(None)).collect(),
            }),
        })
    }

    pub fn options(&self) -> StoreOptions {
        self.inner.options
    }

    fn shard_dir(&self, shard: u16) -> PathBuf {
        self.inner.root.join(format!("shard-{shard:02}"))
    }

    /// Commits `items` (all of `shard`, sorted, deduped) with whatever else is waiting for
    /// the shard, and returns once they are durable.
    pub async fn insert_shard(&self, shard: u16, items: Vec<Item>) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        let jobs = self.writer(shard).await?;
        if jobs.send(Job { items, done }).await.is_err() {
            self.forget_writer(shard).await;
            return Err(StoreError::WriterGone(shard));
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => {
                self.forget_writer(shard).await;
                Err(StoreError::WriterGone(shard))
            }
        }
    }

    async fn writer(&self, shard: u16) -> Result<mpsc::Sender<Job>, StoreError> {
        let mut writers = self.inner.writers.lock().await;
        if let Some(writer) = writers.get(&shard) {
            return Ok(writer.jobs.clone());
        }
        let dir = self.shard_dir(shard);
        let options = self.inner.options;
        let opened = tokio::task::spawn_blocking(move || open_writer(shard, &dir, options))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))??;
        let jobs = opened.jobs.clone();
        writers.insert(shard, opened);
        Ok(jobs)
    }

    async fn forget_writer(&self, shard: u16) {
        self.inner.writers.lock().await.remove(&shard);
    }

    /// The distinct items stored for `tenant`: one lookup in its shard's `counts`.
    pub async fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        let shard = crate::shard::shard_of(tenant, self.inner.options.shards);
        let store = self.clone();
        let tenant = tenant.to_string();
        tokio::task::spawn_blocking(move || store.count_blocking(shard, &tenant))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))?
    }

    fn count_blocking(&self, shard: u16, tenant: &str) -> Result<u64, StoreError> {
        let sqlite = |source| StoreError::Sqlite { shard, source };
        let Some(slot) = self.inner.readers.get(usize::from(shard)) else {
            return Err(StoreError::Task(format!("no shard {shard}")));
        };
        let mut reader = slot
            .lock()
            .map_err(|_| StoreError::Task("a count reader panicked".into()))?;
        if reader.is_none() {
            let path = self.shard_dir(shard).join(DB_FILE);
            if !path.exists() {
                return Ok(0);
            }
            // Read-write so the reader can map the WAL index, but never CREATE: reading
            // must not make a file the shard's owner has not.
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sqlite)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(sqlite)?;
            *reader = Some(conn);
        }
        let Some(conn) = reader.as_ref() else {
            return Ok(0);
        };
        let count = conn
            .prepare_cached("SELECT n FROM counts WHERE tenant = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([tenant], |row| row.get::<_, i64>(0))
                    .optional()
            });
        match count {
            Ok(n) => Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0))),
            // The owner created the file but not yet its tables: nothing is stored.
            Err(rusqlite::Error::SqliteFailure(_, Some(message)))
                if message.starts_with("no such table") =>
            {
                Ok(0)
            }
            Err(source) => Err(sqlite(source)),
        }
    }

    /// Stops every writer once it has committed what it was sent, and releases the shards.
    pub async fn close(self) {
        let writers: Vec<Writer> = self
            .inner
            .writers
            .lock()
            .await
            .drain()
            .map(|(_, w)| w)
            .collect();
        let threads: Vec<JoinHandle<()>> = writers
            .into_iter()
            .map(|writer| {
                drop(writer.jobs);
                writer.thread
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

fn open_writer(shard: u16, dir: &Path, options: StoreOptions) -> Result<Writer, StoreError> {
    let lock = datadir::lock(dir, "database").map_err(|source| match source {
        DataDirError::Locked { holder, .. } => StoreError::Busy {
            shard,
            reason: format!("locked by {holder}"),
        },
        source => StoreError::Open { shard, source },
    })?;
    let conn = open_connection(&dir.join(DB_FILE), options.fsync)
        .map_err(|source| StoreError::Sqlite { shard, source })?;
    let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
    let thread = std::thread::Builder::new()
        .name(format!("distinct-shard-{shard:02}"))
        .spawn(move || write_loop(shard, conn, lock, queue, options.max_group_items))
        .map_err(|err| StoreError::Task(err.to_string()))?;
    Ok(Writer { jobs, thread })
}

fn open_connection(path: &Path, fsync: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // NORMAL in WAL mode: a commit is in the kernel before it returns, so it survives the
    // death of any process; FULL also syncs it to disk, for power loss.
    let synchronous = if fsync { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; {SCHEMA}"
    ))?;
    Ok(conn)
}

/// The writer thread: takes every job waiting (up to `max_items` items), commits them
/// together, answers each. Ends when every sender is gone, having answered all it took.
fn write_loop(
    shard: u16,
    mut conn: Connection,
    _lock: DataDirLock,
    mut queue: mpsc::Receiver<Job>,
    max_items: usize,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut held = first.items.len();
        let mut jobs = vec![first];
        while held < max_items {
            match queue.try_recv() {
                Ok(job) => {
                    held += job.items.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut items: Vec<Item> = Vec::with_capacity(held);
        let mut answers = Vec::with_capacity(jobs.len());
        for job in jobs {
            items.extend(job.items);
            answers.push(job.done);
        }
        // Each job is sorted already; the union needs sorting again to insert in key order.
        sort_dedup(&mut items);
        let outcome = commit(&mut conn, &items);
        for answer in answers {
            let result = match &outcome {
                Ok(()) => Ok(()),
                // rusqlite errors are not Clone: every waiter gets the message.
                Err(source) => Err(StoreError::Commit {
                    shard,
                    message: source.to_string(),
                }),
            };
            // A requester that went away (client disconnected) needs no answer.
            let _ = answer.send(result);
        }
    }
}

/// One transaction: insert `items` (sorted, distinct) and add to each tenant's count the
/// rows that were new.
pub(crate) fn commit(conn: &mut Connection, items: &[Item]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert =
            tx.prepare_cached("INSERT OR IGNORE INTO items (tenant, id) VALUES (?1, ?2)")?;
        let mut add = tx.prepare_cached(
            "INSERT INTO counts (tenant, n) VALUES (?1, ?2)
             ON CONFLICT (tenant) DO UPDATE SET n = n + excluded.n",
        )?;
        let mut start = 0;
        while start < items.len() {
            let tenant = &items[start].tenant;
            let end = start + items[start..].partition_point(|item| &item.tenant == tenant);
            let mut fresh: i64 = 0;
            for item in &items[start..end] {
                fresh += insert.execute(params![item.tenant, item.id])? as i64;
            }
            if fresh > 0 {
                add.execute(params![tenant, fresh])?;
            }
            start = end;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(tenant: &str, id: &str) -> Item {
        Item {
            tenant: tenant.into(),
            id: id.into(),
        }
    }

    fn count(conn: &Connection, tenant: &str) -> i64 {
        conn.query_row("SELECT n FROM counts WHERE tenant = ?1", [tenant], |r| {
            r.get(0)
        })
        .optional()
        .unwrap()
        .unwrap_or(0)
    }

    #[test]
    fn a_commit_counts_only_rows_it_inserted() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("x.sqlite"), false).unwrap();
        commit(&mut conn, &[item("a", "1"), item("a", "2"), item("b", "1")]).unwrap();
        commit(&mut conn, &[item("a", "2"), item("a", "3"), item("c", "1")]).unwrap();
        assert_eq!(count(&conn, "a"), 3);
        assert_eq!(count(&conn, "b"), 1);
        assert_eq!(count(&conn, "c"), 1);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 5);
    }
}
