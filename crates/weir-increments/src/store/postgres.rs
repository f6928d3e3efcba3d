//! Postgres: one transaction per flush, arrays in and `UNNEST` out, so a flush costs a few
//! round trips however many keys it holds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use uuid::Uuid;

use super::{
    fence, floor, keyed_dead_letter, to_i64, to_u64, Count, Dedupe, Fencing, FlushReport,
    KeyedIncrement, StoreError, Tables, KEYED_SOURCE,
};
use crate::aggregate::{plan, DeadLetter, EntryId, Fresh, Pending};
use crate::idempotency::Recorded;

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    tables: Arc<Tables>,
    chunk: usize,
    /// Bound on each lock wait and statement of a flush (zero: none).
    flush_timeout: Duration,
    /// This process's row in the flushes table (a UUID, so it can be spliced into SQL).
    writer: Arc<str>,
}

/// How long a read of one total may take, lock waits included.
pub const COUNT_TIMEOUT_MS: u64 = 2_000;

/// Pruning must not hold up the flushes queued behind its lock on the mark for long.
const PRUNE_LOCK_TIMEOUT_MS: u64 = 2_000;

fn pool_error(err: impl std::fmt::Display) -> StoreError {
    StoreError::Pool(err.to_string())
}

impl PostgresStore {
    pub async fn open(
        url: &str,
        tables: Tables,
        chunk: usize,
        flush_timeout: Duration,
    ) -> Result<Self, StoreError> {
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
            flush_timeout,
            writer: Arc::from(Uuid::new_v4().to_string()),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let t = &self.tables;
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {c} (key uuid PRIMARY KEY, total bigint NOT NULL, updated_ms bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS {m} (source text PRIMARY KEY, seq bigint NOT NULL);
             ALTER TABLE {m} ADD COLUMN IF NOT EXISTS floor_ms bigint NOT NULL DEFAULT 0,
                             ADD COLUMN IF NOT EXISTS floor_seq bigint NOT NULL DEFAULT 0,
                             ADD COLUMN IF NOT EXISTS hold_until_ms bigint NOT NULL DEFAULT 0;
             CREATE TABLE IF NOT EXISTS {a} (source text NOT NULL, ms bigint NOT NULL, seq bigint NOT NULL, PRIMARY KEY (source, ms, seq));
             CREATE TABLE IF NOT EXISTS {d} (source text NOT NULL, ms bigint NOT NULL, seq bigint NOT NULL, key uuid NOT NULL, value bigint NOT NULL, reason text NOT NULL, at_ms bigint NOT NULL, PRIMARY KEY (source, ms, seq, key));
             DO $$ DECLARE old_key name; BEGIN
               SELECT conname INTO old_key FROM pg_constraint
                WHERE conrelid = '{d}'::regclass AND contype = 'p' AND array_length(conkey, 1) = 3;
               IF old_key IS NOT NULL THEN
                 EXECUTE format('ALTER TABLE {d} DROP CONSTRAINT %I, ADD PRIMARY KEY (source, ms, seq, key)', old_key);
               END IF;
             END $$;
             CREATE INDEX IF NOT EXISTS {d}_at ON {d} (source, at_ms);
             CREATE TABLE IF NOT EXISTS {k} (key text PRIMARY KEY, fingerprint text NOT NULL, created_ms bigint NOT NULL);
             CREATE INDEX IF NOT EXISTS {k}_created ON {k} (created_ms);
             CREATE TABLE IF NOT EXISTS {f} (writer text PRIMARY KEY, committed_ms bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS {b} (source text NOT NULL, min_ms bigint NOT NULL, min_seq bigint NOT NULL, max_ms bigint NOT NULL, max_seq bigint NOT NULL, ids bytea NOT NULL);
             CREATE INDEX IF NOT EXISTS {b}_max ON {b} (source, max_ms, max_seq);",
            c = t.counts,
            m = t.marks,
            a = t.applied,
            d = t.dead,
            k = t.keys,
            f = t.flushes,
            b = t.batches
        );
        // A stream entry holds several increments with distinct keys, so a dead letter is
        // named by (entry, key); tables made before that are given the wider key.
        // Processes migrating at once race on the catalog and the loser's whole batch rolls
        // back; by its next attempt the winner's objects are there.
        let mut attempt = 0;
        loop {
            match client.batch_execute(&ddl).await {
                Ok(()) => return Ok(()),
                Err(err) if attempt < 3 && is_catalog_race(&err) => attempt += 1,
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// One flush, one transaction: which entries are new, the totals they change, the
    /// dead letters they produce, and (embedded log) the raised watermark.
    pub async fn flush(
        &self,
        source: &str,
        dedupe: Dedupe,
        pending: &Pending,
        now_ms: i64,
    ) -> Result<FlushReport, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        self.begin_write(&tx, now_ms).await?;
        let fresh = match dedupe {
            Dedupe::Watermark => Fresh::AboveSeq(self.lock_watermark(&tx, source).await?),
            Dedupe::Ids => Fresh::Ids(self.record_new_ids(&tx, source, pending).await?),
        };
        let bases = self.lock_totals(&tx, pending).await?;
        let plan = plan(pending, fresh, |key| bases.get(key).copied().unwrap_or(0));
        self.add_to_totals(&tx, &plan.deltas, now_ms).await?;
        self.record_dead(&tx, source, &plan.dead, now_ms).await?;
        if dedupe == Dedupe::Watermark {
            if let Some(max) = pending.max_seq() {
                self.raise_watermark(&tx, source, max).await?;
            }
        }
        tx.commit().await?;
        Ok(FlushReport {
            applied: plan.applied,
            duplicates: plan.duplicates,
            keys: plan.deltas.len(),
            dead: plan.dead,
            released: Vec::new(),
        })
    }

    /// A flush of a Redis stream's entries, fenced against other workers' copies (see
    /// [`fence`]): the advisory lock and the question to the queue come first, then the
    /// totals as in [`Self::flush`].
    pub async fn flush_fenced(
        &self,
        source: &str,
        pending: &Pending,
        now_ms: i64,
        fencing: Fencing<'_>,
    ) -> Result<FlushReport, StoreError> {
        let mut held: Vec<EntryId> = pending.ids().collect();
        held.sort_unstable();
        held.dedup();
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        self.begin_write(&tx, now_ms).await?;
        let lock = fence::lock_key(&self.tables.counts, source);
        let exclusive = fencing.exclusive;
        let function = if exclusive {
            "pg_advisory_xact_lock"
        } else {
            "pg_advisory_xact_lock_shared"
        };
        tx.batch_execute(&format!("SELECT {function}({lock})"))
            .await?;
        let owned = fencing
            .fence
            .owned(&held, !exclusive)
            .await
            .map_err(StoreError::Fence)?;
        let keep = match owned {
            None if !exclusive => {
                // Only records can decide, and only the exclusive path reads them.
                return Err(StoreError::Fence(
                    "the consumer group is gone; retrying on the exclusive path".into(),
                ));
            }
            Some(owned) if !owned.forgotten.is_empty() && !exclusive => {
                return Err(StoreError::Fence(
                    "the consumer group was recreated since these entries were read; \
                     retrying on the exclusive path"
                        .into(),
                ));
            }
            None => None,
            Some(owned) => Some(&owned.ids | &owned.forgotten),
        };
        let (kept, released) = fence::split(&held, keep.as_ref());
        let fresh: HashSet<EntryId> = if exclusive {
            let unrecorded = self.not_in_batches(&tx, source, &kept).await?;
            self.record_ids(&tx, source, unrecorded).await?
        } else {
            kept.iter().copied().collect()
        };
        let bases = self.lock_totals(&tx, pending).await?;
        let plan = plan(pending, Fresh::Ids(fresh.clone()), |key| {
            bases.get(key).copied().unwrap_or(0)
        });
        self.add_to_totals(&tx, &plan.deltas, now_ms).await?;
        self.record_dead(&tx, source, &plan.dead, now_ms).await?;
        if !exclusive && !fresh.is_empty() {
            self.record_batch(&tx, source, &kept).await?;
        }
        tx.commit().await?;
        // An entry holds several increments: what was released is not a duplicate.
        let released_ids: HashSet<&EntryId> = released.iter().collect();
        let released_items = pending.ids().filter(|id| released_ids.contains(id)).count();
        Ok(FlushReport {
            applied: plan.applied,
            duplicates: plan.duplicates.saturating_sub(released_items),
            keys: plan.deltas.len(),
            dead: plan.dead,
            released,
        })
    }

    /// Of `ids` (sorted), those no fast-path batch row of `source` holds.
    async fn not_in_batches(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        ids: &[EntryId],
    ) -> Result<Vec<EntryId>, StoreError> {
        let Some([min_ms, min_seq, max_ms, max_seq]) = id_range(ids)? else {
            return Ok(Vec::new());
        };
        let rows = tx
            .query(
                &format!(
                    "SELECT ids FROM {} WHERE source = $1 AND (max_ms, max_seq) >= ($2, $3)
                     AND (min_ms, min_seq) <= ($4, $5)",
                    self.tables.batches
                ),
                &[&source, &min_ms, &min_seq, &max_ms, &max_seq],
            )
            .await?;
        let mut recorded = HashSet::new();
        for row in rows {
            let bytes: Vec<u8> = row.try_get(0)?;
            let ids = fence::unpack(&bytes).ok_or_else(|| {
                StoreError::Range(format!(
                    "a row of {} holds {} bytes, not whole entry ids",
                    self.tables.batches,
                    bytes.len()
                ))
            })?;
            recorded.extend(ids);
        }
        Ok(ids
            .iter()
            .filter(|id| !recorded.contains(id))
            .copied()
            .collect())
    }

    /// One row for a fast-path flush: its ids, packed, with their range for lookups.
    async fn record_batch(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        ids: &[EntryId],
    ) -> Result<(), StoreError> {
        let Some([min_ms, min_seq, max_ms, max_seq]) = id_range(ids)? else {
            return Ok(());
        };
        tx.execute(
            &format!(
                "INSERT INTO {} (source, min_ms, min_seq, max_ms, max_seq, ids)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                self.tables.batches
            ),
            &[
                &source,
                &min_ms,
                &min_seq,
                &max_ms,
                &max_seq,
                &fence::pack(ids),
            ],
        )
        .await?;
        Ok(())
    }

    /// A flush waiting on a lock past the claim threshold would see its entries claimed and
    /// flushed again by another worker: give up earlier, keep the entries, and retry. A
    /// worker paused mid-transaction (SIGSTOP, a VM freeze) would hold its row locks and
    /// stall every other worker: the server ends its session instead.
    ///
    /// The same round trip records this writer's commit time (see `/readyz`).
    async fn begin_write(&self, tx: &Transaction<'_>, now_ms: i64) -> Result<(), StoreError> {
        let lock_ms = self.flush_timeout.as_millis();
        let mut sql = String::new();
        if lock_ms > 0 {
            // A statement may also be slow without waiting for a lock, but it cannot wait
            // longer than the lock bound plus a margin under the claim threshold.
            let statement_ms = lock_ms * 3 / 2;
            sql.push_str(&format!(
                "SET LOCAL lock_timeout = {lock_ms}; SET LOCAL statement_timeout = {statement_ms};
                 SET LOCAL idle_in_transaction_session_timeout = {lock_ms};"
            ));
        }
        sql.push_str(&format!(
            "INSERT INTO {f} (writer, committed_ms) VALUES ('{w}', {now_ms})
             ON CONFLICT (writer) DO UPDATE SET committed_ms = EXCLUDED.committed_ms",
            f = self.tables.flushes,
            w = self.writer
        ));
        tx.batch_execute(&sql).await?;
        Ok(())
    }

    /// See [`super::Store::apply_keyed`]. Keys are taken in increment-key order, the order
    /// in which flushes lock totals, so the two never deadlock.
    pub async fn apply_keyed(
        &self,
        batch: Vec<KeyedIncrement>,
        now_ms: i64,
    ) -> Result<Vec<Recorded>, StoreError> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| batch[i].increment.key);
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        self.begin_write(&tx, now_ms).await?;
        let t = &self.tables;
        let insert_key = tx
            .prepare(&format!(
                "INSERT INTO {} (key, fingerprint, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                t.keys
            ))
            .await?;
        let stored = tx
            .prepare(&format!(
                "SELECT fingerprint FROM {} WHERE key = $1",
                t.keys
            ))
            .await?;
        let total = tx
            .prepare(&format!(
                "SELECT total FROM {} WHERE key = $1::text::uuid FOR UPDATE",
                t.counts
            ))
            .await?;
        let mut out = vec![Recorded::Applied; batch.len()];
        // Per counter key, in key order: its persisted total (read once, locked) and what this
        // batch adds to it, so several keyed requests for one counter share the overflow check.
        let mut totals: Vec<(Uuid, i64, i64)> = Vec::new();
        let mut dead = Vec::new();
        for i in order {
            let keyed = &batch[i];
            let inserted = tx
                .execute(&insert_key, &[&keyed.key, &keyed.fingerprint, &now_ms])
                .await?;
            if inserted == 0 {
                let row = tx.query_one(&stored, &[&keyed.key]).await?;
                out[i] = Recorded::Existing(row.try_get(0)?);
                continue;
            }
            let key = keyed.increment.key;
            if totals.last().map(|(last, _, _)| *last) != Some(key) {
                let base: i64 = match tx.query_opt(&total, &[&key.to_string()]).await? {
                    Some(row) => row.try_get(0)?,
                    None => 0,
                };
                totals.push((key, base, 0));
            }
            let last = totals.len() - 1;
            let (_, base, added) = &mut totals[last];
            match base
                .checked_add(*added)
                .and_then(|sum| sum.checked_add(keyed.increment.value))
            {
                Some(_) => *added += keyed.increment.value,
                None => dead.push(keyed_dead_letter(keyed, *base + *added, now_ms)),
            }
        }
        let merged: Vec<(Uuid, i64)> = totals
            .into_iter()
            .filter(|(_, _, added)| *added > 0)
            .map(|(key, _, added)| (key, added))
            .collect();
        self.add_to_totals(&tx, &merged, now_ms).await?;
        self.record_dead(&tx, KEYED_SOURCE, &dead, now_ms).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub async fn prune_keys(&self, before_ms: i64) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let keys = client
            .execute(
                &format!("DELETE FROM {} WHERE created_ms < $1", self.tables.keys),
                &[&before_ms],
            )
            .await?;
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE committed_ms < $1",
                    self.tables.flushes
                ),
                &[&before_ms],
            )
            .await?;
        Ok(keys)
    }

    pub async fn last_commit_ms(&self) -> Result<Option<i64>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_one(
                &format!("SELECT max(committed_ms) FROM {}", self.tables.flushes),
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn lock_watermark(&self, tx: &Transaction<'_>, source: &str) -> Result<u64, StoreError> {
        let marks = &self.tables.marks;
        tx.execute(
            &format!("INSERT INTO {marks} (source, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING"),
            &[&source],
        )
        .await?;
        let row = tx
            .query_one(
                &format!("SELECT seq FROM {marks} WHERE source = $1 FOR UPDATE"),
                &[&source],
            )
            .await?;
        to_u64(row.try_get(0)?)
    }

    async fn raise_watermark(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        max: u64,
    ) -> Result<(), StoreError> {
        tx.execute(
            &format!(
                "UPDATE {} SET seq = GREATEST(seq, $2) WHERE source = $1",
                self.tables.marks
            ),
            &[&source, &to_i64(max)?],
        )
        .await?;
        Ok(())
    }

    /// Reads the stream's low-water mark under a share lock (pruning, which raises it, waits
    /// for this transaction), fences off the ids below it, and records the others; the ids
    /// the insert returns are the new ones. Two flushes inserting one id serialize on the
    /// unique index: the second sees the first's row once it commits, so only one counts it.
    async fn record_new_ids(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        pending: &Pending,
    ) -> Result<HashSet<EntryId>, StoreError> {
        self.record_ids(tx, source, pending.ids()).await
    }

    /// [`Self::record_new_ids`] for any ids.
    async fn record_ids(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        ids: impl IntoIterator<Item = EntryId>,
    ) -> Result<HashSet<EntryId>, StoreError> {
        let floor = self.lock_floor(tx, source).await?;
        let (ids, fenced) = floor::ids_to_record(ids.into_iter(), floor);
        if fenced > 0 {
            tracing::info!(
                fenced,
                %floor,
                "skipped entries already applied and acknowledged (a stale copy held by a paused or slow worker)"
            );
        }
        let mut new = HashSet::with_capacity(ids.len());
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {} (source, ms, seq)
                 SELECT $1, ms, seq FROM unnest($2::int8[], $3::int8[]) AS t(ms, seq)
                 ON CONFLICT DO NOTHING RETURNING ms, seq",
                self.tables.applied
            ))
            .await?;
        for chunk in ids.chunks(self.chunk) {
            let (ms, seq) = id_columns(chunk.iter())?;
            for row in tx.query(&insert, &[&source, &ms, &seq]).await? {
                new.insert(EntryId {
                    ms: to_u64(row.try_get(0)?)?,
                    seq: to_u64(row.try_get(1)?)?,
                });
            }
        }
        Ok(new)
    }

    async fn lock_floor(&self, tx: &Transaction<'_>, source: &str) -> Result<EntryId, StoreError> {
        let marks = &self.tables.marks;
        // The row must exist before it is read: a flush that found none could not lock it,
        // and a concurrent prune could then raise the mark and forget ids under its feet.
        tx.execute(
            &format!("INSERT INTO {marks} (source, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING"),
            &[&source],
        )
        .await?;
        let row = tx
            .query_one(
                &format!("SELECT floor_ms, floor_seq FROM {marks} WHERE source = $1 FOR SHARE"),
                &[&source],
            )
            .await?;
        Ok(EntryId {
            ms: to_u64(row.try_get(0)?)?,
            seq: to_u64(row.try_get(1)?)?,
        })
    }

    /// Locks the current totals of the flush's keys in key order: two workers flushing
    /// overlapping keys then wait for each other instead of deadlocking.
    async fn lock_totals(
        &self,
        tx: &Transaction<'_>,
        pending: &Pending,
    ) -> Result<HashMap<Uuid, i64>, StoreError> {
        let keys: Vec<String> = pending
            .keys
            .iter()
            .map(|(key, _)| key.to_string())
            .collect();
        let mut bases: HashMap<Uuid, i64> = HashMap::with_capacity(keys.len());
        let select = tx
            .prepare(&format!(
                "SELECT key::text, total FROM {} WHERE key = ANY($1::text[]::uuid[]) ORDER BY key FOR UPDATE",
                self.tables.counts
            ))
            .await?;
        for chunk in keys.chunks(self.chunk) {
            for row in tx.query(&select, &[&chunk]).await? {
                bases.insert(parse_key(row.try_get(0)?)?, row.try_get(1)?);
            }
        }
        Ok(bases)
    }

    async fn add_to_totals(
        &self,
        tx: &Transaction<'_>,
        deltas: &[(Uuid, i64)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let upsert = tx
            .prepare(&format!(
                "INSERT INTO {c} (key, total, updated_ms)
                 SELECT k::uuid, d, $3 FROM unnest($1::text[], $2::int8[]) AS t(k, d)
                 ON CONFLICT (key) DO UPDATE SET total = {c}.total + EXCLUDED.total, updated_ms = EXCLUDED.updated_ms",
                c = self.tables.counts
            ))
            .await?;
        for chunk in deltas.chunks(self.chunk) {
            let keys: Vec<String> = chunk.iter().map(|(key, _)| key.to_string()).collect();
            let deltas: Vec<i64> = chunk.iter().map(|(_, delta)| *delta).collect();
            tx.execute(&upsert, &[&keys, &deltas, &now_ms]).await?;
        }
        Ok(())
    }

    async fn record_dead(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        dead: &[DeadLetter],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if dead.is_empty() {
            return Ok(());
        }
        // In id order, like the applied ids: concurrent inserts take the key in one order.
        let mut dead: Vec<&DeadLetter> = dead.iter().collect();
        dead.sort_unstable_by_key(|letter| letter.id);
        let (ms, seq) = id_columns(dead.iter().map(|letter| &letter.id))?;
        let keys: Vec<String> = dead.iter().map(|d| d.key.to_string()).collect();
        let values: Vec<i64> = dead.iter().map(|d| d.value).collect();
        let reasons: Vec<String> = dead.iter().map(|d| d.reason.clone()).collect();
        tx.execute(
            &format!(
                "INSERT INTO {} (source, ms, seq, key, value, reason, at_ms)
                 SELECT $1, ms, seq, k::uuid, v, r, $7
                 FROM unnest($2::int8[], $3::int8[], $4::text[], $5::int8[], $6::text[]) AS t(ms, seq, k, v, r)
                 ON CONFLICT DO NOTHING",
                self.tables.dead
            ),
            &[&source, &ms, &seq, &keys, &values, &reasons, &now_ms],
        )
        .await?;
        Ok(())
    }

    pub async fn watermark(&self, source: &str) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                &format!("SELECT seq FROM {} WHERE source = $1", self.tables.marks),
                &[&source],
            )
            .await?;
        match row {
            Some(row) => to_u64(row.try_get(0)?),
            None => Ok(0),
        }
    }

    /// The stream's low-water mark (see [`floor`]); `0-0` before the first prune.
    pub async fn floor(&self, source: &str) -> Result<EntryId, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT floor_ms, floor_seq FROM {} WHERE source = $1",
                    self.tables.marks
                ),
                &[&source],
            )
            .await?;
        match row {
            Some(row) => Ok(EntryId {
                ms: to_u64(row.try_get(0)?)?,
                seq: to_u64(row.try_get(1)?)?,
            }),
            None => Ok(EntryId { ms: 0, seq: 0 }),
        }
    }

    /// One total, read within [`COUNT_TIMEOUT_MS`]: a reader must not queue for as long as
    /// a lock on the table lasts, it gets an error (the API's 503) and asks again.
    pub async fn count(&self, key: Uuid) -> Result<Option<Count>, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {COUNT_TIMEOUT_MS}"))
            .await?;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT total, updated_ms FROM {} WHERE key = $1::text::uuid",
                    self.tables.counts
                ),
                &[&key.to_string()],
            )
            .await?;
        tx.commit().await?;
        match row {
            Some(row) => Ok(Some(Count {
                total: row.try_get(0)?,
                updated_ms: row.try_get(1)?,
            })),
            None => Ok(None),
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Raises the low-water mark of `source` to `below` (never lowers it), then forgets the
    /// recorded ids under the mark, in one transaction. The update waits for the flushes
    /// that read the old mark (they hold it in share mode), and flushes that start later
    /// see the new one: no flush can record an id the delete is about to forget, or miss
    /// that an id it holds was forgotten.
    pub async fn prune_applied(&self, source: &str, below: EntryId) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await?;
        let marks = &self.tables.marks;
        tx.batch_execute(&format!("SET LOCAL lock_timeout = {PRUNE_LOCK_TIMEOUT_MS}"))
            .await?;
        tx.execute(
            &format!("INSERT INTO {marks} (source, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING"),
            &[&source],
        )
        .await?;
        let (ms, seq) = (to_i64(below.ms)?, to_i64(below.seq)?);
        let now = crate::queue::embedded::now_ms() as i64;
        tx.execute(
            &format!(
                "UPDATE {marks} SET floor_ms = $2, floor_seq = $3
                 WHERE source = $1 AND (floor_ms, floor_seq) < ($2, $3) AND hold_until_ms <= $4"
            ),
            &[&source, &ms, &seq, &now],
        )
        .await?;
        let removed = tx
            .execute(
                &format!(
                    "DELETE FROM {applied} WHERE source = $1 AND (ms, seq) <
                     (SELECT floor_ms, floor_seq FROM {marks} WHERE source = $1)",
                    applied = self.tables.applied
                ),
                &[&source],
            )
            .await?;
        // A batch row goes once its last id is below the mark: no entry in it can be
        // pending again.
        tx.execute(
            &format!(
                "DELETE FROM {batches} WHERE source = $1 AND (max_ms, max_seq) <
                 (SELECT floor_ms, floor_seq FROM {marks} WHERE source = $1)",
                batches = self.tables.batches
            ),
            &[&source],
        )
        .await?;
        tx.commit().await?;
        Ok(removed)
    }

    pub async fn hold_floor(&self, source: &str, until_ms: i64) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let marks = &self.tables.marks;
        client
            .execute(
                &format!(
                    "INSERT INTO {marks} (source, seq, hold_until_ms) VALUES ($1, 0, $2)
                     ON CONFLICT (source) DO UPDATE
                     SET hold_until_ms = GREATEST({marks}.hold_until_ms, EXCLUDED.hold_until_ms)"
                ),
                &[&source, &until_ms],
            )
            .await?;
        Ok(())
    }

    pub async fn lower_floor(&self, source: &str, first: EntryId) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute(
                &format!(
                    "UPDATE {} SET floor_ms = $2, floor_seq = $3
                     WHERE source = $1 AND (floor_ms, floor_seq) > ($2, $3)",
                    self.tables.marks
                ),
                &[&source, &to_i64(first.ms)?, &to_i64(first.seq)?],
            )
            .await?;
        Ok(())
    }

    /// Deletes the dead letters of `source` recorded before `before_ms`, then all but the
    /// newest `keep`.
    pub async fn prune_dead_letters(
        &self,
        source: &str,
        before_ms: i64,
        keep: u64,
    ) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let dead = &self.tables.dead;
        let expired = client
            .execute(
                &format!("DELETE FROM {dead} WHERE source = $1 AND at_ms < $2"),
                &[&source, &before_ms],
            )
            .await?;
        let excess = client
            .execute(
                &format!(
                    // At or below the first row past the newest `keep`; no such row
                    // (fewer rows) compares as NULL and deletes nothing.
                    "DELETE FROM {dead} WHERE source = $1 AND (at_ms, ms, seq) <= (
                         SELECT at_ms, ms, seq FROM {dead} WHERE source = $1
                         ORDER BY at_ms DESC, ms DESC, seq DESC OFFSET $2 LIMIT 1)"
                ),
                &[&source, &to_i64(keep)?],
            )
            .await?;
        Ok(expired + excess)
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
                Ok(DeadLetter {
                    id: EntryId {
                        ms: to_u64(row.try_get(0)?)?,
                        seq: to_u64(row.try_get(1)?)?,
                    },
                    key: parse_key(row.try_get(2)?)?,
                    value: row.try_get(3)?,
                    reason: row.try_get(4)?,
                })
            })
            .collect()
    }
}

