//! On-disk cache of compiled kernel images (cubin/PTX bytes).
//!
//! Kernels are compiled at run time with NVRTC, which takes seconds per module; the cache
//! makes the second run of a process start instantly. The design goal is the opposite of the
//! usual failure modes of JIT caches: it must never hang and never hand back a damaged or
//! foreign image.
//!
//! * **Never hang.** There are no lock files and nothing waits on another process. Two
//!   processes that miss on the same entry both compile and both store; each store writes a
//!   private temporary file and renames it over the final name. `rename` is atomic, so a
//!   reader sees either the old complete file, the new complete file, or no file, and the
//!   last writer wins with an equally valid image. Non-regular files (a FIFO, say) at an
//!   entry's path are never opened, since opening a FIFO for reading blocks.
//! * **Never corrupt.** Every entry carries its full key text and a checksum of its payload.
//!   A file that fails any check (truncated, bit-flipped, different format version, or a
//!   file-name hash collision with another key) is reported as [`Lookup::Corrupt`], removed,
//!   and recompiled; it is never returned.
//! * **Degrade, don't fail.** If the directory is read-only (a read-only home, a sandbox),
//!   [`DiskCache::get_or_compile`] still returns the freshly compiled image together with the
//!   store error, so the caller can warn once and go on without caching.
//!
//! # Entry file format (version 2)
//!
//! One file per key, named `<file_stem>.bin` (see [`CacheKey::file_stem`]). All integers are
//! little-endian.
//!
//! | bytes             | content                                                       |
//! |-------------------|---------------------------------------------------------------|
//! | 26                | magic and format version line: `b"attention kernel cache v2\n"` |
//! | 8                 | `key_len`: length of the key text in bytes (u64)              |
//! | `key_len`         | key text, UTF-8, exactly [`CacheKey::text`]                   |
//! | 8                 | `payload_len`: length of the image in bytes (u64)             |
//! | 8                 | checksum: [`payload_checksum`] (CRC-32) of the payload, as u64 (u64)  |
//! | `payload_len`     | the compiled image                                            |
//!
//! The file must end exactly after the payload; trailing bytes are corruption too. The key
//! text is compared byte for byte with the key being looked up, so a collision of the 64-bit
//! file-name hash can only cost a recompile, never return another key's image.
//!
//! Temporary files are named `<file_stem>.tmp-<pid>-<sequence>-<nanos>` (pid and sequence
//! in decimal, nanos in lowercase hex): file stems contain no `.`, so `.tmp-` never occurs in
//! an entry name and `.bin` never ends a temporary name. Temporary files left by a crashed
//! process are removed by [`DiskCache::open`] once they are more than an hour old (younger
//! ones may belong to a store in progress). Only names of exactly that form are swept:
//! `ATTN_CACHE_DIR` may point at a directory shared with other files, and a user's
//! `report.tmp-draft.txt` is not ours to delete.
//!
//! An entry's path is a name the cache owns, so whatever occupies it and is not a valid
//! entry (a directory, a FIFO, a symlink) is removed and rebuilt; a symlink is removed as a
//! link, never followed.

use std::fmt::{self, Display};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// First line of every entry file. Bump the version when the layout changes: older files
/// are then reported as corrupt ("unsupported format version") and recompiled.
const MAGIC: &[u8] = b"attention kernel cache v2\n";
/// The part of [`MAGIC`] before the version number, to tell "other version" from "garbage".
const MAGIC_PREFIX: &[u8] = b"attention kernel cache v";
/// Suffix of entry files.
const ENTRY_SUFFIX: &str = ".bin";
/// Marker of temporary files, followed by `<pid>-<sequence>-<nanos>`.
const TEMP_MARKER: &str = ".tmp-";
/// Temporary files older than this are assumed abandoned by a crashed process.
const STALE_TEMP_AGE: Duration = Duration::from_secs(60 * 60);
/// Files larger than this are not read: no kernel image is near this size, and reading a
/// multi-gigabyte stray file into memory would be worse than recompiling.
const MAX_ENTRY_BYTES: u64 = 1 << 30;
/// Longest module-name prefix kept in a file name, so names stay well under `NAME_MAX`.
const MAX_STEM_NAME: usize = 48;
/// Key field whose value, if present, prefixes the file name (for humans listing the dir).
const MODULE_FIELD: &str = "module";

/// The payload checksum: CRC-32 (IEEE) from `crc32fast`, which uses the CPU's carry-less
/// multiply (PCLMULQDQ, ARMv8 CRC) where present, widened to the header's u64 field. Format
/// version 1 used [`fnv1a64`], one byte at a time; its entries now read as another version
/// and are rebuilt.
pub(crate) fn payload_checksum(payload: &[u8]) -> u64 {
    u64::from(crc32fast::hash(payload))
}

/// 64-bit FNV-1a hash of `bytes`.
///
/// Used for entry file names and by callers to hash kernel sources into
/// a [`CacheKey`]. It is not cryptographic: the cache defends against collisions by storing
/// and comparing the full key text, and against corruption, not against an attacker who can
/// write to the cache directory (such an attacker could write any image anyway).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// Everything that determines a compiled image: an order-preserving list of `(name, value)`
/// fields, e.g. the source hash, target architecture, NVRTC version, crate version and
/// compile options.
///
/// Anything left out of the key is a way to get a stale image, so when in doubt, add it.
/// A field named `module` (see [`CacheKey::module`]) also names the file, for humans.
///
/// An illustration (the type is crate-private, so this is not a doctest):
///
/// ```text
/// let key = CacheKey::new()
///     .with("module", "flash_fwd")
///     .with("source", format!("{:016x}", fnv1a64(src.as_bytes())))
///     .with("arch", "sm_90")
///     .with("nvrtc", "13.0")
///     .with("crate", env!("CARGO_PKG_VERSION"))
///     .with("options", "-O3 --use_fast_math");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheKey {
    fields: Vec<(String, String)>,
}

impl CacheKey {
    /// An empty key.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Shorthand for `CacheKey::new().with("module", name)`: a key whose file name starts
    /// with `name`.
    pub(crate) fn module(name: &str) -> Self {
        Self::new().with(MODULE_FIELD, name)
    }

    /// Appends a field. Order matters: the same fields in another order are another key,
    /// which is fine as long as each call site builds its keys the same way.
    pub(crate) fn with(mut self, name: &str, value: impl Display) -> Self {
        self.fields.push((name.to_owned(), value.to_string()));
        self
    }

