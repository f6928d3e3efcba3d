//! Data directories: each belongs to one process for that process's whole life.
//!
//! Two processes appending to one log number their records from the same place and lose
//! each other's acknowledged data, so a service takes an OS file lock (`flock`) on a `LOCK`
//! file inside its directory before it reads or writes anything there. The lock dies with
//! the process, `kill -9` included, so there is never a stale lock to clean up by hand. The
//! file holds the owner's pid, which a second process names in its error.
//!
//! The checks a start-up needs come first and say what is wrong in words an operator can
//! act on, each naming the setting once: the path is a file, the directory is not writable,
//! another process holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "LOCK";
const WRITE_PROBE: &str = ".write-probe";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{setting} {path}: exists and is not a directory")]
    NotADirectory { setting: String, path: PathBuf },
    #[error("{setting} {path}: permission denied: this process cannot write there ({source})")]
    Permission {
        setting: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{setting} {path}: {source}")]
    Io {
        setting: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{setting} {path} is in use by another process ({holder}); \
         a data directory belongs to one process at a time"
    )]
    Locked {
        setting: String,
        path: PathBuf,
        holder: String,
    },
}

/// Held for as long as the process owns the directory; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    path: PathBuf,
    _file: File,
}

impl DataDirLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `path` if needed, checks it is a writable directory, and locks it for this
/// process. `setting` is the name of the flag or key the path came from (`--data-dir`).
pub fn lock(path: &Path, setting: &str) -> Result<DataDirLock, DataDirError> {
    let fail = |source: std::io::Error| classify(setting, path, source);
    if path.exists() && !path.is_dir() {
        return Err(DataDirError::NotADirectory {
            setting: setting.to_string(),
            path: path.to_path_buf(),
        });
    }
    std::fs::create_dir_all(path).map_err(fail)?;
    probe_writable(path).map_err(fail)?;
    let file = match lock_file(&path.join(LOCK_FILE)).map_err(fail)? {
        Ok(file) => file,
        Err(holder) => {
            return Err(DataDirError::Locked {
                setting: setting.to_string(),
                path: path.to_path_buf(),
                holder,
            })
        }
    };
    Ok(DataDirLock {
        path: path.to_path_buf(),
        _file: file,
    })
}

/// Root ignores permission bits, so asking `access(2)` would say yes where a write still
/// fails (an immutable or read-only-mounted directory): create and remove a file instead.
fn probe_writable(path: &Path) -> std::io::Result<()> {
    let probe = path.join(WRITE_PROBE);
    File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// Takes an exclusive `flock` on `path` (created if missing) and writes this process's pid
/// into it. `Ok(Err(holder))` when another process holds it, `holder` naming its pid. The
/// lock lives as long as the returned file and dies with the process, `kill -9` included,
/// so it is never stale. For any file that must belong to one process at a time.
pub fn lock_file(path: &Path) -> std::io::Result<Result<File, String>> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(Err(holder(&mut file))),
        Err(TryLockError::Error(source)) => return Err(source),
    }
    let pid = std::process::id();
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{pid}")?;
    Ok(Ok(file))
}

fn holder(file: &mut File) -> String {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) if !text.trim().is_empty() => format!("pid {}", text.trim()),
        _ => "pid unknown".to_string(),
    }
}

fn classify(setting: &str, path: &Path, source: std::io::Error) -> DataDirError {
    let setting = setting.to_string();
    let path = path.to_path_buf();
    match source.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => DataDirError::Permission {
            setting,
            path,
            source,
        },
        ErrorKind::NotADirectory => DataDirError::NotADirectory { setting, path },
        _ => DataDirError::Io {
            setting,
            path,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path(), "--data-dir").unwrap();
        // flock belongs to an open file, so a second open in this process contends just as
        // another process would.
        let err = lock(dir.path(), "--data-dir").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, DataDirError::Locked { .. }), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("--data-dir"), "{message}");
        drop(first);
        lock(dir.path(), "--data-dir").expect("released with its owner");
    }

    #[test]
    fn a_missing_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let held = lock(&nested, "--data-dir").unwrap();
        assert!(nested.join(LOCK_FILE).is_file());
        assert_eq!(held.path(), nested);
    }

    #[test]
    fn a_file_in_its_place_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        std::fs::write(&file, b"x").unwrap();
        let err = lock(&file, "dataDir").unwrap_err();
        assert!(matches!(err, DataDirError::NotADirectory { .. }), "{err}");
        assert!(err.to_string().starts_with("dataDir "), "{err}");
    }

    /// An immutable directory refuses writes even to root, who ignores permission bits.
    #[test]
    fn an_unwritable_directory_says_permission() {
        let dir = tempfile::tempdir().unwrap();
        let locked_down = dir.path().join("ro");
        std::fs::create_dir(&locked_down).unwrap();
        let guard = ReadOnly::new(&locked_down);
        let err = lock(&locked_down, "--data-dir").unwrap_err();
        drop(guard);
        assert!(matches!(err, DataDirError::Permission { .. }), "{err}");
        assert!(err.to_string().contains("permission denied"), "{err}");
    }

    /// Makes a directory unwritable for anyone (mode 0555, plus the immutable flag where the
    /// test runs as root) and restores it on drop, so a failing test leaves nothing behind.
    struct ReadOnly(PathBuf, bool);

    impl ReadOnly {
        fn new(path: &Path) -> Self {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o555)).unwrap();
            let immutable = std::process::Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .is_ok_and(|status| status.success());
            ReadOnly(path.to_path_buf(), immutable)
        }
    }

    impl Drop for ReadOnly {
        fn drop(&mut self) {
            use std::os::unix::fs::PermissionsExt;
            if self.1 {
                let _ = std::process::Command::new("chattr")
                    .arg("-i")
                    .arg(&self.0)
                    .status();
            }
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        }
    }
}
