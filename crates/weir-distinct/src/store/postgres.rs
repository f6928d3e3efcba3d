//! The Postgres store, for workers on several hosts: `<prefix>_items (tenant, id)` and
//! `<prefix>_counts (tenant, n)`. A worker writes a shard only while it holds the session
//! advisory lock `(hash of prefix, shard)` on that shard's own connection; Postgres frees it
//! when the connection ends, which the death of the worker (`kill -9` included) causes. If
//! the connection drops, the writer's next statement fails with it, so a writer that lost
//! its lock can never commit.
//!
//! A commit is one statement: the new rows are inserted with `ON CONFLICT DO NOTHING`, and
//! the ones actually inserted (`RETURNING`) are added to their tenants' counts.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

use super::{StoreError, StoreOptions};
use crate::shard::{sort_dedup, tenant_hash, Item};

/// Requests waiting for one shard's writer before senders wait too.
const QUEUE_DEPTH: usize = 1024;

struct Job {
    items: Vec<Item>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    prefix: String,
    options: StoreOptions,
    lock_space: i32,
    reader: Client,
    writers: tokio::sync::Mutex<HashMap<u16, mpsc::Sender<Job>>>,
    tasks: tokio_util::task::TaskTracker,
}

fn pg(err: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(err.to_string())
}

async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(pg)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(%err, "a Postgres connection ended");
        }
    });
    Ok(client)
}

impl PostgresStore {
    /// Connects and creates the tables if needed. `prefix` must be a plain identifier.
    pub async fn open(url: &str, prefix: &str, options: StoreOptions) -> Result<Self, StoreError> {
        let plain = prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if prefix.is_empty() || !plain || prefix.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(StoreError::Postgres(format!(
                "table prefix {prefix:?} must be letters, digits and _"
            )));
        }
        let reader = connect(url).await?;
        reader
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {prefix}_items (
                     tenant TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (tenant, id));
                 CREATE TABLE IF NOT EXISTS {prefix}_counts (
                     tenant TEXT PRIMARY KEY, n BIGINT NOT NULL);"
            ))
            .await
            .map_err(pg)?;
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                url: url.to_string(),
                prefix: prefix.to_string(),
                options,
                // Advisory locks are per database: the prefix keeps two stores apart.
                lock_space: tenant_hash(prefix) as i32,
                reader,
                writers: tokio::sync::Mutex::new(HashMap::new()),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        })
    }

    pub fn options(&self) -> StoreOptions {
        self.inner.options
    }

    pub async fn insert_shard(&self, shard: u16, items: Vec<Item>) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        let jobs = self.writer(shard).await?;
        if jobs.send(Job { items, done }).await.is_err() {
            self.inner.writers.lock().await.remove(&shard);
            return Err(StoreError::WriterGone(shard));
        }
        answer.await.unwrap_or(Err(StoreError::WriterGone(shard)))
    }

    async fn writer(&self, shard: u16) -> Result<mpsc::Sender<Job>, StoreError> {
        let mut writers = self.inner.writers.lock().await;
        if let Some(jobs) = writers.get(&shard).filter(|jobs| !jobs.is_closed()) {
            return Ok(jobs.clone());
        }
        let client = connect(&self.inner.url).await?;
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&self.inner.lock_space, &i32::from(shard)],
            )
            .await
            .map_err(pg)?
            .get(0);
        if !locked {
            return Err(StoreError::Busy {
                shard,
                reason: "its advisory lock is held by another session".into(),
            });
        }
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let statement = format!(
            "WITH fresh AS (
                 INSERT INTO {p}_items (tenant, id)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT DO NOTHING RETURNING tenant)
             INSERT INTO {p}_counts (tenant, n)
             SELECT tenant, count(*) FROM fresh GROUP BY tenant
             ON CONFLICT (tenant) DO UPDATE SET n = {p}_counts.n + excluded.n",
            p = self.inner.prefix
        );
        let max_items = self.inner.options.max_group_items;
        self.inner.tasks.spawn(write_loop(
            Lock {
                space: self.inner.lock_space,
                shard,
            },
            client,
            statement,
            queue,
            max_items,
        ));
        writers.insert(shard, jobs.clone());
        Ok(jobs)
    }

    pub async fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        let row = self
            .inner
            .reader
            .query_opt(
                &format!(
                    "SELECT n FROM {}_counts WHERE tenant = $1",
                    self.inner.prefix
                ),
                &[&tenant],
            )
            .await
            .map_err(pg)?;
        Ok(row.map_or(0, |row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)))
    }

    /// Stops every writer once it has committed what it was sent; their connections close,
    /// releasing the shards.
    pub async fn close(self) {
        self.inner.writers.lock().await.clear();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Takes every job waiting (up to `max_items` items), commits them in one statement,
/// answers each. A failed commit ends the writer: its connection, and so its lock, may be
/// gone, and the next request re-opens the shard from scratch.
async fn write_loop(
    lock: Lock,
    client: Client,
    statement: String,
    mut queue: mpsc::Receiver<Job>,
    max_items: usize,
) {
    let shard = lock.shard;
    while let Some(first) = queue.recv().await {
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
        let mut items = Vec::with_capacity(held);
        let mut answers = Vec::with_capacity(jobs.len());
        for job in jobs {
            items.extend(job.items);
            answers.push(job.done);
        }
        sort_dedup(&mut items);
        let (tenants, ids): (Vec<String>, Vec<String>) =
            items.into_iter().map(|item| (item.tenant, item.id)).unzip();
        let outcome = client.execute(&statement, &[&tenants, &ids]).await;
        let failed = outcome.as_ref().err().map(ToString::to_string);
        for answer in answers {
            let result = match &failed {
                None => Ok(()),
                Some(message) => Err(StoreError::Commit {
                    shard,
                    message: message.clone(),
                }),
            };
            let _ = answer.send(result);
        }
        if failed.is_some() {
            return;
        }
    }
    // Released here rather than when the session ends, which Postgres notices only later:
    // a store closed and another opened at once must find the shard free.
    let released = client
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&lock.space, &i32::from(shard)],
        )
        .await;
    if let Err(err) = released {
        tracing::warn!(shard, %err, "could not release a shard's lock; its session end will");
    }
}

struct Lock {
    space: i32,
    shard: u16,
}
