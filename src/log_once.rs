//! Messages logged once per process (not once per handle: a server's every `select()` would
//! repeat them), keyed so messages that differ only in details share one entry.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

static WARNED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// Logs `msg` at warn level the first time it is seen in this process.
pub(crate) fn warn_once(msg: String) {
    log_once(log::Level::Warn, msg);
}

/// Logs `msg` at `level` the first time it is seen in this process (not once per handle, so
/// every `select()` of a long-running server does not repeat it).
pub(crate) fn log_once(level: log::Level, msg: String) {
    log_once_keyed(level, msg.clone(), || msg);
}

/// Logs `msg()` at `level` the first time `key` is seen in this process: messages that differ
/// only in details (a shape) share a key, so the set stays as small as the set of causes.
pub(crate) fn log_once_keyed(level: log::Level, key: String, msg: impl FnOnce() -> String) {
    let mut seen = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if seen.insert(key) {
        log::log!(level, "{}", msg());
    }
}