    /// Canonical text of the key, stored inside each entry and compared on lookup.
    ///
    /// One line `name=value` per field. Backslash, newline and carriage return are escaped
    /// in names and values, and `=` in names, so that the text is injective: no choice of
    /// values (say, compile options containing a newline) can make two different keys print
    /// the same text.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.fields {
            escape_into(&mut out, name, true);
            out.push('=');
            escape_into(&mut out, value, false);
            out.push('\n');
        }
        out
    }

    /// File name of the entry without the `.bin` suffix: `<module>-<hash>` where `<module>`
    /// is the sanitized value of the first `module` field (omitted, with its dash, if there
    /// is none) and `<hash>` is 16 lowercase hex digits of [`fnv1a64`] of [`CacheKey::text`].
    ///
    /// The module name is reduced to `[A-Za-z0-9_-]` (other characters become `_`) and cut
    /// to 48 characters, so it can neither escape the directory nor contain a `.`, which
    /// keeps entry names and temporary names (`.tmp-`) distinguishable.
    pub(crate) fn file_stem(&self) -> String {
        let hash = fnv1a64(self.text().as_bytes());
        let module = self
            .fields
            .iter()
            .find(|(name, _)| name == MODULE_FIELD)
            .map(|(_, value)| sanitize_name(value))
            .filter(|name| !name.is_empty());
        match module {
            Some(name) => format!("{name}-{hash:016x}"),
            None => format!("{hash:016x}"),
        }
    }
}

impl Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, for log messages: fields separated by "; " instead of newlines.
        for (i, (name, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

/// Appends `s` to `out` with the escapes described in [`CacheKey::text`].
fn escape_into(out: &mut String, s: &str, is_name: bool) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '=' if is_name => out.push_str("\\="),
            c => out.push(c),
        }
    }
}

/// Reduces a module name to a safe file-name fragment (see [`CacheKey::file_stem`]).
fn sanitize_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_STEM_NAME)
        .collect()
}

/// Result of [`DiskCache::lookup`].
#[derive(Debug)]
pub(crate) enum Lookup {
    /// A valid entry for exactly this key; the payload bytes.
    Hit(Vec<u8>),
    /// No usable entry: none exists, or it could not be read (e.g. permissions). Nothing
    /// was removed.
    Miss,
    /// An entry existed under this key's file name but failed validation. It was removed if
    /// the directory allows (a debug log says whether), so that the next store replaces it.
    Corrupt {
        /// What was wrong, for a log message.
        reason: String,
    },
}

/// How [`DiskCache::get_or_compile`] obtained the image.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Read from a valid cache entry; nothing was compiled.
    Hit,
    /// Compiled now.
    Compiled {
        /// Where the image was stored, or why storing failed. A failure does not fail the
        /// call: the caller should warn (once) that compiles are not being cached.
        stored: Result<PathBuf, io::Error>,
        /// What was wrong with the corrupt entry that the fresh image replaced. Only `Some`
        /// when `stored` is `Ok`, since callers report it as a rebuilt entry: if the store
        /// failed (a read-only cache), nothing was rebuilt and the truth is "compiled; not
        /// cached" (the `stored` error); the corrupt entry is then in the debug log.
        replaced_corrupt: Option<String>,
    },
}

/// One entry file, for a diagnostics printout ([`DiskCache::entries`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntryInfo {
    /// Path of the entry file.
    pub path: PathBuf,
    /// Size of the file in bytes (header included).
    pub bytes: u64,
    /// Whether the file parses, its checksum matches, and its name matches its key text.
    pub valid: bool,
    /// The stored key text, if the header could be parsed.
    pub key_text: Option<String>,
    /// Why the entry is invalid (`None` when `valid`).
    pub problem: Option<String>,
}

