//! The embedded store: one SQLite file in WAL mode, written by one connection.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use uuid::Uuid;

use super::{
    keyed_dead_letter, to_i64, to_u64, Count, DeadLetterRetention, Dedupe, FlushReport,
    KeyedIncrement, StoreError, Tables, KEYED_SOURCE,
};
use crate::aggregate::{plan, DeadLetter, EntryId, Fresh, Pending, Plan};
use crate::idempotency::Recorded;

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    tables: Arc<Tables>,
    path: PathBuf,
    /// This process's row in the flushes table.
    writer: Arc<str>,
    /// Keyed commits wait for the disk (else for the OS, like the embedded log's 202s).
    keyed_fsync: bool,
}

impl SqliteStore {
    pub async fn open(path: &Path, tables: Tables) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|err| StoreError::Io(dir.display().to_string(), err))?;
        }
        let conn = Connection::open(path)?;
        // FULL: a commit is on disk before the log behind it may be truncated.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS {c} (key TEXT PRIMARY KEY, total INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS {m} (source TEXT PRIMARY KEY, seq INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS {a} (source TEXT NOT NULL, ms INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (source, ms, seq));
             {dead_table};
             CREATE INDEX IF NOT EXISTS {d}_at ON {d} (at_ms);
             CREATE TABLE IF NOT EXISTS {k} (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, created_ms INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS {k}_created ON {k} (created_ms);
             CREATE TABLE IF NOT EXISTS {f} (writer TEXT PRIMARY KEY, committed_ms INTEGER NOT NULL);",
            c = tables.counts,
            m = tables.marks,
            a = tables.applied,
            d = tables.dead,
            k = tables.keys,
            f = tables.flushes,
            dead_table = dead_letter_table(&tables.dead),
        ))?;
        widen_dead_letter_key(&conn, &tables.dead)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            tables: Arc::new(tables),
            path: path.to_path_buf(),
            writer: Arc::from(Uuid::new_v4().to_string()),
            keyed_fsync: true,
        })
    }

    /// Whether a keyed request's commit waits for the disk. Without `fsync` a 202 of the
    /// embedded log survives a process crash, not a power loss; keyed commits then promise
    /// the same, and skip the sync that would otherwise be paid per group.
    pub fn with_keyed_fsync(mut self, fsync: bool) -> Self {
        self.keyed_fsync = fsync;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection, &Tables) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        let tables = self.tables.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Task("the SQLite connection was poisoned".into()))?;
            job(&mut guard, &tables)
        })
        .await
        .map_err(|err| StoreError::Task(err.to_string()))?
    }

    /// One flush, one transaction: which entries are new, the current totals of their
    /// keys, the plan applied, and (embedded log) the watermark moved past them.
    pub async fn flush(
        &self,
        source: &str,
        dedupe: Dedupe,
        pending: Arc<Pending>,
        now_ms: i64,
    ) -> Result<FlushReport, StoreError> {
        let source = source.to_string();
        let writer = self.writer.clone();
        self.with(move |conn, t| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            record_commit(&tx, t, &writer, now_ms)?;
            let fresh = fresh_entries(&tx, t, &source, dedupe, &pending)?;
            let bases = current_totals(&tx, t, &pending)?;
            let plan = plan(&pending, fresh, |key| bases.get(key).copied().unwrap_or(0));
            apply(&tx, t, &source, &plan, now_ms)?;
            if dedupe == Dedupe::Watermark {
                if let Some(max) = pending.max_seq() {
                    advance_watermark(&tx, t, &source, max)?;
                }
            }
            tx.commit()?;
            Ok(FlushReport {
                applied: plan.applied,
                duplicates: plan.duplicates,
                keys: plan.deltas.len(),
                dead: plan.dead,
                released: Vec::new(),
            })
        })
        .await
    }

    pub async fn watermark(&self, source: &str) -> Result<u64, StoreError> {
        let source = source.to_string();
        self.with(move |conn, t| {
            let mark: Option<i64> = conn
                .query_row(
                    &format!("SELECT seq FROM {} WHERE source = ?1", t.marks),
                    [&source],
                    |row| row.get(0),
                )
                .optional()?;
            to_u64(mark.unwrap_or(0))
        })
        .await
    }

    pub async fn count(&self, key: Uuid) -> Result<Option<Count>, StoreError> {
        self.with(move |conn, t| {
            Ok(conn
                .query_row(
                    &format!("SELECT total, updated_ms FROM {} WHERE key = ?1", t.counts),
                    [key.to_string()],
                    |row| {
                        Ok(Count {
                            total: row.get(0)?,
                            updated_ms: row.get(1)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.with(|conn, _| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    pub async fn prune_applied(&self, source: &str, below: EntryId) -> Result<u64, StoreError> {
        let source = source.to_string();
        self.with(move |conn, t| {
            let removed = conn.execute(
                &format!(
                    "DELETE FROM {} WHERE source = ?1 AND (ms < ?2 OR (ms = ?2 AND seq < ?3))",
                    t.applied
                ),
                params![source, to_i64(below.ms)?, to_i64(below.seq)?],
            )?;
            Ok(removed as u64)
        })
        .await
    }

    /// Deletes dead letters older than `retention.max_age`, then the oldest beyond
    /// `retention.max_rows`.
    pub async fn prune_dead_letters(
        &self,
        now_ms: i64,
        retention: DeadLetterRetention,
    ) -> Result<u64, StoreError> {
        let max_age_ms = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let max_rows = to_i64(retention.max_rows)?;
        self.with(move |conn, t| {
            let expired = conn.execute(
                &format!("DELETE FROM {} WHERE at_ms < ?1", t.dead),
                [now_ms.saturating_sub(max_age_ms)],
            )?;
            let excess = conn.execute(
                &format!(
                    "DELETE FROM {d} WHERE rowid IN
                     (SELECT rowid FROM {d} ORDER BY at_ms DESC, rowid DESC LIMIT -1 OFFSET ?1)",
                    d = t.dead
                ),
                [max_rows],
            )?;
            Ok((expired + excess) as u64)
        })
        .await
    }

    /// See [`super::Store::apply_keyed`].
    pub async fn apply_keyed(
        &self,
        batch: Vec<KeyedIncrement>,
        now_ms: i64,
    ) -> Result<Vec<Recorded>, StoreError> {
        let writer = self.writer.clone();
        let fsync = self.keyed_fsync;
        self.with(move |conn, t| {
            if !fsync {
                // WAL + NORMAL: the commit is in the OS's hands, safe from a process crash.
                // Set back to FULL before the flushes' commits, which must reach the disk.
                conn.execute_batch("PRAGMA synchronous = NORMAL")?;
            }
            let result = apply_keyed_batch(conn, t, &writer, &batch, now_ms);
            if !fsync {
                conn.execute_batch("PRAGMA synchronous = FULL")?;
            }
            result
        })
        .await
    }

    pub async fn prune_keys(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.with(move |conn, t| {
            let keys = conn.execute(
                &format!("DELETE FROM {} WHERE created_ms < ?1", t.keys),
                [before_ms],
            )?;
            conn.execute(
                &format!("DELETE FROM {} WHERE committed_ms < ?1", t.flushes),
                [before_ms],
            )?;
            Ok(keys as u64)
        })
        .await
    }

    pub async fn last_commit_ms(&self) -> Result<Option<i64>, StoreError> {
        self.with(move |conn, t| {
            Ok(conn.query_row(
                &format!("SELECT max(committed_ms) FROM {}", t.flushes),
                [],
                |row| row.get(0),
            )?)
        })
        .await
    }

    pub async fn dead_letters(&self, source: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let source = source.to_string();
        self.with(move |conn, t| {
            let mut stmt = conn.prepare(&format!(
                "SELECT ms, seq, key, value, reason FROM {} WHERE source = ?1 ORDER BY ms, seq",
                t.dead
            ))?;
            let rows = stmt.query_map([&source], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (ms, seq, key, value, reason) = row?;
                out.push(DeadLetter {
                    id: EntryId {
                        ms: to_u64(ms)?,
                        seq: to_u64(seq)?,
                    },
                    key: Uuid::try_parse(&key).map_err(|err| StoreError::Range(err.to_string()))?,
                    value,
                    reason,
                });
            }
            Ok(out)
        })
        .await
    }
}

/// Which entries of `pending` were not applied before: above the watermark, or (stream
/// ids) not yet recorded, recording them as it goes.
fn fresh_entries(
    tx: &Transaction,
    t: &Tables,
    source: &str,
    dedupe: Dedupe,
    pending: &Pending,
) -> Result<Fresh, StoreError> {
    match dedupe {
        Dedupe::Watermark => {
            let mark: Option<i64> = tx
                .query_row(
                    &format!("SELECT seq FROM {} WHERE source = ?1", t.marks),
                    [source],
                    |row| row.get(0),
                )
                .optional()?;
            Ok(Fresh::AboveSeq(to_u64(mark.unwrap_or(0))?))
        }
        Dedupe::Ids => {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO {} (source, ms, seq) VALUES (?1, ?2, ?3)",
                t.applied
            ))?;
            let mut new = HashSet::new();
            // An entry holds several increments: record its id once, and count them all.
            let ids: std::collections::BTreeSet<EntryId> = pending.ids().collect();
            for id in ids {
                if insert.execute(params![source, to_i64(id.ms)?, to_i64(id.seq)?])? == 1 {
                    new.insert(id);
                }
            }
            Ok(Fresh::Ids(new))
        }
    }
}

/// The persisted total of every key of `pending` (absent keys are 0).
fn current_totals(
    tx: &Transaction,
    t: &Tables,
    pending: &Pending,
) -> Result<HashMap<Uuid, i64>, StoreError> {
    let mut totals = HashMap::with_capacity(pending.keys.len());
    let mut select =
        tx.prepare_cached(&format!("SELECT total FROM {} WHERE key = ?1", t.counts))?;
    for (key, _) in &pending.keys {
        let total: Option<i64> = select
            .query_row([key.to_string()], |row| row.get(0))
            .optional()?;
        totals.insert(*key, total.unwrap_or(0));
    }
    Ok(totals)
}

/// Adds the plan's deltas to the totals and records its dead letters.
fn apply(
    tx: &Transaction,
    t: &Tables,
    source: &str,
    plan: &Plan,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut upsert = tx.prepare_cached(&format!(
        "INSERT INTO {c} (key, total, updated_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET total = {c}.total + excluded.total, updated_ms = excluded.updated_ms",
        c = t.counts
    ))?;
    for (key, delta) in &plan.deltas {
        upsert.execute(params![key.to_string(), delta, now_ms])?;
    }
    let mut dead = tx.prepare_cached(&format!(
        "INSERT OR IGNORE INTO {} (source, ms, seq, key, value, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        t.dead
    ))?;
    for letter in &plan.dead {
        dead.execute(params![
            source,
            to_i64(letter.id.ms)?,
            to_i64(letter.id.seq)?,
            letter.key.to_string(),
            letter.value,
            letter.reason,
            now_ms
        ])?;
    }
    Ok(())
}

/// One transaction: each key recorded, each new key's increment added (see `apply_keyed`).
fn apply_keyed_batch(
    conn: &mut Connection,
    t: &Tables,
    writer: &str,
    batch: &[KeyedIncrement],
    now_ms: i64,
) -> Result<Vec<Recorded>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    record_commit(&tx, t, writer, now_ms)?;
    let mut out = Vec::with_capacity(batch.len());
    {
        let mut insert_key = tx.prepare_cached(&format!(
            "INSERT OR IGNORE INTO {} (key, fingerprint, created_ms) VALUES (?1, ?2, ?3)",
            t.keys
        ))?;
        let mut stored = tx.prepare_cached(&format!(
            "SELECT fingerprint FROM {} WHERE key = ?1",
            t.keys
        ))?;
        let mut total =
            tx.prepare_cached(&format!("SELECT total FROM {} WHERE key = ?1", t.counts))?;
        for keyed in batch {
            if insert_key.execute(params![keyed.key, keyed.fingerprint, now_ms])? == 0 {
                let fingerprint: String = stored.query_row([&keyed.key], |row| row.get(0))?;
                out.push(Recorded::Existing(fingerprint));
                continue;
            }
            let key = keyed.increment.key;
            let base: i64 = total
                .query_row([key.to_string()], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            let plan = match base.checked_add(keyed.increment.value) {
                Some(_) => Plan {
                    applied: 1,
                    deltas: vec![(key, keyed.increment.value)],
                    ..Plan::default()
                },
                None => Plan {
                    dead: vec![keyed_dead_letter(keyed, base, now_ms)],
                    ..Plan::default()
                },
            };
            apply(&tx, t, KEYED_SOURCE, &plan, now_ms)?;
            out.push(Recorded::Applied);
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Notes this writer's commit time, read by `/readyz` of processes that do not flush.
fn record_commit(
    tx: &Transaction,
    t: &Tables,
    writer: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(&format!(
        "INSERT INTO {} (writer, committed_ms) VALUES (?1, ?2)
         ON CONFLICT (writer) DO UPDATE SET committed_ms = excluded.committed_ms",
        t.flushes
    ))?
    .execute(params![writer, now_ms])?;
    Ok(())
}

fn advance_watermark(
    tx: &Transaction,
    t: &Tables,
    source: &str,
    seq: u64,
) -> Result<(), StoreError> {
    tx.execute(
        &format!(
            "INSERT INTO {m} (source, seq) VALUES (?1, ?2)
             ON CONFLICT (source) DO UPDATE SET seq = max({m}.seq, excluded.seq)",
            m = t.marks
        ),
        params![source, to_i64(seq)?],
    )?;
    Ok(())
}

/// A stream entry holds several increments with distinct keys, so a dead letter is named
/// by (entry, key).
fn dead_letter_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (source TEXT NOT NULL, ms INTEGER NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL, reason TEXT NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (source, ms, seq, key))"
    )
}

/// Dead-letter tables made before entries held several increments are keyed by entry
/// alone: copied once into a table with the wider key.
fn widen_dead_letter_key(conn: &Connection, name: &str) -> Result<(), StoreError> {
    let sql: String = conn.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |row| row.get(0),
    )?;
    if sql.contains("seq, key)") {
        return Ok(());
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         ALTER TABLE {name} RENAME TO {name}_narrow;
         {create};
         INSERT INTO {name} SELECT * FROM {name}_narrow;
         DROP TABLE {name}_narrow;
         CREATE INDEX IF NOT EXISTS {name}_at ON {name} (at_ms);
         COMMIT;",
        create = dead_letter_table(name)
    ))?;
    tracing::info!(table = name, "dead-letter table re-keyed by (entry, key)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A store whose dead-letter table holds one row per `at_ms`.
    async fn with_dead_letters(dir: &Path, at: &[i64]) -> SqliteStore {
        let tables = Tables::new("t").unwrap();
        let store = SqliteStore::open(&dir.join("s.sqlite"), tables)
            .await
            .unwrap();
        let at = at.to_vec();
        store
            .with(move |conn, t| {
                for (n, at_ms) in at.iter().enumerate() {
                    conn.execute(
                        &format!(
                            "INSERT INTO {} (source, ms, seq, key, value, reason, at_ms)
                             VALUES ('s', ?1, ?1, 'k', 1, 'overflow', ?2)",
                            t.dead
                        ),
                        params![n as i64, at_ms],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        store
    }

    async fn kept(store: &SqliteStore) -> Vec<i64> {
        store
            .with(|conn, t| {
                let mut stmt =
                    conn.prepare(&format!("SELECT at_ms FROM {} ORDER BY at_ms", t.dead))?;
                let rows = stmt.query_map([], |row| row.get(0))?;
                Ok(rows.collect::<Result<Vec<i64>, _>>()?)
            })
            .await
            .unwrap()
    }

    fn retention(max_age_ms: u64, max_rows: u64) -> DeadLetterRetention {
        DeadLetterRetention {
            max_age: Duration::from_millis(max_age_ms),
            max_rows,
        }
    }

    #[tokio::test]
    async fn dead_letters_older_than_the_retention_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_dead_letters(dir.path(), &[1_000, 2_000, 3_000, 4_000, 5_000]).await;
        let removed = store
            .prune_dead_letters(10_000, retention(7_000, 100))
            .await
            .unwrap();
        assert_eq!(removed, 2);
        assert_eq!(kept(&store).await, vec![3_000, 4_000, 5_000]);
    }

    #[tokio::test]
    async fn beyond_the_row_limit_the_oldest_dead_letters_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_dead_letters(dir.path(), &[4_000, 1_000, 5_000, 3_000, 2_000]).await;
        let removed = store
            .prune_dead_letters(10_000, retention(60_000, 2))
            .await
            .unwrap();
        assert_eq!(removed, 3);
        assert_eq!(kept(&store).await, vec![4_000, 5_000]);
        let again = store
            .prune_dead_letters(10_000, retention(60_000, 2))
            .await
            .unwrap();
        assert_eq!(again, 0, "within both bounds, nothing more goes");
    }
}
