//! The state-directory lock: one agent per state directory.
//!
//! Two agents on the same state directory would both rewrite `state.json`, both hand out addresses
//! from the same pool and both re-pin the datapath. The agent therefore takes an exclusive,
//! non-blocking `flock` on `<state_dir>/agent.lock` before it touches pins or state, and holds it
//! for its whole life (the kernel drops it when the process exits, also on `kill -9`, so a stale
//! lock file never blocks a restart). The holder's PID is written into the file for humans and for
//! the error message of the second agent.
use crate::error::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// An exclusive lock on a state directory, held until dropped.
#[derive(Debug)]
pub struct StateLock {
    path: PathBuf,
    _file: Flock<File>,
}

impl StateLock {
    /// Creates `state_dir` if needed and locks it. Fails at once (never waits) when another
    /// process holds the lock, with an error naming the directory and the holder's PID.
    pub fn acquire(state_dir: &Path) -> Result<StateLock> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("create state directory {}", state_dir.display()), e))?;
        let path = state_dir.join(LOCK_FILE);
        // Not truncated on open: the file may hold the current holder's PID.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("open lock file {}", path.display()), e))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let holder = holder_pid(&mut file)
                    .map_or_else(|| "PID unknown".to_string(), |p| format!("PID {p}"));
                return Err(Error::io(
                    format!(
                        "state directory {} is in use by another berth-agent ({holder}, lock {}); \
                         run one agent per state directory",
                        state_dir.display(),
                        path.display()
                    ),
                    std::io::Error::from(errno),
                ));
            }
            Err((_, errno)) => {
                return Err(Error::io(
                    format!("lock {}", path.display()),
                    std::io::Error::from(errno),
                ));
            }
        };
        let write_pid = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            writeln!(f, "{}", std::process::id())?;
            f.flush()
        };
        write_pid(&mut file)
            .map_err(|e| Error::io(format!("write PID to {}", path.display()), e))?;
        Ok(StateLock { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn holder_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_fails_naming_dir_and_holder_then_succeeds_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = StateLock::acquire(&state).expect("first lock");
        assert_eq!(first.path(), state.join(LOCK_FILE));
        let pid = std::process::id();
        assert_eq!(
            std::fs::read_to_string(first.path()).unwrap().trim(),
            pid.to_string()
        );
        // flock belongs to the open file description: a second open in the same process conflicts
        // just as another process would.
        let e = StateLock::acquire(&state).unwrap_err().to_string();
        assert!(e.contains(&state.display().to_string()), "{e}");
        assert!(e.contains(&format!("PID {pid}")), "{e}");
        assert!(e.contains("in use by another berth-agent"), "{e}");
        // The failed attempt did not clobber the holder's PID.
        assert_eq!(
            std::fs::read_to_string(first.path()).unwrap().trim(),
            pid.to_string()
        );
        drop(first);
        let again = StateLock::acquire(&state).expect("lock after release");
        drop(again);
    }

    #[test]
    fn stale_lock_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "999999\n").unwrap();
        let l = StateLock::acquire(dir.path()).expect("an unlocked file is not a lock");
        assert_eq!(
            std::fs::read_to_string(l.path()).unwrap().trim(),
            std::process::id().to_string()
        );
    }
}