/// A directory of compiled kernel images. See the module documentation for the guarantees
/// and the file format.
///
/// Cheap to share: all methods take `&self` and are safe to call from many threads and many
/// processes at once.
#[derive(Clone, Debug)]
pub(crate) struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Opens the cache in `dir`, creating the directory (and its parents) if needed.
    ///
    /// Fails only if the directory cannot be created or is not a directory; a directory that
    /// exists but is read-only opens fine (lookups work, stores report errors). Also removes
    /// temporary files abandoned more than an hour ago by crashed processes, ignoring errors.
    pub(crate) fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        if !fs::metadata(&dir)?.is_dir() {
            return Err(io::Error::other(format!(
                "cache path {} is not a directory",
                dir.display()
            )));
        }
        let cache = Self { dir };
        cache.remove_stale_temps(STALE_TEMP_AGE);
        Ok(cache)
    }

    /// The cache directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the entry file for `key` (which may or may not exist).
    pub(crate) fn entry_path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}{ENTRY_SUFFIX}", key.file_stem()))
    }

    /// Looks `key` up. Never blocks on other processes and never returns bytes that were not
    /// stored under exactly this key text with a matching checksum.
    pub(crate) fn lookup(&self, key: &CacheKey) -> Lookup {
        let path = self.entry_path(key);
        let (bytes, identity) = match read_entry_file(&path) {
            Ok(Some(read)) => read,
            Ok(None) => return Lookup::Miss,
            Err(ReadError::Unreadable(e)) => {
                // Not our business to delete what we cannot read (it may be fine for
                // another user); just compile. The store will likely fail and say why.
                log::debug!("kernel cache: cannot read {}: {e}", path.display());
                return Lookup::Miss;
            }
            Err(ReadError::Invalid(reason)) => {
                log_removal(&path, &reason, remove_corrupt(&path, None));
                return Lookup::Corrupt { reason };
            }
        };
        let expected = key.text();
        let result = parse_entry(&bytes).and_then(|entry| {
            if entry.key_text != expected.as_bytes() {
                Err(format!(
                    "key mismatch (file-name hash collision or foreign file): stored key {:?}",
                    String::from_utf8_lossy(entry.key_text)
                ))
            } else {
                Ok(entry.payload.len())
            }
        });
        match result {
            Ok(payload_len) => {
                // Reuse the buffer: drop the header in place instead of copying the payload.
                let mut bytes = bytes;
                bytes.drain(..bytes.len() - payload_len);
                Lookup::Hit(bytes)
            }
            Err(reason) => {
                log_removal(&path, &reason, remove_corrupt(&path, Some(identity)));
                Lookup::Corrupt { reason }
            }
        }
    }

    /// Stores `image` under `key` and returns the entry's path.
    ///
    /// Atomic: the entry is written to a uniquely named temporary file in the same directory
    /// (so the rename cannot cross file systems), flushed to disk with `fsync`, and renamed
    /// over the final name. Readers therefore never see a partial file under the final name,
    /// even if this process is killed mid-write; concurrent stores of the same key each
    /// rename a complete file and the last one wins. On error the temporary file is removed.
    pub(crate) fn store(&self, key: &CacheKey, image: &[u8]) -> io::Result<PathBuf> {
        let stem = key.file_stem();
        let final_path = self.dir.join(format!("{stem}{ENTRY_SUFFIX}"));
        let bytes = encode_entry(&key.text(), image);

        let (temp_path, mut file) = self.create_temp(&stem)?;
        let written = file
            .write_all(&bytes)
            // Data must be on disk before the rename makes it visible, or a crash could
            // leave a complete-looking name pointing at zeros or a short file.
            .and_then(|()| file.sync_all());
        drop(file);
        let renamed = written.and_then(|()| fs::rename(&temp_path, &final_path));
        if let Err(e) = renamed {
            let _ = fs::remove_file(&temp_path);
            return Err(e);
        }
        // Persist the rename itself. Best effort: some file systems refuse to fsync a
        // directory, and the entry is already complete and visible either way.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(final_path)
    }

    /// Returns the image for `key`, from the cache or by calling `compile` and storing the
    /// result.
    ///
    /// Only `compile`'s error fails the call. If storing fails (read-only directory, full
    /// disk) the image is still returned, with the error in [`Outcome::Compiled::stored`].
    /// Never waits for other processes: if several miss at once, each compiles.
    pub(crate) fn get_or_compile<E>(
        &self,
        key: &CacheKey,
        compile: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Vec<u8>, Outcome), E> {
        let corrupt = match self.lookup(key) {
            Lookup::Hit(image) => return Ok((image, Outcome::Hit)),
            Lookup::Miss => None,
            Lookup::Corrupt { reason } => Some(reason),
        };
        let image = compile()?;
        let stored = self.store(key, &image);
        // Only a stored image replaced anything; otherwise the corrupt entry (if the
        // directory kept it) is still there and the caller's store-error warning is the truth.
        let replaced_corrupt = match (&stored, corrupt) {
            (Ok(_), corrupt) => corrupt,
            (Err(e), Some(reason)) => {
                log::debug!(
                    "kernel cache: compiled {key}; not cached: {e} (its entry was corrupt: {reason})"
                );
                None
            }
            (Err(_), None) => None,
        };
        Ok((
            image,
            Outcome::Compiled {
                stored,
                replaced_corrupt,
            },
        ))
    }

    /// Every entry file (`*.bin`) in the directory, sorted by path, with its size and
    /// whether it is valid. Temporary files and other files are ignored. Reads every entry
    /// in full to verify checksums, so this is for diagnostics, not for hot paths.
    pub(crate) fn entries(&self) -> io::Result<Vec<EntryInfo>> {
        let mut out = Vec::new();
        for dirent in fs::read_dir(&self.dir)? {
            let dirent = dirent?;
            let path = dirent.path();
            let name = dirent.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(ENTRY_SUFFIX) else {
                continue;
            };
            if name.contains(TEMP_MARKER) {
                continue;
            }
            // Follow symlinks, but skip anything that is not a regular file in the end.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let (key_text, problem) = match read_entry_file(&path) {
                Ok(None) => continue, // removed since read_dir
                Err(ReadError::Unreadable(e)) => (None, Some(format!("unreadable: {e}"))),
                Err(ReadError::Invalid(reason)) => (None, Some(reason)),
                Ok(Some((bytes, _))) => match parse_entry(&bytes) {
                    Err(reason) => (None, Some(reason)),
                    Ok(entry) => {
                        let text = String::from_utf8_lossy(entry.key_text).into_owned();
                        let hash = format!("{:016x}", fnv1a64(entry.key_text));
                        // The name must be the one this key would be stored under, else a
                        // lookup of that key would report it as a collision.
                        let problem = (!stem.ends_with(&hash))
                            .then(|| format!("file name does not match key hash {hash}"));
                        (Some(text), problem)
                    }
                },
            };
            out.push(EntryInfo {
                path,
                bytes: meta.len(),
                valid: problem.is_none(),
                key_text,
                problem,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Removes temporary files older than `max_age`, ignoring every error. They can only be
    /// left by a process that died between creating and renaming them; younger ones may
    /// belong to a store in progress in another process, so they are left alone. Only names
    /// [`is_temp_name`] recognises are candidates: the directory may hold other people's
    /// files.
    fn remove_stale_temps(&self, max_age: Duration) {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for dirent in dir.flatten() {
            let name = dirent.file_name();
            if !name.to_str().is_some_and(is_temp_name) {
                continue;
            }
            let Ok(meta) = dirent.metadata() else {
                continue;
            };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > max_age);
            if meta.is_file() && old {
                let _ = fs::remove_file(dirent.path());
            }
        }
    }

    /// Creates a new temporary file for `stem`. The name combines the process id (distinct
    /// between live processes), a process-wide counter (distinct between threads and
    /// calls), and the clock in nanoseconds (distinct between processes in different pid
    /// namespaces sharing the directory, e.g. containers). `create_new` guarantees we never
    /// write into someone else's file even if all three coincide; then we just try again.
    fn create_temp(&self, stem: &str) -> io::Result<(PathBuf, File)> {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let mut last_err = None;
        for _ in 0..16 {
            let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let path = self
                .dir
                .join(format!("{stem}{TEMP_MARKER}{pid}-{seq}-{nanos:x}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((path, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no temp name")))
    }
}

/// Whether `stem` has the form [`CacheKey::file_stem`] produces: 16 lowercase hex digits,
/// optionally after `<module>-` where `<module>` is 1 to 48 of `[A-Za-z0-9_-]`.
fn is_entry_stem(stem: &str) -> bool {
    const HASH_LEN: usize = 16;
    let bytes = stem.as_bytes();
    let Some(split) = bytes.len().checked_sub(HASH_LEN) else {
        return false;
    };
    let (prefix, hash) = bytes.split_at(split);
    let hash_ok = hash
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let prefix_ok = match prefix.split_last() {
        None => true,
        Some((b'-', module)) => {
            (1..=MAX_STEM_NAME).contains(&module.len())
                && module
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }
        Some(_) => false,
    };
    hash_ok && prefix_ok
}

/// Whether `name` is exactly what [`DiskCache::create_temp`] makes:
/// `<file_stem>.tmp-<pid>-<sequence>-<nanos>`, pid and sequence decimal, nanos lowercase hex.
/// The stale-temp sweep deletes what this accepts, so it must accept nothing else.
fn is_temp_name(name: &str) -> bool {
    let Some((stem, fields)) = name.split_once(TEMP_MARKER) else {
        return false;
    };
    let digits = |s: &str, hex: bool| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (hex && (b'a'..=b'f').contains(&b)))
    };
    let mut parts = fields.split('-');
    let (Some(pid), Some(seq), Some(nanos), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    is_entry_stem(stem) && digits(pid, false) && digits(seq, false) && digits(nanos, true)
}

