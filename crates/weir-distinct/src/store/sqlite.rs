//! The embedded store: per shard a directory `<database>/shard-NN/` with a SQLite index
//! (`items.sqlite`, WAL mode) and two append-only logs (`log-0`, `log-1`). A worker writes a
//! shard only while it holds `<database>/shard-NN/LOCK` (an `flock`, freed by the kernel
//! when the process dies, `kill -9` included), so two workers never decide concurrently
//! whether the same item is new. Any process may read counts.
//!
//! Acknowledging and counting are two steps, as `worker_persist` allows:
//! - The appender (one thread per store) takes every request waiting, appends each shard's
//!   items to that shard's active log in one write (and one `fdatasync` with `fsync: true`),
//!   keeps the same bytes in memory as the shard's pending items, and only then answers.
//!   An acknowledged item is therefore in a log on disk.
//! - Folders (a few threads) fold a shard's pending items into its index once the oldest is
//!   `fold_after` old or they are many: the log is switched to the other (empty) file, the
//!   items are sorted and deduplicated in memory, inserted in key order with `INSERT OR
//!   IGNORE` into the `WITHOUT ROWID (tenant, id)` table, and the rows actually inserted are
//!   added to each tenant's row in `counts`, in one transaction; then the old log is
//!   emptied. A count is one primary-key read.
//!
//! Folding is idempotent (an item already in the index counts nothing), so whoever opens a
//! shard next simply folds whatever both logs hold before taking new items: nothing
//! acknowledged is lost, and nothing counts twice. Memory is bounded by the pending bytes
//! (appends wait while too many are pending), never by the number of items ever stored.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};
use weir_runtime::datadir::{self, DataDirError, DataDirLock};
use weir_runtime::recordlog::{self, RecordWriter};

use super::{Damage, StoreError, StoreOptions};
use crate::metric_names::{DAMAGED_SHARDS, FOLDS, FOLD_LAG, ITEMS_FOLDED, PENDING_BYTES};
use crate::shard::{decode_items, Batch};

pub(crate) const DB_FILE: &str = "items.sqlite";
pub(crate) const LOG_FILES: [&str; 2] = ["log-0", "log-1"];
/// Requests waiting for the appender before senders wait too.
const QUEUE_DEPTH: usize = 4096;
/// Largest log record: one request's items for one shard, 10,000 items of two 256-byte
/// fields at most.
pub(crate) const MAX_RECORD: usize = 8 << 20;
/// A shard's pending bytes that start a fold without waiting for `fold_after`: folds big
/// enough that each index page is written once for many items.
const FOLD_BYTES: usize = 4 << 20;
/// Pending bytes of all shards above which appends wait for folds: the bound on memory.
const MAX_PENDING_BYTES: usize = 32 << 20;

static RECOVERY_ERRORS: weir_runtime::logs::LogLimiter =
    weir_runtime::logs::LogLimiter::per_second();

struct Job {
    batch: Batch,
    done: oneshot::Sender<Result<(), StoreError>>,
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    options: StoreOptions,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
    readers: Vec<Mutex<Option<Connection>>>,
}

/// What the appender and the folders share.
struct Shared {
    root: PathBuf,
    options: StoreOptions,
    shards: Vec<Mutex<Option<Arc<Shard>>>>,
    /// Shards found damaged, and what their logs looked like then: a shard is tried again
    /// only once its files change (a repair), and refused at once until then.
    damage: Vec<Mutex<Option<KnownDamage>>>,
    pending_bytes: AtomicUsize,
    /// Signalled after every fold (appends waiting for room) and on a nudge (folders).
    folded: Condvar,
    nudge: Condvar,
    wake: Mutex<Wake>,
    stopping: AtomicBool,
}

struct KnownDamage {
    damage: Damage,
    files: Vec<Option<(u64, u64, i64, i64)>>,
}

