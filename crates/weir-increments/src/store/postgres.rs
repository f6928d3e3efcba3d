//! Postgres: one transaction per flush, arrays in and `UNNEST` out, so a flush costs a few
//! round trips however many keys it holds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use uuid::Uuid;

use super::{to_i64, to_u64, Count, Dedupe, FlushReport, StoreError, Tables};
use crate::aggregate::{plan, DeadLetter, EntryId, Fresh, Pending};

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    tables: Arc<Tables>,
    chunk: usize,
}

fn pool_error(err: impl std::fmt::Display) -> StoreError {
    StoreError::Pool(err.to_string())
}

impl PostgresStore {
    pub async fn open(url: &str, tables: Tables, chunk: usize) -> Result<Self, StoreError> {
        let pg_config: tokio_postgres::Config = url.parse()?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            // Verified: a connection cut by the network is found out before it is reused.
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .wait_timeout(Some(std::time::Duration::from_secs(5)))
            .create_timeout(Some(std::time::Duration::from_secs(5)))
            .recycle_timeout(Some(std::time::Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(pool_error)?;
        let store = PostgresStore {
            pool,
            tables: Arc::new(tables),
            chunk: chunk.max(1),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let t = &self.tables;
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {c} (key uuid PRIMARY KEY, total bigint NOT NULL, updated_ms bigint NOT NULL);
                 CREATE TABLE IF NOT EXISTS {m} (source text PRIMARY KEY, seq bigint NOT NULL);
                 CREATE TABLE IF NOT EXISTS {a} (source text NOT NULL, ms bigint NOT NULL, seq bigint NOT NULL, PRIMARY KEY (source, ms, seq));
                 CREATE TABLE IF NOT EXISTS {d} (source text NOT NULL, ms bigint NOT NULL, seq bigint NOT NULL, key uuid NOT NULL, value bigint NOT NULL, reason text NOT NULL, at_ms bigint NOT NULL, PRIMARY KEY (source, ms, seq));",
                c = t.counts,
                m = t.marks,
                a = t.applied,
                d = t.dead
            ))
            .await
            .or_else(|err| {
                // Two processes migrating at once can race on the catalog; the loser finds
                // the tables there on its next attempt, which the caller's retry provides.
                if err.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                    Ok(())
                } else {
                    Err(err)
                }
            })?;
        Ok(())
    }

