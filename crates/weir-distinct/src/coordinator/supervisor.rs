//! Local worker processes: `weir distinct worker` started as a separate OS process for each
//! worker on this host, its output appended to its own file under `worker_logs`, started
//! again with backoff whenever it exits, and stopped with SIGTERM (then SIGKILL after a
//! grace period) when the config drops it or the coordinator stops.
//!
//! A child must not outlive a coordinator killed with `kill -9`, or a restarted coordinator
//! would find its ports taken. On Linux each child asks the kernel for SIGKILL when its
//! parent dies (`PR_SET_PDEATHSIG`, set between fork and exec). SIGKILL rather than SIGTERM:
//! a worker acknowledges only what it has committed, and no one is left to pass on the
//! answers to requests still in flight, so there is nothing for a drain to save, and the
//! ports and shard locks are free at once. The kernel sends it when the *thread* that forked
//! the child ends, so children are forked by one thread of the coordinator's own that lives
//! as long as any child does. Children get their own process group, so a Ctrl-C in the
//! terminal reaches the coordinator only, which then stops them in order.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::metrics::WORKER_RESTARTS;
use super::pool::{Pool, Worker};
use super::routing::Backoff;
use crate::config::{Database, DistinctConfig, WorkerAddr};

/// The program a worker process runs: `exe` with `args` before the worker's own flags
/// (for the `weir` binary, `distinct worker`).
#[derive(Debug, Clone)]
pub struct WorkerProgram {
    pub exe: PathBuf,
    pub args: Vec<String>,
}

/// How a supervised process is started and stopped.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorOptions {
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// A process that ran this long before exiting starts its backoff afresh.
    pub stable_after: Duration,
    /// Between SIGTERM and SIGKILL: the worker drains in-flight requests for up to 10 s.
    pub stop_grace: Duration,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        SupervisorOptions {
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            stable_after: Duration::from_secs(30),
            stop_grace: Duration::from_secs(15),
        }
    }
}

/// The log file of `worker` under `dir`.
pub fn log_path(dir: &Path, worker: &WorkerAddr) -> PathBuf {
    let host: String = worker
        .host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("worker-{host}-{}.log", worker.port))
}

/// The worker's flags: its address and the store settings of `config`, given explicitly so
/// the child runs on exactly what the coordinator validated.
pub fn worker_args(config: &DistinctConfig, worker: &WorkerAddr) -> Vec<String> {
    let database = match &config.database {
        Database::Sqlite(path) => path.display().to_string(),
        Database::Postgres(url) => url.clone(),
    };
    vec![
        "--listen".into(),
        worker.listen_addr().to_string(),
        "--database".into(),
        database,
        "--worker-persist".into(),
        config.worker_persist.as_secs_f64().to_string(),
        "--fsync".into(),
        config.fsync.to_string(),
    ]
}

type SpawnReply = oneshot::Sender<std::io::Result<Child>>;

/// The thread that forks every child (see the module comment). It ends once every handle
/// to it is gone, which the supervisors hold until their child has exited.
#[derive(Clone)]
pub struct Spawner {
    requests: std::sync::mpsc::Sender<(Command, SpawnReply)>,
}

impl Spawner {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let (requests, incoming) = std::sync::mpsc::channel::<(Command, SpawnReply)>();
        std::thread::Builder::new()
            .name("distinct-spawner".into())
            .spawn(move || {
                // tokio's child reaper belongs to the runtime.
                let _entered = runtime.enter();
                while let Ok((mut command, reply)) = incoming.recv() {
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(Spawner { requests })
    }

    async fn spawn(&self, command: Command) -> std::io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((command, reply))
            .map_err(|_| std::io::Error::other("the spawner thread has stopped"))?;
        answer
            .await
            .map_err(|_| std::io::Error::other("the spawner thread has stopped"))?
    }
}

fn command(program: &WorkerProgram, args: &[String], log: &Path) -> std::io::Result<Command> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().create(true).append(true).open(log)?;
    let mut command = Command::new(&program.exe);
    command
        .args(&program.args)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        // The coordinator's metrics address is its own; a child would fail to bind it.
        .env_remove("WEIR_METRICS_ADDR")
        .process_group(0)
        .kill_on_drop(true);
    // The child runs on the flags above alone: the coordinator's environment was layered
    // into them already, and a key meant for the coordinator (its port) is not the child's.
    for key in crate::config::KEYS {
        command.env_remove(format!("WEIR_DISTINCT_{}", key.to_ascii_uppercase()));
    }
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid, _exit.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the request took effect: nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    Ok(command)
}

/// Runs `worker`'s process until `worker.stop` is cancelled, starting it again whenever it
/// exits. Returns once the last process has exited.
pub async fn supervise(
    spawner: Spawner,
    program: WorkerProgram,
    args: Vec<String>,
    log: PathBuf,
    pool: Arc<Pool>,
    worker: Arc<Worker>,
    options: SupervisorOptions,
) {
    let mut backoff = Backoff::new(options.first_backoff, options.max_backoff);
    loop {
        if worker.stop.is_cancelled() {
            return;
        }
        let spawned = match command(&program, &args, &log) {
            Ok(command) => spawner.spawn(command).await,
            Err(err) => Err(err),
        };
        let started = Instant::now();
        match spawned {
            Ok(mut child) => {
                worker.pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
                tracing::info!(worker = %worker.name, pid = child.id(), log = %log.display(), "worker process started");
                tokio::select! {
                    status = child.wait() => {
                        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                        worker.pid.store(0, Ordering::Relaxed);
                        if worker.set_alive(false, Some(format!("process exited: {status}"))) {
                            pool.publish_alive();
                        }
                        tracing::warn!(worker = %worker.name, %status, log = %log.display(), "worker process exited");
                    }
                    _ = worker.stop.cancelled() => {
                        terminate(&worker, &mut child, options.stop_grace).await;
                        worker.pid.store(0, Ordering::Relaxed);
                        return;
                    }
                }
            }
            Err(err) => {
                worker.set_alive(false, Some(format!("cannot start the process: {err}")));
                tracing::error!(worker = %worker.name, exe = %program.exe.display(), %err, "cannot start a worker process");
            }
        }
        if started.elapsed() >= options.stable_after {
            backoff.reset();
        }
        worker.restarts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(WORKER_RESTARTS).increment(1);
        tokio::select! {
            _ = worker.stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// SIGTERM (the worker finishes its in-flight requests and exits), then SIGKILL if it has
/// not exited within `grace`.
async fn terminate(worker: &Worker, child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child, not yet reaped (its id is still known).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => {
            tracing::info!(worker = %worker.name, status = ?status.ok(), "worker process stopped");
        }
        Err(_) => {
            tracing::warn!(worker = %worker.name, grace_ms = grace.as_millis() as u64, "worker did not stop after SIGTERM, killing it");
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    #[test]
    fn a_worker_gets_its_address_and_the_store_settings() {
        let config = RawConfig {
            database: "/data/d".into(),
            worker_persist: 0.5,
            ..RawConfig::default()
        }
        .validate("box1")
        .unwrap();
        let worker = WorkerAddr::parse("localhost:5003").unwrap();
        assert_eq!(
            worker_args(&config, &worker),
            [
                "--listen",
                "127.0.0.1:5003",
                "--database",
                "/data/d",
                "--worker-persist",
                "0.5",
                "--fsync",
                "false"
            ]
        );
        assert_eq!(
            log_path(Path::new("/l"), &WorkerAddr::parse("[::1]:5001").unwrap()),
            Path::new("/l/worker-__1-5001.log")
        );
    }
}