/// Each log's inode, length and modification time: a repair replaces the file.
fn log_identity(dir: &Path) -> Vec<Option<(u64, u64, i64, i64)>> {
    use std::os::unix::fs::MetadataExt;
    LOG_FILES
        .iter()
        .map(|name| {
            std::fs::metadata(dir.join(name))
                .ok()
                .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        })
        .collect()
}

#[derive(Default)]
struct Wake {
    nudged: bool,
}

/// One open shard, owned (locked) by this process.
struct Shard {
    id: u16,
    dir: PathBuf,
    log: Mutex<Log>,
    /// Held for a whole fold: one fold of a shard at a time.
    db: Mutex<Connection>,
    /// A fold failed: the shard must be re-opened (and recovered from its logs) before it
    /// takes new items.
    broken: AtomicBool,
    _lock: DataDirLock,
}

struct Log {
    writers: [RecordWriter; 2],
    active: usize,
    pending: Vec<u8>,
    since: Option<Instant>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves data that is still consistent here (every update
    // is completed before the guard drops or is undone on error), so poisoning is ignored.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SqliteStore {
    /// A store under `root` (created if missing). Shards are opened, their locks taken and
    /// their logs recovered, on first write.
    pub fn open(root: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let database = |message: String| StoreError::Database {
            path: root.display().to_string(),
            message,
        };
        if root.exists() && !root.is_dir() {
            return Err(database("exists and is not a directory".into()));
        }
        std::fs::create_dir_all(root).map_err(|err| database(err.to_string()))?;
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            options,
            shards: (0..options.shards).map(|_| Mutex::new(None)).collect(),
            damage: (0..options.shards).map(|_| Mutex::new(None)).collect(),
            pending_bytes: AtomicUsize::new(0),
            folded: Condvar::new(),
            nudge: Condvar::new(),
            wake: Mutex::new(Wake::default()),
            stopping: AtomicBool::new(false),
        });
        // A previous owner that died may have left acknowledged items in logs: count them
        // before the first read.
        shared.recover_orphans();
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let mut threads = Vec::new();
        let spawn = |name: String, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(body)
                .map_err(|err| StoreError::Task(err.to_string()))
        };
        let appender = shared.clone();
        threads.push(spawn(
            "distinct-append".into(),
            Box::new(move || append_loop(&appender, queue)),
        )?);
        for n in 0..options.folders.max(1) {
            let folder = shared.clone();
            threads.push(spawn(
                format!("distinct-fold-{n}"),
                Box::new(move || fold_loop(&folder, n == 0)),
            )?);
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                options,
                jobs: Mutex::new(Some(jobs)),
                threads: Mutex::new(threads),
                shared,
                readers: (0..options.shards).map(|_| Mutex::new(None)).collect(),
            }),
        })
    }

    pub fn options(&self) -> StoreOptions {
        self.inner.options
    }

    fn shard_dir(&self, shard: u16) -> PathBuf {
        shard_dir(&self.inner.root, shard)
    }

    /// Appends `batch` to its shards' logs and returns once it is durable there (and, with
    /// a zero `fold_after`, counted).
    pub async fn insert_batch(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.groups.is_empty() {
            return Ok(());
        }
        let jobs = lock(&self.inner.jobs)
            .clone()
            .ok_or(StoreError::Task("the store is closed".into()))?;
        let (done, answer) = oneshot::channel();
        if jobs.send(Job { batch, done }).await.is_err() {
            return Err(StoreError::Task("the store's appender has stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Task("the store's appender has stopped".into())))
    }

    /// Folds every pending item of every open shard now: after it returns, every item
    /// acknowledged before the call is counted.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || {
            for shard in open_shards(&shared) {
                fold(&shared, &shard)?;
            }
            Ok(())
        })
        .await
        .map_err(|err| StoreError::Task(err.to_string()))?
    }

    /// The distinct items counted for `tenant`: one lookup in its shard's `counts`.
    pub async fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        let shard = crate::shard::shard_of(tenant, self.inner.options.shards);
        let store = self.clone();
        let tenant = tenant.to_string();
        tokio::task::spawn_blocking(move || store.count_blocking(shard, &tenant))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))?
    }

    /// The shards found damaged (by any process: a write, or the check of unfolded logs
    /// at open and every second after) and not repaired since: their marks on disk.
    pub fn damaged(&self) -> Vec<Damage> {
        (0..self.inner.options.shards)
            .filter_map(|shard| damage_mark(&self.shard_dir(shard), shard))
            .collect()
    }

    fn count_blocking(&self, shard: u16, tenant: &str) -> Result<u64, StoreError> {
        let sqlite = |source| StoreError::Sqlite { shard, source };
        // Acknowledged items are in the damaged part: any count would be short, silently.
        // The mark on disk, not this process's memory: another worker may have found it.
        if let Some(damage) = damage_mark(&self.shard_dir(shard), shard) {
            return Err(StoreError::Damaged(damage));
        }
        let Some(slot) = self.inner.readers.get(usize::from(shard)) else {
            return Err(StoreError::Task(format!("no shard {shard}")));
        };
        let mut reader = lock(slot);
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
            conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite)?;
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

    /// Stops taking items, folds everything pending, and releases the shards.
    pub async fn close(self) {
        drop(lock(&self.inner.jobs).take());
        let threads: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.inner.threads));
        let shared = self.inner.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut threads = threads.into_iter();
            // The appender first: it ends once every request it was sent is answered.
            if let Some(appender) = threads.next() {
                let _ = appender.join();
            }
            shared.stopping.store(true, Ordering::SeqCst);
            shared.nudge_folders();
            for folder in threads {
                let _ = folder.join();
            }
            for shard in open_shards(&shared) {
                if let Err(err) = fold(&shared, &shard) {
                    tracing::warn!(shard = shard.id, %err, "items left in the shard's log at close; the next owner folds them");
                }
            }
            for slot in &shared.shards {
                lock(slot).take();
            }
        })
        .await;
    }
}