fn is_catalog_race(err: &tokio_postgres::Error) -> bool {
    [
        &SqlState::UNIQUE_VIOLATION,
        &SqlState::DUPLICATE_TABLE,
        &SqlState::DUPLICATE_COLUMN,
        &SqlState::DUPLICATE_OBJECT,
    ]
    .iter()
    .any(|state| err.code() == Some(*state))
}

fn parse_key(text: &str) -> Result<Uuid, StoreError> {
    Uuid::try_parse(text).map_err(|err| StoreError::Range(err.to_string()))
}

/// Entry ids as the two `int8[]` columns the statements unnest.
fn id_columns<'a>(
    ids: impl Iterator<Item = &'a EntryId>,
) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
    let mut ms = Vec::new();
    let mut seq = Vec::new();
    for id in ids {
        ms.push(to_i64(id.ms)?);
        seq.push(to_i64(id.seq)?);
    }
    Ok((ms, seq))
}

/// The first and last of sorted `ids` as the columns of a batch row's range (ms, seq, ms,
/// seq); `None` for no ids.
fn id_range(ids: &[EntryId]) -> Result<Option<[i64; 4]>, StoreError> {
    let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
        return Ok(None);
    };
    Ok(Some([
        to_i64(first.ms)?,
        to_i64(first.seq)?,
        to_i64(last.ms)?,
        to_i64(last.seq)?,
    ]))
}