    pub async fn flush(
        &self,
        source: &str,
        dedupe: Dedupe,
        pending: &Pending,
        now_ms: i64,
    ) -> Result<FlushReport, StoreError> {
        let t = &self.tables;
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        let fresh = match dedupe {
            Dedupe::Watermark => {
                tx.execute(
                    &format!(
                        "INSERT INTO {} (source, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                        t.marks
                    ),
                    &[&source],
                )
                .await?;
                let row = tx
                    .query_one(
                        &format!("SELECT seq FROM {} WHERE source = $1 FOR UPDATE", t.marks),
                        &[&source],
                    )
                    .await?;
                Fresh::AboveSeq(to_u64(row.get(0))?)
            }
            Dedupe::Ids => {
                let ids: Vec<EntryId> = pending.ids().collect();
                let mut new = HashSet::with_capacity(ids.len());
                let insert = tx
                    .prepare(&format!(
                        "INSERT INTO {} (source, ms, seq)
                         SELECT $1, ms, seq FROM unnest($2::int8[], $3::int8[]) AS t(ms, seq)
                         ON CONFLICT DO NOTHING RETURNING ms, seq",
                        t.applied
                    ))
                    .await?;
                for chunk in ids.chunks(self.chunk) {
                    let ms = chunk
                        .iter()
                        .map(|id| to_i64(id.ms))
                        .collect::<Result<Vec<_>, _>>()?;
                    let seq = chunk
                        .iter()
                        .map(|id| to_i64(id.seq))
                        .collect::<Result<Vec<_>, _>>()?;
                    for row in tx.query(&insert, &[&source, &ms, &seq]).await? {
                        new.insert(EntryId {
                            ms: to_u64(row.get(0))?,
                            seq: to_u64(row.get(1))?,
                        });
                    }
                }
                Fresh::Ids(new)
            }
        };
        // Lock the rows in key order: two workers flushing overlapping keys then wait for
        // each other instead of deadlocking.
        let keys: Vec<String> = pending
            .keys
            .iter()
            .map(|(key, _)| key.to_string())
            .collect();
        let mut bases: HashMap<Uuid, i64> = HashMap::with_capacity(keys.len());
        let select = tx
            .prepare(&format!(
                "SELECT key::text, total FROM {} WHERE key = ANY($1::text[]::uuid[]) ORDER BY key FOR UPDATE",
                t.counts
            ))
            .await?;
        for chunk in keys.chunks(self.chunk) {
            for row in tx.query(&select, &[&chunk]).await? {
                let key: String = row.get(0);
                let key =
                    Uuid::try_parse(&key).map_err(|err| StoreError::Range(err.to_string()))?;
                bases.insert(key, row.get(1));
            }
        }
        let plan = plan(pending, fresh, |key| bases.get(key).copied().unwrap_or(0));
        if !plan.deltas.is_empty() {
            let upsert = tx
                .prepare(&format!(
                    "INSERT INTO {c} (key, total, updated_ms)
                     SELECT k::uuid, d, $3 FROM unnest($1::text[], $2::int8[]) AS t(k, d)
                     ON CONFLICT (key) DO UPDATE SET total = {c}.total + EXCLUDED.total, updated_ms = EXCLUDED.updated_ms",
                    c = t.counts
                ))
                .await?;
            for chunk in plan.deltas.chunks(self.chunk) {
                let keys: Vec<String> = chunk.iter().map(|(key, _)| key.to_string()).collect();
                let deltas: Vec<i64> = chunk.iter().map(|(_, delta)| *delta).collect();
                tx.execute(&upsert, &[&keys, &deltas, &now_ms]).await?;
            }
        }
        if !plan.dead.is_empty() {
            let ms = plan
                .dead
                .iter()
                .map(|d| to_i64(d.id.ms))
                .collect::<Result<Vec<_>, _>>()?;
            let seq = plan
                .dead
                .iter()
                .map(|d| to_i64(d.id.seq))
                .collect::<Result<Vec<_>, _>>()?;
            let keys: Vec<String> = plan.dead.iter().map(|d| d.key.to_string()).collect();
            let values: Vec<i64> = plan.dead.iter().map(|d| d.value).collect();
            let reasons: Vec<String> = plan.dead.iter().map(|d| d.reason.clone()).collect();
            tx.execute(
                &format!(
                    "INSERT INTO {} (source, ms, seq, key, value, reason, at_ms)
                     SELECT $1, ms, seq, k::uuid, v, r, $7
                     FROM unnest($2::int8[], $3::int8[], $4::text[], $5::int8[], $6::text[]) AS t(ms, seq, k, v, r)
                     ON CONFLICT DO NOTHING",
                    t.dead
                ),
                &[&source, &ms, &seq, &keys, &values, &reasons, &now_ms],
            )
            .await?;
        }
        if dedupe == Dedupe::Watermark {
            if let Some(max) = pending.max_seq() {
                tx.execute(
                    &format!(
                        "UPDATE {} SET seq = GREATEST(seq, $2) WHERE source = $1",
                        t.marks
                    ),
                    &[&source, &to_i64(max)?],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(FlushReport {
            applied: plan.applied,
            duplicates: plan.duplicates,
            keys: plan.deltas.len(),
            dead: plan.dead,
        })
    }

    pub async fn watermark(&self, source: &str) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                &format!("SELECT seq FROM {} WHERE source = $1", self.tables.marks),
                &[&source],
            )
            .await?;
        to_u64(row.map_or(0, |row| row.get(0)))
    }

    pub async fn count(&self, key: Uuid) -> Result<Option<Count>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT total, updated_ms FROM {} WHERE key = $1::text::uuid",
                    self.tables.counts
                ),
                &[&key.to_string()],
            )
            .await?;
        Ok(row.map(|row| Count {
            total: row.get(0),
            updated_ms: row.get(1),
        }))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    pub async fn prune_applied(&self, source: &str, below: EntryId) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        Ok(client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE source = $1 AND (ms, seq) < ($2, $3)",
                    self.tables.applied
                ),
                &[&source, &to_i64(below.ms)?, &to_i64(below.seq)?],
            )
            .await?)
    }

    pub async fn dead_letters(&self, source: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                &format!(
                    "SELECT ms, seq, key::text, value, reason FROM {} WHERE source = $1 ORDER BY ms, seq",
                    self.tables.dead
                ),
                &[&source],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let key: String = row.get(2);
                Ok(DeadLetter {
                    id: EntryId {
                        ms: to_u64(row.get(0))?,
                        seq: to_u64(row.get(1))?,
                    },
                    key: Uuid::try_parse(&key).map_err(|err| StoreError::Range(err.to_string()))?,
                    value: row.get(3),
                    reason: row.get(4),
                })
            })
            .collect()
    }
}