fn shard_dir(root: &Path, shard: u16) -> PathBuf {
    root.join(format!("shard-{shard:02}"))
}

fn open_shards(shared: &Shared) -> Vec<Arc<Shard>> {
    shared
        .shards
        .iter()
        .filter_map(|slot| lock(slot).clone())
        .collect()
}

impl Shared {
    fn nudge_folders(&self) {
        lock(&self.wake).nudged = true;
        self.nudge.notify_all();
    }

    /// Folds the logs of every shard that is not open here, has logged items, and whose lock
    /// is free: its owner died before folding them, and no write may come to open it. The
    /// shard is released again afterwards, for whichever worker is sent its tenants.
    fn recover_orphans(&self) {
        for (id, slot) in self.shards.iter().enumerate() {
            let id = id as u16;
            let dir = shard_dir(&self.root, id);
            let logged = LOG_FILES.iter().any(|name| {
                std::fs::metadata(dir.join(name))
                    .is_ok_and(|m| m.len() > recordlog::MAGIC.len() as u64)
            });
            // A damaged shard is looked at again after a repair, even if that left its
            // logs empty.
            let damaged = lock(&self.damage[usize::from(id)]).is_some();
            if !logged && !damaged {
                continue;
            }
            let slot = lock(slot);
            if slot.is_some() {
                continue;
            }
            match self.open_checked(id) {
                Ok(shard) => drop(shard),
                // Its owner is alive and folds them itself; damage is logged once, when
                // found.
                Err(StoreError::Busy { .. } | StoreError::Damaged(_)) => {}
                Err(err) => {
                    weir_runtime::warn_limited!(RECOVERY_ERRORS, shard = id, %err, "cannot fold a shard's logged items");
                }
            }
        }
    }