/// Serializes an entry in the format described in the module documentation.
fn encode_entry(key_text: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 24 + key_text.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(key_text.len() as u64).to_le_bytes());
    out.extend_from_slice(key_text.as_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload_checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A parsed, checksum-verified entry, borrowing from the file's bytes.
struct Entry<'a> {
    key_text: &'a [u8],
    payload: &'a [u8],
}

/// Parses and verifies an entry; the error is a human-readable reason.
fn parse_entry(bytes: &[u8]) -> Result<Entry<'_>, String> {
    let mut rest = bytes;
    if !rest.starts_with(MAGIC) {
        return Err(if rest.len() < MAGIC.len() && MAGIC.starts_with(rest) {
            format!("truncated in the magic line ({} bytes)", rest.len())
        } else if rest.starts_with(MAGIC_PREFIX) {
            let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
            format!(
                "unsupported format version {:?}",
                String::from_utf8_lossy(line)
            )
        } else {
            "bad magic (not an entry file)".to_owned()
        });
    }
    rest = &rest[MAGIC.len()..];
    let key_len = take_u64(&mut rest, "key length")?;
    let key_text = take_bytes(&mut rest, key_len, "key text")?;
    let payload_len = take_u64(&mut rest, "payload length")?;
    let checksum = take_u64(&mut rest, "checksum")?;
    if (rest.len() as u64) != payload_len {
        return Err(format!(
            "payload length mismatch: header says {payload_len} bytes, file has {}",
            rest.len()
        ));
    }
    let actual = payload_checksum(rest);
    if actual != checksum {
        return Err(format!(
            "checksum mismatch: stored {checksum:016x}, computed {actual:016x}"
        ));
    }
    Ok(Entry {
        key_text,
        payload: rest,
    })
}

/// Splits a little-endian u64 off the front of `rest`.
fn take_u64(rest: &mut &[u8], what: &str) -> Result<u64, String> {
    let bytes = take_bytes(rest, 8, what)?;
    let mut array = [0u8; 8];
    array.copy_from_slice(bytes);
    Ok(u64::from_le_bytes(array))
}

/// Splits `len` bytes off the front of `rest`, or explains that the file is too short.
fn take_bytes<'a>(rest: &mut &'a [u8], len: u64, what: &str) -> Result<&'a [u8], String> {
    match usize::try_from(len) {
        Ok(len) if len <= rest.len() => {
            let (head, tail) = rest.split_at(len);
            *rest = tail;
            Ok(head)
        }
        _ => Err(format!(
            "truncated in the {what}: needs {len} bytes, {} left",
            rest.len()
        )),
    }
}

/// Why an entry file could not be read.
enum ReadError {
    /// An I/O error other than "not found": we cannot tell whether the file is bad.
    Unreadable(io::Error),
    /// The file is definitely not a usable entry (not a regular file, absurdly large).
    Invalid(String),
}

/// Identity of the file we read, so that removing a corrupt entry does not delete a valid
/// one that another process renamed into place in the meantime.
type FileIdentity = Option<(u64, u64)>;

