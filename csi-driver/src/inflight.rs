//! Per-volume operation guard: a second operation on a volume while one is in flight is refused
//! with ABORTED (the CO retries), as the CSI spec asks.
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use crate::{Error, Result};

/// Keys (volume IDs, snapshot names ...) with an operation in flight.
#[derive(Clone, Default)]
pub struct Inflight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Releases its key when dropped (also when the RPC future is cancelled).
pub struct InflightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Inflight {
    /// Takes `key`, or fails with ABORTED when it is taken.
    pub fn acquire(&self, key: &str) -> Result<InflightGuard> {
        let mut keys = self.keys.lock().expect("inflight lock");
        if !keys.insert(key.to_string()) {
            return Err(Error::Aborted(format!(
                "an operation on {key} is already in progress; retry later"
            )));
        }
        Ok(InflightGuard {
            keys: self.keys.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.keys.lock().expect("inflight lock").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_aborts_until_release() {
        let i = Inflight::default();
        let g = i.acquire("vol-1").unwrap();
        assert!(matches!(i.acquire("vol-1"), Err(Error::Aborted(_))));
        assert!(i.acquire("vol-2").is_ok());
        drop(g);
        assert!(i.acquire("vol-1").is_ok());
    }
}