    /// The open shard `id`, opening (and recovering) it first if needed.
    fn shard(&self, id: u16) -> Result<Arc<Shard>, StoreError> {
        let Some(slot) = self.shards.get(usize::from(id)) else {
            return Err(StoreError::Task(format!("no shard {id}")));
        };
        let mut slot = lock(slot);
        if let Some(shard) = slot.as_ref().filter(|s| !s.broken.load(Ordering::SeqCst)) {
            return Ok(shard.clone());
        }
        if let Some(broken) = slot.take() {
            // Its pending items are in its logs, which the re-opened shard folds; the fold
            // thread may still hold it, so wait for that to end before re-locking.
            let pending = std::mem::take(&mut lock(&broken.log).pending);
            self.pending_bytes
                .fetch_sub(pending.len(), Ordering::SeqCst);
            drop(lock(&broken.db));
            drop(broken);
        }
        let shard = Arc::new(self.open_checked(id)?);
        *slot = Some(shard.clone());
        Ok(shard)
    }

    /// [`open_shard`], remembering damage: a shard found damaged is refused at once (no
    /// re-reading of its logs) until its files change, and is reported until it opens.
    fn open_checked(&self, id: u16) -> Result<Shard, StoreError> {
        let dir = shard_dir(&self.root, id);
        let Some(slot) = self.damage.get(usize::from(id)) else {
            return Err(StoreError::Task(format!("no shard {id}")));
        };
        if let Some(known) = lock(slot).as_ref() {
            if known.files == log_identity(&dir) {
                return Err(StoreError::Damaged(known.damage.clone()));
            }
        }
        let opened = open_shard(id, &dir, self.options);
        let mut known = lock(slot);
        match &opened {
            Ok(_) => {
                if known.take().is_some() {
                    tracing::warn!(
                        shard = id,
                        "the damaged shard opens cleanly again (repaired); it takes reads and writes"
                    );
                }
            }
            Err(StoreError::Damaged(damage)) => {
                if known.as_ref().map(|k| &k.damage) != Some(damage) {
                    tracing::error!(
                        shard = id,
                        file = %damage.file,
                        offset = damage.offset,
                        reason = %damage.reason,
                        "a shard is damaged: its counts and writes are refused until `weir distinct repair` moves the damage aside"
                    );
                }
                *known = Some(KnownDamage {
                    damage: damage.clone(),
                    files: log_identity(&dir),
                });
            }
            Err(_) => {}
        }
        drop(known);
        let damaged = self.damage.iter().filter(|s| lock(s).is_some()).count();
        metrics::gauge!(DAMAGED_SHARDS).set(damaged as f64);
        opened
    }
}

/// A log that fails its checks is damage (acknowledged items cannot be read); only an
/// I/O error is an ordinary failure, retried.
fn log_error(shard: u16, err: recordlog::RecordLogError) -> StoreError {
    use recordlog::RecordLogError;
    let damage = |path: &Path, offset: u64, reason: String| {
        StoreError::Damaged(Damage {
            shard,
            file: path.display().to_string(),
            offset,
            reason,
        })
    };
    match err {
        RecordLogError::Damaged {
            path,
            offset,
            reason,
        } => damage(&path, offset, reason.to_string()),
        RecordLogError::Format { path } => damage(
            &path,
            0,
            "not a Weir record file (its magic is wrong)".into(),
        ),
        RecordLogError::Rejected {
            path,
            offset,
            reason,
        } => damage(
            &path,
            offset,
            format!("a record's items do not decode: {reason}"),
        ),
        err @ RecordLogError::Io { .. } => StoreError::Log {
            shard,
            message: err.to_string(),
        },
    }
}