/// Reads an entry file in full. `Ok(None)` if it does not exist.
fn read_entry_file(path: &Path) -> Result<Option<(Vec<u8>, FileIdentity)>, ReadError> {
    // Check the type *before* opening: opening a FIFO for reading would block until a
    // writer appears, i.e. possibly forever.
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Unreadable(e)),
    };
    if !meta.is_file() {
        return Err(ReadError::Invalid("not a regular file".to_owned()));
    }
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Unreadable(e)),
    };
    // Use the open handle's metadata from here on: the path may have been replaced.
    let meta = file.metadata().map_err(ReadError::Unreadable)?;
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(ReadError::Invalid(format!(
            "implausibly large ({} bytes)",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded read: a file growing under us cannot make us read without end.
    Read::by_ref(&mut file)
        .take(MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Unreadable)?;
    Ok(Some((bytes, identity(&meta))))
}

#[cfg(unix)]
fn identity(meta: &fs::Metadata) -> FileIdentity {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_meta: &fs::Metadata) -> FileIdentity {
    None
}

/// Removes a corrupt entry. An error (a read-only directory) just keeps it: every lookup
/// will report it and compile, and the failing store tells the caller. If we know which file
/// we read (`read`), only remove the path if it still is that file: a concurrent store may
/// have renamed a valid entry over it, which deleting would needlessly cost another process a
/// compile. (A small window between the check and the removal remains; losing it costs a
/// recompile, nothing worse.) `Ok(false)` means it was left alone for that reason.
///
/// A directory at the path is removed with its contents: the entry name is the cache's, so
/// nothing there can be anyone else's, and left in place it would fail every store forever.
/// A symlink is removed as a link, whatever it points to.
fn remove_corrupt(path: &Path, read: Option<FileIdentity>) -> io::Result<bool> {
    if let Some(Some(read)) = read {
        match fs::metadata(path) {
            Ok(now) if identity(&now) == Some(read) => {}
            _ => return Ok(false),
        }
    }
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        _ => fs::remove_file(path),
    };
    match removed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Says at debug level what became of a corrupt entry, so that the log never claims a
/// removal that a read-only directory refused.
fn log_removal(path: &Path, reason: &str, removed: io::Result<bool>) {
    let what = match removed {
        Ok(true) => "removed".to_owned(),
        Ok(false) => "already replaced or gone".to_owned(),
        Err(e) => format!("kept, cannot remove it: {e}"),
    };
    log::debug!(
        "kernel cache: corrupt entry {} ({reason}): {what}",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::Instant;

    /// A unique scratch directory under the system temp dir, removed (with permissions
    /// restored first) when dropped.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let path = std::env::temp_dir().join(format!(
                "attention-cache-test-{tag}-{}-{}-{nanos:x}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            TestDir(path)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn key(n: u32) -> CacheKey {
        CacheKey::module("flash_fwd")
            .with(
                "source",
                format!("{:016x}", fnv1a64(format!("src {n}").as_bytes())),
            )
            .with("arch", "sm_90")
            .with("nvrtc", "13.0")
            .with("crate", "0.1.0")
            .with("options", "-O3 --use_fast_math")
    }

    fn image(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.contains(TEMP_MARKER))
            .collect()
    }

    fn assert_valid_single_entry(cache: &DiskCache) {
        let entries = cache.entries().unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(entries[0].valid, "{entries:?}");
    }

    #[test]
    fn fnv1a64_known_values() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn key_text_and_file_stem() {
        let k = CacheKey::module("flash fwd/../x").with("arch", "sm_90");
        assert_eq!(k.text(), "module=flash fwd/../x\narch=sm_90\n");
        let stem = k.file_stem();
        let hash = format!("{:016x}", fnv1a64(k.text().as_bytes()));
        assert_eq!(stem, format!("flash_fwd____x-{hash}"));
        // No module field: just the hash.
        let k = CacheKey::new().with("arch", "sm_90");
        assert_eq!(k.file_stem().len(), 16);
        assert!(k.file_stem().chars().all(|c| c.is_ascii_hexdigit()));
        // Long module names are cut, so file names stay short.
        let k = CacheKey::module(&"m".repeat(500));
        assert_eq!(k.file_stem().len(), MAX_STEM_NAME + 1 + 16);
    }

    #[test]
    fn key_text_is_injective() {
        let pairs = [
            (
                CacheKey::new().with("a", "b=c"),
                CacheKey::new().with("a=b", "c"),
            ),
            (
                CacheKey::new().with("opt", "x\nsource=1"),
                CacheKey::new().with("opt", "x").with("source", "1"),
            ),
            (
                CacheKey::new().with("a", "x\\n"),
                CacheKey::new().with("a", "x\n"),
            ),
            (
                CacheKey::new().with("a", 1).with("b", 2),
                CacheKey::new().with("b", 2).with("a", 1),
            ),
        ];
        for (x, y) in pairs {
            assert_ne!(x, y);
            assert_ne!(x.text(), y.text(), "{x:?} vs {y:?}");
            assert_ne!(x.file_stem(), y.file_stem());
        }
    }

    #[test]
    fn store_then_lookup_hits_and_other_key_misses() {
        let dir = TestDir::new("hit");
        let cache = DiskCache::open(dir.0.join("nested/deeper")).unwrap();
        assert!(cache.dir().is_dir());
        let img = image(4096, 7);
        let path = cache.store(&key(1), &img).unwrap();
        assert_eq!(path, cache.entry_path(&key(1)));
        assert!(path.to_str().unwrap().ends_with(".bin"));
        match cache.lookup(&key(1)) {
            Lookup::Hit(bytes) => assert_eq!(bytes, img),
            other => panic!("expected hit, got {other:?}"),
        }
        assert!(matches!(cache.lookup(&key(2)), Lookup::Miss));
        // Empty images round-trip too.
        cache.store(&key(3), &[]).unwrap();
        assert!(matches!(cache.lookup(&key(3)), Lookup::Hit(b) if b.is_empty()));
        // Storing again replaces.
        let img2 = image(100, 9);
        cache.store(&key(1), &img2).unwrap();
        assert!(matches!(cache.lookup(&key(1)), Lookup::Hit(b) if b == img2));
        assert!(temp_files(cache.dir()).is_empty());
    }

    #[test]
    fn get_or_compile_compiles_once_then_hits() {
        let dir = TestDir::new("goc");
        let cache = DiskCache::open(&dir.0).unwrap();
        let img = image(1000, 1);
        let (bytes, outcome) = cache
            .get_or_compile(&key(1), || Ok::<_, String>(img.clone()))
            .unwrap();
        assert_eq!(bytes, img);
        match outcome {
            Outcome::Compiled {
                stored: Ok(path),
                replaced_corrupt: None,
            } => {
                assert_eq!(path, cache.entry_path(&key(1)));
            }
            other => panic!("expected a stored compile, got {other:?}"),
        }
        let (bytes, outcome) = cache
            .get_or_compile(&key(1), || -> Result<Vec<u8>, String> {
                panic!("must hit")
            })
            .unwrap();
        assert_eq!(bytes, img);
        assert!(matches!(outcome, Outcome::Hit));
        // A compile error is passed through and nothing is stored.
        let err = cache
            .get_or_compile(&key(2), || Err::<Vec<u8>, _>("nvrtc said no"))
            .unwrap_err();
        assert_eq!(err, "nvrtc said no");
        assert!(matches!(cache.lookup(&key(2)), Lookup::Miss));
    }

    #[test]
    fn truncated_entries_are_corrupt_removed_and_recompiled() {
        let dir = TestDir::new("trunc");
        let cache = DiskCache::open(&dir.0).unwrap();
        let k = key(1);
        let img = image(1000, 3);
        let path = cache.store(&k, &img).unwrap();
        let full = fs::metadata(&path).unwrap().len();
        let header = (MAGIC.len() + 8 + k.text().len() + 16) as u64;
        assert_eq!(full, header + img.len() as u64);
        let lengths = [
            0,
            1,
            MAGIC.len() as u64 - 1,
            MAGIC.len() as u64,
            MAGIC.len() as u64 + 4,
            MAGIC.len() as u64 + 8 + 5,
            header - 12,
            header - 1,
            header,
            header + 500,
            full - 1,
        ];
        for len in lengths {
            // Via lookup: reported corrupt and removed.
            cache.store(&k, &img).unwrap();
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
            match cache.lookup(&k) {
                Lookup::Corrupt { reason } => assert!(!reason.is_empty()),
                other => panic!("length {len}: expected corrupt, got {other:?}"),
            }
            assert!(!path.exists(), "length {len}: corrupt file not removed");
            assert!(matches!(cache.lookup(&k), Lookup::Miss));

            // Via get_or_compile: recompiled, stored, and then hit.
            cache.store(&k, &img).unwrap();
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
            let (bytes, outcome) = cache
                .get_or_compile(&k, || Ok::<_, ()>(img.clone()))
                .unwrap();
            assert_eq!(bytes, img);
            match outcome {
                Outcome::Compiled {
                    stored: Ok(_),
                    replaced_corrupt: Some(reason),
                } => {
                    assert!(!reason.is_empty());
                }
                other => panic!("length {len}: expected recompile, got {other:?}"),
            }
            assert!(matches!(cache.lookup(&k), Lookup::Hit(b) if b == img));
        }
        // Trailing garbage is corruption too.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"junk").unwrap();
        drop(f);
        assert!(matches!(cache.lookup(&k), Lookup::Corrupt { .. }));
        assert!(!path.exists());
    }

    #[test]
    fn flipped_bytes_are_corrupt() {
        let dir = TestDir::new("flip");
        let cache = DiskCache::open(&dir.0).unwrap();
        let k = key(1);
        let img = image(2000, 5);
        let path = cache.store(&k, &img).unwrap();
        let good = fs::read(&path).unwrap();
        let payload_start = good.len() - img.len();
        // Payload (checksum), checksum field, payload length, key text, magic.
        let spots = [
            (payload_start + 1234, "checksum"),
            (good.len() - 1, "checksum"),
            (payload_start - 3, "checksum"),
            (payload_start - 12, "length"),
            (MAGIC.len() + 8 + 2, "key mismatch"),
            (0, "magic"),
        ];
        for (at, expect) in spots {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            match cache.lookup(&k) {
                Lookup::Corrupt { reason } => {
                    assert!(reason.contains(expect), "byte {at}: {reason}");
                }
                other => panic!("byte {at}: expected corrupt, got {other:?}"),
            }
            assert!(!path.exists());
        }
        // Another format version is named as such.
        let mut other_version = good.clone();
        other_version[MAGIC.len() - 2] = b'7';
        fs::write(&path, &other_version).unwrap();
        match cache.lookup(&k) {
            Lookup::Corrupt { reason } => assert!(reason.contains("version"), "{reason}"),
            other => panic!("expected corrupt, got {other:?}"),
        }
    }

    #[test]
    fn key_collision_never_returns_wrong_bytes() {
        let dir = TestDir::new("collide");
        let cache = DiskCache::open(&dir.0).unwrap();
        let (a, b) = (key(1), key(2));
        let (img_a, img_b) = (image(300, 1), image(300, 2));
        let path_a = cache.store(&a, &img_a).unwrap();
        let path_b = cache.store(&b, &img_b).unwrap();
        // Simulate a file-name hash collision: b's valid entry under a's name.
        fs::rename(&path_b, &path_a).unwrap();
        match cache.lookup(&a) {
            Lookup::Corrupt { reason } => assert!(reason.contains("key mismatch"), "{reason}"),
            Lookup::Miss => {}
            Lookup::Hit(bytes) => panic!(
                "returned another key's bytes (equal to b: {})",
                bytes == img_b
            ),
        }
        let (bytes, outcome) = cache
            .get_or_compile(&a, || Ok::<_, ()>(img_a.clone()))
            .unwrap();
        assert_eq!(bytes, img_a);
        assert!(matches!(outcome, Outcome::Compiled { stored: Ok(_), .. }));
        assert!(matches!(cache.lookup(&a), Lookup::Hit(x) if x == img_a));
        assert!(matches!(cache.lookup(&b), Lookup::Miss));
    }

    #[test]
    fn entries_lists_bin_files_with_validity_and_ignores_temps() {
        let dir = TestDir::new("entries");
        let cache = DiskCache::open(&dir.0).unwrap();
        let good = cache.store(&key(1), &image(100, 1)).unwrap();
        let bad = cache.store(&key(2), &image(100, 2)).unwrap();
        let mut bytes = fs::read(&bad).unwrap();
        *bytes.last_mut().unwrap() ^= 0xff;
        fs::write(&bad, &bytes).unwrap();
        // Right content, wrong name: lookups of its key would never find it.
        let misnamed = dir.0.join("0000000000000000.bin");
        fs::copy(&good, &misnamed).unwrap();
        fs::write(dir.0.join("x-0123456789abcdef.tmp-1-2-3"), b"partial").unwrap();
        fs::write(dir.0.join("README.txt"), b"not an entry").unwrap();
        fs::create_dir(dir.0.join("dir.bin")).unwrap();

        let entries = cache.entries().unwrap();
        assert_eq!(entries.len(), 3, "{entries:?}");
        let find = |p: &Path| entries.iter().find(|e| e.path == p).unwrap();
        let g = find(&good);
        assert!(g.valid && g.problem.is_none());
        assert_eq!(g.bytes, fs::metadata(&good).unwrap().len());
        assert_eq!(g.key_text.as_deref(), Some(key(1).text().as_str()));
        let b = find(&bad);
        assert!(!b.valid && b.problem.as_deref().unwrap().contains("checksum"));
        let m = find(&misnamed);
        assert!(!m.valid && m.problem.as_deref().unwrap().contains("file name"));
    }

    #[test]
    fn stale_temp_files_are_removed_on_open() {
        let dir = TestDir::new("stale");
        let stale = dir.0.join("k-0123456789abcdef.tmp-1-2-3");
        let fresh = dir.0.join("k-0123456789abcdef.tmp-4-5-6");
        fs::write(&stale, b"old").unwrap();
        fs::write(&fresh, b"new").unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 60 * 60);
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let _cache = DiskCache::open(&dir.0).unwrap();
        assert!(!stale.exists(), "stale temp file kept");
        assert!(
            fresh.exists(),
            "a possibly in-progress temp file was removed"
        );
    }

    /// `ATTN_CACHE_DIR` may point at a shared scratch directory: the sweep must touch only
    /// names `create_temp` makes, however old and temp-like the other files are.
    #[test]
    fn stale_temp_sweep_spares_files_the_cache_did_not_make() {
        let dir = TestDir::new("sweep");
        let keep = [
            "report.tmp-draft.txt",
            "report.tmp-1-2-3",
            "k-0123456789abcdef.tmp-1-2-3.txt",
            "k-0123456789abcdef.tmp-1-2",
            "k-0123456789abcdef.tmp-1-2-3-4",
            "k-0123456789abcdef.tmp-1-x-3",
            "k-0123456789abcdef.tmp--2-3",
            "k-0123456789abcdef.tmp-1-2-",
            "k-0123456789abcdef.tmp-1-2-3g",
            "k-0123456789ABCDEF.tmp-1-2-3",
            "k-0123456789abcde.tmp-1-2-3",
            "k0123456789abcdef.tmp-1-2-3",
            "-0123456789abcdef.tmp-1-2-3",
            "k.v-0123456789abcdef.tmp-1-2-3",
            "k-0123456789abcdef.bin.tmp-1-2-3",
        ];
        let long_module = format!(
            "{}-0123456789abcdef.tmp-1-2-3",
            "m".repeat(MAX_STEM_NAME + 1)
        );
        let genuine = [
            "k-0123456789abcdef.tmp-1-2-3".to_owned(),
            "0123456789abcdef.tmp-4242-17-17f3a5b2c9d0e1f".to_owned(),
            "flash_fwd-my-mod-0123456789abcdef.tmp-7-0-abc".to_owned(),
            format!("{}-0123456789abcdef.tmp-1-2-3", "m".repeat(MAX_STEM_NAME)),
        ];
        let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 60 * 60);
        let names = keep
            .iter()
            .map(|n| n.to_string())
            .chain([long_module.clone()])
            .chain(genuine.iter().cloned());
        for name in names {
            let path = dir.0.join(name);
            fs::write(&path, b"x").unwrap();
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        // A directory with a genuine temp name is not a file we made either.
        let dir_named_like_temp = dir.0.join("d-0123456789abcdef.tmp-1-2-3");
        fs::create_dir(&dir_named_like_temp).unwrap();

        let _cache = DiskCache::open(&dir.0).unwrap();
        for name in keep {
            assert!(dir.0.join(name).exists(), "{name} was removed");
        }
        assert!(
            dir.0.join(&long_module).exists(),
            "{long_module} was removed"
        );
        assert!(dir_named_like_temp.is_dir());
        for name in &genuine {
            assert!(!dir.0.join(name).exists(), "stale temp {name} kept");
        }
    }

    /// The sweep's pattern must keep matching what `create_temp` really makes, or crashed
    /// stores would leak temporaries forever.
    #[test]
    fn create_temp_names_are_recognised_by_the_sweep() {
        let dir = TestDir::new("tempnames");
        let cache = DiskCache::open(&dir.0).unwrap();
        for k in [
            key(1),
            CacheKey::new().with("arch", "sm_90"),
            CacheKey::module(&"m".repeat(500)),
        ] {
            let (path, file) = cache.create_temp(&k.file_stem()).unwrap();
            drop(file);
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(is_temp_name(name), "{name}");
            assert!(!is_temp_name(&format!("{}{ENTRY_SUFFIX}", k.file_stem())));
        }
    }

    /// A directory at an entry's path can only be debris (the name is the cache's): it is
    /// removed and the entry rebuilt, instead of failing every lookup and store forever.
    #[test]
    fn directory_at_entry_path_is_healed() {
        let dir = TestDir::new("direntry");
        let cache = DiskCache::open(&dir.0).unwrap();
        let k = key(1);
        let path = cache.entry_path(&k);
        fs::create_dir_all(path.join("nested")).unwrap();
        fs::write(path.join("nested/file"), b"x").unwrap();
        match cache.lookup(&k) {
            Lookup::Corrupt { reason } => {
                assert!(reason.contains("not a regular file"), "{reason}")
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
        assert!(!path.exists(), "the directory was not removed");
        assert!(matches!(cache.lookup(&k), Lookup::Miss));

        // Via get_or_compile, in one call: detected, removed, rebuilt, stored.
        fs::create_dir_all(path.join("nested")).unwrap();
        let img = image(300, 4);
        let (bytes, outcome) = cache
            .get_or_compile(&k, || Ok::<_, ()>(img.clone()))
            .unwrap();
        assert_eq!(bytes, img);
        match outcome {
            Outcome::Compiled {
                stored: Ok(p),
                replaced_corrupt: Some(_),
            } => assert_eq!(p, path),
            other => panic!("expected a rebuilt entry, got {other:?}"),
        }
        assert!(matches!(cache.lookup(&k), Lookup::Hit(b) if b == img));
    }

    /// A symlink at an entry's path is removed as a link: what it points to is not ours.
    #[cfg(unix)]
    #[test]
    fn symlink_to_directory_at_entry_path_removes_only_the_link() {
        let dir = TestDir::new("dirlink");
        let cache = DiskCache::open(dir.0.join("cache")).unwrap();
        let target = dir.0.join("users-dir");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("precious"), b"x").unwrap();
        let k = key(1);
        let path = cache.entry_path(&k);
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(cache.lookup(&k), Lookup::Corrupt { .. }));
        assert!(fs::symlink_metadata(&path).is_err(), "the link was kept");
        assert!(
            target.join("precious").exists(),
            "the link's target was touched"
        );
    }

    /// The store fails after a corrupt entry was found (the directory turned unwritable
    /// while compiling; a regular file in its place refuses writes even to root): nothing
    /// was rebuilt, so the outcome must not say a corrupt entry was replaced.
    #[test]
    fn failed_store_after_corrupt_entry_is_not_reported_as_rebuilt() {
        let dir = TestDir::new("notrebuilt");
        let cache_dir = dir.0.join("cache");
        let cache = DiskCache::open(&cache_dir).unwrap();
        let k = key(1);
        let path = cache.store(&k, &image(100, 1)).unwrap();
        fs::write(&path, b"garbage").unwrap();
        let img = image(500, 8);
        let (bytes, outcome) = cache
            .get_or_compile(&k, || {
                fs::remove_dir_all(&cache_dir).unwrap();
                fs::write(&cache_dir, b"not a dir").unwrap();
                Ok::<_, ()>(img.clone())
            })
            .unwrap();
        assert_eq!(bytes, img);
        match outcome {
            Outcome::Compiled {
                stored: Err(_),
                replaced_corrupt: None,
            } => {}
            other => {
                panic!("expected \"compiled; not cached\" and no rebuild claim, got {other:?}")
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn fifo_at_entry_path_does_not_hang() {
        let dir = TestDir::new("fifo");
        let cache = DiskCache::open(&dir.0).unwrap();
        let k = key(1);
        let path = cache.entry_path(&k);
        // No libc in the crate: use the mkfifo tool if present, else skip loudly.
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        if !matches!(made, Ok(s) if s.success()) {
            eprintln!("skipped: mkfifo not available");
            return;
        }
        let start = Instant::now();
        assert!(matches!(cache.lookup(&k), Lookup::Corrupt { .. }));
        assert!(cache.entries().unwrap().is_empty());
        let (bytes, _) = cache
            .get_or_compile(&k, || Ok::<_, ()>(vec![1, 2, 3]))
            .unwrap();
        assert_eq!(bytes, vec![1, 2, 3]);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(cache.lookup(&k), Lookup::Hit(_)));
    }

    #[test]
    fn concurrent_threads_same_key() {
        let dir = TestDir::new("threads");
        let cache = DiskCache::open(&dir.0).unwrap();
        let img = image(64 * 1024, 11);
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (cache, img, barrier) = (cache.clone(), img.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let (bytes, outcome) = cache
                        .get_or_compile(&key(1), || {
                            std::thread::sleep(Duration::from_millis(50));
                            Ok::<_, ()>(img.clone())
                        })
                        .unwrap();
                    assert_eq!(bytes, img);
                    if let Outcome::Compiled { stored, .. } = outcome {
                        stored.unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_valid_single_entry(&cache);
        assert!(matches!(cache.lookup(&key(1)), Lookup::Hit(b) if b == img));
        assert!(temp_files(cache.dir()).is_empty());
    }

    /// Set in child processes of [`concurrent_processes_same_key`]: the cache directory the
    /// child writes to.
    const WRITER_ENV: &str = "ATTENTION_CACHE_TEST_WRITER_DIR";
    const WRITER_DONE: &str = "cache-writer-done";

    fn multi_process_image() -> Vec<u8> {
        image(256 * 1024, 42)
    }

    #[test]
    fn concurrent_processes_same_key() {
        if let Some(dir) = std::env::var_os(WRITER_ENV) {
            // Child role: one racing writer.
            let cache = DiskCache::open(PathBuf::from(dir)).unwrap();
            let (bytes, outcome) = cache
                .get_or_compile(&key(1), || {
                    std::thread::sleep(Duration::from_millis(200));
                    Ok::<_, ()>(multi_process_image())
                })
                .unwrap();
            assert_eq!(bytes, multi_process_image());
            if let Outcome::Compiled { stored, .. } = outcome {
                stored.unwrap();
            }
            println!("{WRITER_DONE}");
            return;
        }

        let dir = TestDir::new("procs");
        let cache = DiskCache::open(&dir.0).unwrap();
        let exe = std::env::current_exe().unwrap();
        // Test names are module paths without the crate name.
        let full = concat!(module_path!(), "::concurrent_processes_same_key");
        let name = full.split_once("::").unwrap().1;
        let children: Vec<_> = (0..4)
            .map(|i| {
                // Output to files, not pipes: nothing can block on a full pipe.
                let out = File::create(dir.0.join(format!("child-{i}.log"))).unwrap();
                let child = std::process::Command::new(&exe)
                    .args(["--exact", name, "--nocapture", "--test-threads=1"])
                    .env(WRITER_ENV, cache.dir())
                    .stdout(out.try_clone().unwrap())
                    .stderr(out)
                    .spawn()
                    .unwrap();
                (i, child)
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        for (i, mut child) in children {
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("child {i} did not finish in time");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let log = fs::read_to_string(dir.0.join(format!("child-{i}.log"))).unwrap();
            assert!(status.success(), "child {i} failed: {status}\n{log}");
            // `--exact` with a wrong name runs nothing and still exits 0: insist it ran.
            assert!(
                log.contains(WRITER_DONE),
                "child {i} did not run the writer:\n{log}"
            );
        }
        assert_valid_single_entry(&cache);
        assert!(matches!(cache.lookup(&key(1)), Lookup::Hit(b) if b == multi_process_image()));
        assert!(temp_files(cache.dir()).is_empty());
    }

    /// A directory nobody may create files in, root included (CI runs the tests as root,
    /// and root ignores permission bits, so a chmod-ed directory would prove nothing):
    /// `/proc/self` exists and opens, lookups miss, and every store fails.
    #[cfg(target_os = "linux")]
    #[test]
    fn read_only_dir_degrades() {
        let cache_dir = Path::new("/proc/self");
        let cache = DiskCache::open(cache_dir).unwrap();
        assert!(
            fs::write(cache_dir.join("attention-probe"), b"x").is_err(),
            "/proc/self accepted a new file: this test needs a directory even root cannot write"
        );
        let img = image(500, 8);
        for _ in 0..2 {
            let (bytes, outcome) = cache
                .get_or_compile(&key(1), || Ok::<_, ()>(img.clone()))
                .unwrap();
            assert_eq!(bytes, img);
            match outcome {
                Outcome::Compiled {
                    stored: Err(_),
                    replaced_corrupt: None,
                } => {}
                other => panic!("expected \"compiled; not cached\", got {other:?}"),
            }
        }
        assert!(matches!(cache.lookup(&key(1)), Lookup::Miss));
    }

    /// The degrade path, exercised even as root: the directory vanishes after opening.
    #[test]
    fn unwritable_dir_degrades_even_as_root() {
        let dir = TestDir::new("vanished");
        let cache_dir = dir.0.join("cache");
        let cache = DiskCache::open(&cache_dir).unwrap();
        fs::remove_dir(&cache_dir).unwrap();
        // A plain file where the directory was: no one can create entries under it.
        fs::write(&cache_dir, b"not a dir").unwrap();
        let img = image(500, 8);
        let (bytes, outcome) = cache
            .get_or_compile(&key(1), || Ok::<_, ()>(img.clone()))
            .unwrap();
        assert_eq!(bytes, img);
        assert!(matches!(
            outcome,
            Outcome::Compiled {
                stored: Err(_),
                replaced_corrupt: None
            }
        ));
        assert!(DiskCache::open(&cache_dir).is_err());
    }

    #[test]
    fn default_cache_dir_resolution() {
        let os = |s: &'static str| Some(std::ffi::OsStr::new(s));
        assert_eq!(
            crate::settings::default_cache_dir_from(os("/xdg"), os("/home/u")),
            Some(PathBuf::from("/xdg/attention"))
        );
        // Relative or empty XDG_CACHE_HOME is ignored, per the XDG spec.
        for xdg in [os("relative/cache"), os(""), None] {
            assert_eq!(
                crate::settings::default_cache_dir_from(xdg, os("/home/u")),
                Some(PathBuf::from("/home/u/.cache/attention")),
                "{xdg:?}"
            );
        }
        assert_eq!(crate::settings::default_cache_dir_from(None, None), None);
        assert_eq!(crate::settings::default_cache_dir_from(os(""), os("")), None);
        assert_eq!(crate::settings::default_cache_dir_from(None, os("relative/home")), None);
        assert_eq!(
            crate::settings::default_cache_dir_from(os("/xdg"), None),
            Some(PathBuf::from("/xdg/attention"))
        );
    }
}