/// Takes the shard's lock, opens its index, and folds whatever its logs hold (items a
/// previous owner acknowledged and had not folded) before it takes anything new.
fn open_shard(id: u16, dir: &Path, options: StoreOptions) -> Result<Shard, StoreError> {
    let lock = datadir::lock(dir, "database").map_err(|source| match source {
        DataDirError::Locked { holder, .. } => StoreError::Busy {
            shard: id,
            reason: format!("locked by {holder}"),
        },
        source => StoreError::Open { shard: id, source },
    })?;
    let opened = open_locked(id, dir, options);
    // Marked (or cleared) while the lock is held: a reader that found the shard busy sees
    // the verdict of the scan that was running.
    match &opened {
        Ok(_) => clear_damage_mark(dir),
        Err(StoreError::Damaged(damage)) => mark_damaged(dir, damage),
        Err(_) => {}
    }
    let (conn, writers) = opened?;
    Ok(Shard {
        id,
        dir: dir.to_path_buf(),
        log: Mutex::new(Log {
            writers,
            active: 0,
            pending: Vec::new(),
            since: None,
        }),
        db: Mutex::new(conn),
        broken: AtomicBool::new(false),
        _lock: lock,
    })
}

/// Written into a damaged shard's directory by whoever finds the damage, so that every
/// process reading the shard's counts refuses them, not only the one that scanned its logs;
/// removed by a clean open (after `weir distinct repair`).
pub(crate) const DAMAGE_MARK: &str = "DAMAGED";

fn mark_damaged(dir: &Path, damage: &Damage) {
    let tmp = dir.join(format!("{DAMAGE_MARK}.tmp-{}", std::process::id()));
    let text = serde_json::to_vec(damage).unwrap_or_default();
    let written =
        std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, dir.join(DAMAGE_MARK)));
    if let Err(err) = written {
        // The in-memory verdict still refuses this process's reads and writes.
        tracing::error!(shard = damage.shard, %err, "cannot mark the damaged shard on disk");
    }
}

pub(crate) fn clear_damage_mark(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(DAMAGE_MARK));
}

/// The damage recorded in `dir`, if any: one `stat` when there is none.
fn damage_mark(dir: &Path, shard: u16) -> Option<Damage> {
    let text = std::fs::read(dir.join(DAMAGE_MARK)).ok()?;
    Some(serde_json::from_slice(&text).unwrap_or_else(|_| Damage {
        shard,
        file: dir.join(DAMAGE_MARK).display().to_string(),
        offset: 0,
        reason: "marked damaged (the mark itself does not parse)".into(),
    }))
}

/// Opens the index of a shard whose lock is held and folds what its logs hold.
pub(crate) fn open_locked(
    id: u16,
    dir: &Path,
    options: StoreOptions,
) -> Result<(Connection, [RecordWriter; 2]), StoreError> {
    let sqlite = |source| StoreError::Sqlite { shard: id, source };
    let log_error = |err| log_error(id, err);
    let mut conn = open_connection(&dir.join(DB_FILE), options.fsync).map_err(sqlite)?;
    let mut recovered = Vec::new();
    for name in LOG_FILES {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let mut malformed = None;
        let scan = recordlog::scan(&path, MAX_RECORD, |payload| {
            let mut items = Vec::new();
            match decode_items(payload, &mut items) {
                Ok(()) => recovered.extend_from_slice(payload),
                Err(err) => malformed = Some(err.to_string()),
            }
            malformed.clone().map_or(Ok(()), Err)
        })
        .map_err(log_error)?;
        // Only an incomplete last write (never acknowledged) is cut, and loudly.
        recordlog::cut_torn_tail(&path, &scan).map_err(log_error)?;
    }
    if !recovered.is_empty() {
        let mut items = Vec::new();
        decode_items(&recovered, &mut items).map_err(|err| StoreError::Log {
            shard: id,
            message: err.to_string(),
        })?;
        let n = items.len();
        sort_dedup_pairs(&mut items);
        commit(&mut conn, &items).map_err(sqlite)?;
        tracing::info!(
            shard = id,
            items = n,
            "folded the items a previous owner had logged"
        );
    }
    // Emptied only once what they held is committed to the index.
    let open = |name: &str| RecordWriter::open(&dir.join(name), 0).map_err(log_error);
    let writers = [open(LOG_FILES[0])?, open(LOG_FILES[1])?];
    Ok((conn, writers))
}

fn open_connection(path: &Path, fsync: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // A log is emptied only after the fold that holds its items commits, so the commit
    // must be as durable as the log was: FULL (synced) with `fsync: true`. NORMAL in WAL
    // mode is in the kernel before it returns, which survives the death of any process.
    let synchronous = if fsync { "FULL" } else { "NORMAL" };
    // A 4 MiB page cache (twice the default) keeps a shard's interior pages and the leaves
    // recent folds touched; with all 64 shards open that is 256 MiB at most. Checkpoints
    // every 4,000 pages rather than 1,000 sync less often.
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
         PRAGMA cache_size = -4096; PRAGMA wal_autocheckpoint = 4000;
         PRAGMA temp_store = MEMORY; {SCHEMA}"
    ))?;
    Ok(conn)
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS items (
        tenant TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS counts (
        tenant TEXT PRIMARY KEY, n INTEGER NOT NULL
    ) WITHOUT ROWID;";

/// The appender: takes every request waiting (up to `max_group_items` items), writes each
/// shard's part to that shard's log with one write per shard, then answers. Ends when every
/// sender is gone, having answered everything it took.
fn append_loop(shared: &Shared, mut queue: mpsc::Receiver<Job>) {
    let max_items = shared.options.max_group_items;
    while let Some(first) = queue.blocking_recv() {
        let mut held = first.batch.items;
        let mut jobs = vec![first];
        while held < max_items {
            match queue.try_recv() {
                Ok(job) => {
                    held += job.batch.items;
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        wait_for_room(shared);
        let outcomes = append(shared, &jobs);
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            // A requester that went away (client disconnected) needs no answer.
            let _ = job.done.send(outcome);
        }
    }
}

/// Appends wait while too much is pending (the folders are behind): that bounds memory,
/// and how long an acknowledged item waits to be counted (`2 × fold_after`, the
/// configured `worker_persist`).
fn wait_for_room(shared: &Shared) {
    let limit = shared.options.fold_after * 2;
    let behind = || {
        shared.pending_bytes.load(Ordering::SeqCst) > MAX_PENDING_BYTES
            || (!limit.is_zero()
                && open_shards(shared).iter().any(|shard| {
                    !shard.broken.load(Ordering::SeqCst)
                        && lock(&shard.log)
                            .since
                            .is_some_and(|since| since.elapsed() > limit)
                }))
    };
    while behind() {
        let mut wake = lock(&shared.wake);
        wake.nudged = true;
        shared.nudge.notify_all();
        drop(
            shared
                .folded
                .wait_timeout(wake, Duration::from_millis(20))
                .map_or_else(|p| p.into_inner().0, |(guard, _)| guard),
        );
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Writes `jobs` to their shards' logs; one outcome per job, in order.
fn append(shared: &Shared, jobs: &[Job]) -> Vec<Result<(), StoreError>> {
    let mut outcomes: Vec<Result<(), StoreError>> = jobs.iter().map(|_| Ok(())).collect();
    // Which jobs touch each shard, found without sorting the jobs.
    let mut touched: Vec<Vec<(usize, usize)>> =
        vec![Vec::new(); usize::from(shared.options.shards)];
    for (j, job) in jobs.iter().enumerate() {
        for (g, (shard, _)) in job.batch.groups.iter().enumerate() {
            if let Some(list) = touched.get_mut(usize::from(*shard)) {
                list.push((j, g));
            }
        }
    }
    let mut appended = Vec::new();
    for (id, users) in touched.iter().enumerate() {
        if users.is_empty() {
            continue;
        }
        let id = id as u16;
        let result = shared.shard(id).and_then(|shard| {
            append_shard(shared, &shard, jobs, users)?;
            Ok(shard)
        });
        match result {
            Ok(shard) => appended.push(shard),
            Err(err) => {
                let message = err.to_string();
                for (j, _) in users {
                    if outcomes[*j].is_ok() {
                        outcomes[*j] = Err(match &err {
                            StoreError::Busy { shard, reason } => StoreError::Busy {
                                shard: *shard,
                                reason: reason.clone(),
                            },
                            StoreError::Damaged(damage) => StoreError::Damaged(damage.clone()),
                            _ => StoreError::Commit {
                                shard: id,
                                message: message.clone(),
                            },
                        });
                    }
                }
            }
        }
    }
    if shared.options.fold_after.is_zero() {
        // Counted before acknowledged: the configuration allows no delay.
        for shard in &appended {
            if let Err(err) = fold(shared, shard) {
                let message = err.to_string();
                for (j, job) in jobs.iter().enumerate() {
                    if job.batch.groups.iter().any(|(s, _)| *s == shard.id) && outcomes[j].is_ok() {
                        outcomes[j] = Err(StoreError::Commit {
                            shard: shard.id,
                            message: message.clone(),
                        });
                    }
                }
            }
        }
    } else if appended
        .iter()
        .any(|shard| lock(&shard.log).pending.len() >= FOLD_BYTES)
    {
        shared.nudge_folders();
    }
    outcomes
}

fn append_shard(
    shared: &Shared,
    shard: &Shard,
    jobs: &[Job],
    users: &[(usize, usize)],
) -> Result<(), StoreError> {
    let mut log = lock(&shard.log);
    let log = &mut *log;
    let active = log.active;
    let before = log.pending.len();
    for (j, g) in users {
        let bytes = &jobs[*j].batch.groups[*g].1;
        log.writers[active].append(bytes);
        log.pending.extend_from_slice(bytes);
    }
    if let Err(err) = log.writers[active].commit(shared.options.fsync) {
        // Nothing of this group is acknowledged; the writer cut the file back already.
        log.pending.truncate(before);
        return Err(StoreError::Log {
            shard: shard.id,
            message: err.to_string(),
        });
    }
    let added = log.pending.len() - before;
    let pending = shared.pending_bytes.fetch_add(added, Ordering::SeqCst) + added;
    metrics::gauge!(PENDING_BYTES).set(pending as f64);
    log.since.get_or_insert_with(Instant::now);
    Ok(())
}

/// A folder: wakes every tick (or when nudged) and folds each shard that is due and not
/// being folded by another folder.
fn fold_loop(shared: &Shared, first: bool) {
    let fold_after = shared.options.fold_after;
    let tick = (fold_after / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
    let orphan_check = fold_after.clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut orphans_checked = Instant::now();
    loop {
        if first && orphans_checked.elapsed() >= orphan_check {
            shared.recover_orphans();
            orphans_checked = Instant::now();
        }
        {
            let wake = lock(&shared.wake);
            let (mut wake, _) = shared
                .nudge
                .wait_timeout_while(wake, tick, |w| !w.nudged)
                .unwrap_or_else(|p| p.into_inner());
            wake.nudged = false;
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let pressed = shared.pending_bytes.load(Ordering::SeqCst) > MAX_PENDING_BYTES / 2;
        for shard in open_shards(shared) {
            let due = {
                let log = lock(&shard.log);
                log.since.is_some_and(|since| since.elapsed() >= fold_after)
                    || log.pending.len() >= FOLD_BYTES
                    || (pressed && !log.pending.is_empty())
            };
            if !due {
                continue;
            }
            // Another folder has it: skip rather than wait.
            let Ok(db) = shard.db.try_lock() else {
                continue;
            };
            if let Err(err) = fold_locked(shared, &shard, db) {
                tracing::warn!(shard = shard.id, %err, "a fold failed; the shard re-opens from its logs");
            }
        }
        if first {
            publish_fold_lag(shared);
        }
    }
}

/// How long the oldest item waiting for a fold has waited, over every open shard: the
/// delay before it is counted. One folder publishes it, every tick.
fn publish_fold_lag(shared: &Shared) {
    let oldest = open_shards(shared)
        .iter()
        .filter_map(|shard| lock(&shard.log).since)
        .min();
    let lag = oldest.map_or(0.0, |since| since.elapsed().as_secs_f64());
    metrics::gauge!(FOLD_LAG).set(lag);
}

/// Folds `shard`'s pending items into its index (waiting for a fold in progress first).
fn fold(shared: &Shared, shard: &Shard) -> Result<(), StoreError> {
    fold_locked(shared, shard, lock(&shard.db))
}

fn fold_locked(
    shared: &Shared,
    shard: &Shard,
    mut db: MutexGuard<'_, Connection>,
) -> Result<(), StoreError> {
    if shard.broken.load(Ordering::SeqCst) {
        return Ok(());
    }
    // Switch appends to the other log, which the previous fold emptied: from here on the
    // items taken are exactly those in the old log.
    let (batch, old) = {
        let mut log = lock(&shard.log);
        if log.pending.is_empty() {
            return Ok(());
        }
        let old = log.active;
        log.active = 1 - old;
        log.since = None;
        (std::mem::take(&mut log.pending), old)
    };
    let result = fold_batch(shard, &mut db, &batch).and_then(|()| {
        // The items are committed: their log may be emptied.
        let path = shard.dir.join(LOG_FILES[old]);
        let writer = RecordWriter::open(&path, 0).map_err(|err| StoreError::Log {
            shard: shard.id,
            message: err.to_string(),
        })?;
        lock(&shard.log).writers[old] = writer;
        Ok(())
    });
    let pending = shared
        .pending_bytes
        .fetch_sub(batch.len(), Ordering::SeqCst)
        - batch.len();
    shared.folded.notify_all();
    metrics::gauge!(PENDING_BYTES).set(pending as f64);
    let status = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(FOLDS, "status" => status).increment(1);
    if result.is_err() {
        // Its items are still in the logs; the shard is re-opened (and folds them) on its
        // next request rather than appending to a log that may not have been emptied.
        shard.broken.store(true, Ordering::SeqCst);
    }
    result
}

fn fold_batch(shard: &Shard, db: &mut Connection, batch: &[u8]) -> Result<(), StoreError> {
    let mut items = Vec::new();
    decode_items(batch, &mut items).map_err(|err| StoreError::Log {
        shard: shard.id,
        message: err.to_string(),
    })?;
    let logged = items.len();
    sort_dedup_pairs(&mut items);
    commit(db, &items).map_err(|source| StoreError::Sqlite {
        shard: shard.id,
        source,
    })?;
    metrics::counter!(ITEMS_FOLDED).increment(logged as u64);
    Ok(())
}

fn sort_dedup_pairs(items: &mut Vec<(&str, &str)>) {
    items.sort_unstable();
    items.dedup();
}

/// One transaction: insert `items` (sorted, distinct) and add to each tenant's count the
/// rows that were new.
pub(crate) fn commit(conn: &mut Connection, items: &[(&str, &str)]) -> rusqlite::Result<()> {
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
            let tenant = items[start].0;
            let end = start + items[start..].partition_point(|item| item.0 == tenant);
            let mut fresh: i64 = 0;
            for (tenant, id) in &items[start..end] {
                fresh += insert.execute(params![tenant, id])? as i64;
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
        commit(&mut conn, &[("a", "1"), ("a", "2"), ("b", "1")]).unwrap();
        commit(&mut conn, &[("a", "2"), ("a", "3"), ("c", "1")]).unwrap();
        assert_eq!(count(&conn, "a"), 3);
        assert_eq!(count(&conn, "b"), 1);
        assert_eq!(count(&conn, "c"), 1);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 5);
    }
}
