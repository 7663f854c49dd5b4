//! The checkpoint store: where a connector resumes, kept in sled.
//!
//! One record under one key: the resume position (the engine's
//! [`LogPosition`]), the origin's `epoch`
//! and the `seq` the next event will carry. The record is written only with
//! a position the broker has confirmed everything before, and it is flushed
//! (fsync) before the position is reported to the database (for PostgreSQL,
//! before the slot's `confirmed_flush_lsn` may move).
//!
//! Each record carries a crc32 of its bytes. sled has open reports of
//! corruption after abrupt stops; a record that fails its crc, or a store
//! sled cannot open, stops the sidecar with a message naming the store and
//! the reset command — never a silent restart from zero.
//!
//! # The witness
//!
//! sled checks its own log: a damaged entry is taken for a torn tail and
//! dropped, so damage on disk can leave sled holding no record at all, or
//! an older one, and the record's crc32 never sees it. So records are also
//! written, after sled has flushed them, to a small file beside the store
//! (`checkpoint.witness`: the same bytes, crc32 included; written to a
//! temporary file, fsynced, renamed over the old one). A running sidecar
//! writes it at most once a second and at every stop, not at each of its
//! checkpoint cycles, and reports a position to the database (the slot's
//! `confirmed_flush_lsn`) only once the witness holds it: the database
//! never runs ahead of the witness, so a store that lost records is
//! reported as such rather than as a slot moved by someone else. Loading
//! compares the two: a store that holds no
//! record, or one behind the witness (an earlier epoch, or the same epoch
//! with a lower `seq` or an earlier position), is refused as corrupt or
//! replaced by an older copy ([`CheckpointError::Lost`]), with what was
//! expected and what was found. A record ahead of the witness is what a
//! crash between the two writes leaves, and is taken. A store written
//! before the witness existed has none, and gets one at its next write.
//! The witness lives in the store's directory: replacing that whole
//! directory with an older copy, or deleting it, takes the witness too
//! (PostgreSQL's slot still catches a store behind it, see its source).
//!
//! The store refuses to move backward except through [`CheckpointStore::reset`],
//! and a process lock (`sitesync.lock`, holding the pid) keeps a second
//! sidecar out with a clear message.

use crate::event::Clock;
use crate::position::{LogPosition, engine_of, same_engine};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const RECORD_KEY: &[u8] = b"checkpoint";
const FORMAT: u32 = 1;
const LOCK_FILE: &str = "sitesync.lock";
const LIVE_FILE: &str = "live.json";
const WITNESS_FILE: &str = "checkpoint.witness";
/// The largest epoch and `seq` a record may hold (`i64::MAX`: a time in
/// milliseconds, or more events than anything could publish).
const MAX_NUMBER: u64 = i64::MAX as u64;

/// Where a connector resumes, and how its next event is numbered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint<P> {
    /// Record layout version.
    pub format: u32,
    /// Everything before this position is confirmed; `None` before the first
    /// event: start where the database's log position for us is (the slot).
    pub resume: Option<P>,
    /// Starts anew with each reset (milliseconds since 1970 when the epoch
    /// began, so a recreated store still moves forward).
    pub epoch: u64,
    /// The `seq` the next event gets.
    pub next_seq: u64,
    /// The timestamp the last event got (timestamps only grow).
    #[serde(default)]
    pub last_ts: Option<DateTime<Utc>>,
    pub written_at: DateTime<Utc>,
}

impl<P: LogPosition> Checkpoint<P> {
    /// A new epoch at `resume`, numbering from 1.
    pub fn new_epoch(resume: Option<P>, previous_epoch: Option<u64>) -> Checkpoint<P> {
        let now = Utc::now();
        let millis = now.timestamp_millis().max(0) as u64;
        Checkpoint {
            format: FORMAT,
            resume,
            epoch: millis.max(previous_epoch.map_or(0, |e| e + 1)),
            next_seq: 1,
            last_ts: None,
            written_at: now,
        }
    }

    /// The same epoch, moved to `resume` with `clock`.
    pub fn advanced(&self, resume: P, clock: Clock) -> Checkpoint<P> {
        Checkpoint {
            format: FORMAT,
            resume: Some(resume),
            epoch: self.epoch,
            next_seq: clock.next_seq,
            last_ts: clock.last_ts,
            written_at: Utc::now(),
        }
    }

    /// How the next event is numbered and timed.
    pub fn clock(&self) -> Clock {
        Clock {
            next_seq: self.next_seq,
            last_ts: self.last_ts,
        }
    }

    /// The record as stored: the crc32 (LE) of the JSON, then the JSON.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a checkpoint always serialises");
        let mut out = Vec::with_capacity(json.len() + 4);
        out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// A stored record (from sled or the witness file), or why it cannot
    /// be used.
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint<P>, Unreadable> {
        if bytes.len() < 4 {
            return Err(Unreadable::Corrupt(format!(
                "record is {} bytes, too short to hold its crc32",
                bytes.len()
            )));
        }
        let (crc, json) = bytes.split_at(4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let actual = crc32fast::hash(json);
        if stored != actual {
            return Err(Unreadable::Corrupt(format!(
                "crc32 mismatch: the record says {stored:08x}, its bytes give {actual:08x}"
            )));
        }
        let ck: Checkpoint<P> = serde_json::from_slice(json).map_err(|e| {
            // A record of another engine is whole: say so, not "corrupt".
            let found = serde_json::from_slice::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v.get("resume").and_then(engine_of).map(str::to_string));
            match found {
                Some(engine) if !same_engine(&engine, P::ENGINE) => Unreadable::OtherEngine(engine),
                _ => {
                    Unreadable::Corrupt(format!("record passes its crc32 but does not parse: {e}"))
                }
            }
        })?;
        if ck.format != FORMAT {
            return Err(Unreadable::Corrupt(format!(
                "record format {} is not the {FORMAT} this sitesync reads",
                ck.format
            )));
        }
        // Numbers no sidecar writes: the epoch is a time in milliseconds
        // (or one past the previous epoch), `seq` starts at 1 and grows by
        // one per event. Taking them would overflow the next epoch or seq.
        if ck.epoch > MAX_NUMBER {
            return Err(Unreadable::Corrupt(format!(
                "epoch {} is beyond any time sitesync numbers epochs with",
                ck.epoch
            )));
        }
        if ck.next_seq == 0 || ck.next_seq > MAX_NUMBER {
            return Err(Unreadable::Corrupt(format!(
                "next_seq {} is outside 1..={MAX_NUMBER}",
                ck.next_seq
            )));
        }
        Ok(ck)
    }
}

/// Why a stored record cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// What is wrong with the bytes.
    Corrupt(String),
    /// A whole record of another engine (that engine's name).
    OtherEngine(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint store {} is in use by another sitesync (pid {pid}); stop it first, or point this connector at another checkpoint.dir", dir.display())]
    InUse { dir: PathBuf, pid: String },
    #[error("checkpoint store {} is corrupt ({detail}). sitesync will not silently restart from zero. Inspect it, then reset it explicitly: {reset_hint}", dir.display())]
    Corrupt {
        dir: PathBuf,
        detail: String,
        reset_hint: String,
    },
    #[error("checkpoint store {} holds a position of `{found}`, and this connector reads {expected}: point checkpoint.dir at a store of its own, or reset this one: {reset_hint}", dir.display())]
    OtherEngine {
        dir: PathBuf,
        found: String,
        expected: &'static str,
        reset_hint: String,
    },
    #[error("checkpoint store {} holds {found}, but the last checkpoint written there was {expected} (its witness, {}): sled lost or rolled back its record. The store is corrupt, or was replaced by an older copy; sitesync will not silently restart from there. See `sitesync checkpoint show`, then reset it explicitly: {reset_hint}", dir.display(), dir.join(WITNESS_FILE).display())]
    Lost {
        dir: PathBuf,
        expected: String,
        found: String,
        reset_hint: String,
    },
    #[error("refusing to move checkpoint {} backward from {current} to {proposed} (only `sitesync checkpoint reset` may do that)", dir.display())]
    Regression {
        dir: PathBuf,
        current: String,
        proposed: String,
    },
    #[error("checkpoint store {}: {action}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The reset command to suggest for a connector file.
pub fn reset_hint(connector_file: &Path) -> String {
    format!(
        "`sitesync checkpoint reset --connector {} --to-start` (or --to-position P / --to-latest)",
        connector_file.display()
    )
}

/// An open, locked checkpoint store.
pub struct CheckpointStore {
    dir: PathBuf,
    db: sled::Db,
    reset_hint: String,
    /// Held for the life of the store: the OS releases it if we die.
    _lock: File,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("dir", &self.dir)
            .finish()
    }
}

fn io(dir: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> CheckpointError + use<> {
    let dir = dir.to_path_buf();
    move |source| CheckpointError::Io {
        dir,
        action,
        source,
    }
}

/// Takes the store's process lock, or says who holds it.
fn lock(dir: &Path) -> Result<File, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir, "creating the directory"))?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io(dir, "opening the lock file"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(CheckpointError::InUse {
                dir: dir.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.to_string()
                },
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(dir, "locking the store")(e)),
    }
    file.set_len(0).map_err(io(dir, "writing the lock file"))?;
    file.rewind().map_err(io(dir, "writing the lock file"))?;
    write!(file, "{}", std::process::id()).map_err(io(dir, "writing the lock file"))?;
    file.sync_all().map_err(io(dir, "writing the lock file"))?;
    Ok(file)
}

impl CheckpointStore {
    /// Opens (creating if needed) the store in `dir`. `reset_hint` is the
    /// command an operator should run if the store turns out corrupt.
    pub fn open(dir: &Path, reset_hint: String) -> Result<CheckpointStore, CheckpointError> {
        let lock = lock(dir)?;
        let path = dir.join("sled");
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(&path).open());
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(sled::Error::Io(e))) => return Err(io(dir, "opening sled")(e)),
            Ok(Err(e)) => {
                return Err(CheckpointError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail: format!("sled cannot open it: {e}"),
                    reset_hint,
                });
            }
            Err(_) => {
                return Err(CheckpointError::Corrupt {
                    dir: dir.to_path_buf(),
                    detail: "sled panicked while opening it".into(),
                    reset_hint,
                });
            }
        };
        Ok(CheckpointStore {
            dir: dir.to_path_buf(),
            db,
            reset_hint,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored checkpoint, verified, and checked against its witness
    /// (see the module doc); `None` if none was ever written.
    pub fn load<P: LogPosition>(&self) -> Result<Option<Checkpoint<P>>, CheckpointError> {
        let stored = self.record::<P>()?;
        let Some(witness) = self.witness::<P>()? else {
            return Ok(stored);
        };
        match &stored {
            Some(ck) if !behind(ck, &witness) => Ok(stored),
            _ => Err(CheckpointError::Lost {
                dir: self.dir.clone(),
                expected: describe(&witness),
                found: stored.as_ref().map_or_else(
                    || "no checkpoint".to_string(),
                    |ck| format!("the checkpoint {}", describe(ck)),
                ),
                reset_hint: self.reset_hint.clone(),
            }),
        }
    }

    /// sled's record, verified by its crc, without the witness.
    fn record<P: LogPosition>(&self) -> Result<Option<Checkpoint<P>>, CheckpointError> {
        match self.db.get(RECORD_KEY).map_err(|e| self.sled_error(e))? {
            None => Ok(None),
            Some(bytes) => Checkpoint::decode(&bytes)
                .map(Some)
                .map_err(|e| self.unreadable::<P>(e, "record")),
        }
    }

    /// The witness's record, if there is one.
    fn witness<P: LogPosition>(&self) -> Result<Option<Checkpoint<P>>, CheckpointError> {
        let path = self.dir.join(WITNESS_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&self.dir, "reading the checkpoint's witness")(e)),
        };
        Checkpoint::decode(&bytes)
            .map(Some)
            .map_err(|e| self.unreadable::<P>(e, "witness"))
    }

    fn unreadable<P: LogPosition>(&self, e: Unreadable, what: &str) -> CheckpointError {
        match e {
            Unreadable::Corrupt(detail) => CheckpointError::Corrupt {
                dir: self.dir.clone(),
                detail: if what == "record" {
                    detail
                } else {
                    format!(
                        "its {what} {} is damaged: {detail}",
                        self.dir.join(WITNESS_FILE).display()
                    )
                },
                reset_hint: self.reset_hint.clone(),
            },
            Unreadable::OtherEngine(found) => CheckpointError::OtherEngine {
                dir: self.dir.clone(),
                found,
                expected: P::ENGINE,
                reset_hint: self.reset_hint.clone(),
            },
        }
    }

    fn sled_error(&self, e: sled::Error) -> CheckpointError {
        match e {
            sled::Error::Io(source) => CheckpointError::Io {
                dir: self.dir.clone(),
                action: "reading or writing sled",
                source,
            },
            other => CheckpointError::Corrupt {
                dir: self.dir.clone(),
                detail: other.to_string(),
                reset_hint: self.reset_hint.clone(),
            },
        }
    }

    /// Stores `next` durably, and its witness. Refuses a position behind
    /// the stored one, a change of epoch, or a store holding a position of
    /// another engine.
    pub async fn commit<P: LogPosition>(
        &self,
        next: &Checkpoint<P>,
    ) -> Result<(), CheckpointError> {
        self.commit_unwitnessed(next).await?;
        self.witness_now(next).await
    }

    /// [`commit`](Self::commit) without the witness: sled holds `next`
    /// durably, the witness stays where it was until
    /// [`witness_now`](Self::witness_now). For the sidecar's frequent
    /// cycles, which write the witness at a slower pace and report a
    /// position to the database only once the witness holds it.
    pub async fn commit_unwitnessed<P: LogPosition>(
        &self,
        next: &Checkpoint<P>,
    ) -> Result<(), CheckpointError> {
        if let Some(current) = self.record::<P>()? {
            let backward = match (&current.resume, &next.resume) {
                (Some(_), None) => true,
                (Some(c), Some(n)) => n < c,
                (None, _) => false,
            };
            if backward
                || next.epoch != current.epoch
                || next.next_seq < current.next_seq
                || next.last_ts < current.last_ts
            {
                return Err(CheckpointError::Regression {
                    dir: self.dir.clone(),
                    current: describe(&current),
                    proposed: describe(next),
                });
            }
        }
        self.write(next).await
    }

    /// Replaces the checkpoint, whatever it was (the explicit reset), and
    /// its witness.
    pub async fn reset<P: LogPosition>(&self, next: &Checkpoint<P>) -> Result<(), CheckpointError> {
        self.write(next).await?;
        self.witness_now(next).await
    }

    async fn write<P: LogPosition>(&self, ck: &Checkpoint<P>) -> Result<(), CheckpointError> {
        self.db
            .insert(RECORD_KEY, ck.encode())
            .map_err(|e| self.sled_error(e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| self.sled_error(e))?;
        Ok(())
    }

    /// Writes `ck`, which sled already holds durably, as the witness. Only
    /// once sled holds it: a crash in between leaves sled ahead of the
    /// witness, which loads.
    pub async fn witness_now<P: LogPosition>(
        &self,
        ck: &Checkpoint<P>,
    ) -> Result<(), CheckpointError> {
        let (dir, bytes) = (self.dir.clone(), ck.encode());
        tokio::task::spawn_blocking(move || write_witness(&dir, &bytes))
            .await
            .map_err(|e| CheckpointError::Io {
                dir: self.dir.clone(),
                action: "writing the checkpoint's witness",
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Writes `live.json` beside the store: what `checkpoint show` prints
    /// while a sidecar holds the lock. Not authoritative, not fsynced.
    pub fn write_live<P: LogPosition>(&self, ck: &Checkpoint<P>) {
        let live = serde_json::json!({ "pid": std::process::id(), "checkpoint": ck });
        let tmp = self.dir.join(format!("{LIVE_FILE}.tmp"));
        if std::fs::write(&tmp, live.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join(LIVE_FILE));
        }
    }

    /// Flips one byte of the stored record without fixing its crc, as a torn
    /// write would.
    #[cfg(test)]
    fn corrupt_for_tests(&self) -> Result<(), CheckpointError> {
        if let Some(bytes) = self.db.get(RECORD_KEY).map_err(|e| self.sled_error(e))? {
            let mut bytes = bytes.to_vec();
            let last = bytes.len() - 2;
            bytes[last] ^= 0x20;
            self.db
                .insert(RECORD_KEY, bytes)
                .map_err(|e| self.sled_error(e))?;
            self.db.flush().map_err(|e| self.sled_error(e))?;
        }
        Ok(())
    }
}

/// Whether `ck` is behind the last checkpoint written (`witness`): an
/// earlier epoch, or in the same epoch an earlier position or a lower
/// `seq`. A later epoch is a reset whose witness was not written yet.
fn behind<P: LogPosition>(ck: &Checkpoint<P>, witness: &Checkpoint<P>) -> bool {
    if ck.epoch != witness.epoch {
        return ck.epoch < witness.epoch;
    }
    let position_behind = match (&ck.resume, &witness.resume) {
        (None, Some(_)) => true,
        (Some(c), Some(w)) => c < w,
        (_, None) => false,
    };
    position_behind || ck.next_seq < witness.next_seq
}

/// Replaces the witness atomically: a temporary file, fsynced, renamed over
/// the old one. The directory is not fsynced: a rename that a power cut
/// undoes leaves the previous witness, behind sled's record, which loads.
fn write_witness(dir: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let action = "writing the checkpoint's witness";
    let tmp = dir.join(format!("{WITNESS_FILE}.tmp"));
    let mut file = File::create(&tmp).map_err(io(dir, action))?;
    file.write_all(bytes).map_err(io(dir, action))?;
    file.sync_all().map_err(io(dir, action))?;
    drop(file);
    std::fs::rename(&tmp, dir.join(WITNESS_FILE)).map_err(io(dir, action))
}

/// What a running sidecar last wrote to `live.json`: `(pid, checkpoint)`.
pub fn read_live<P: LogPosition>(dir: &Path) -> Option<(u64, Checkpoint<P>)> {
    let text = std::fs::read_to_string(dir.join(LIVE_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pid = v.get("pid")?.as_u64()?;
    let ck = serde_json::from_value(v.get("checkpoint")?.clone()).ok()?;
    Some((pid, ck))
}

/// Moves a store that sled cannot open out of the way, so a reset can start
/// a fresh one; returns where it went. Nothing is deleted.
pub fn set_aside(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let aside = dir.join(format!(
        "sled.corrupt-{}",
        Utc::now().format("%Y%m%dT%H%M%S")
    ));
    std::fs::rename(dir.join("sled"), &aside).map_err(io(dir, "moving the corrupt store aside"))?;
    Ok(aside)
}

/// One line: position, epoch, next seq.
pub fn describe<P: LogPosition>(ck: &Checkpoint<P>) -> String {
    format!(
        "{} (epoch {}, next seq {})",
        ck.resume.as_ref().map_or_else(
            || "the start (where the database keeps our place)".to_string(),
            |p| p.to_string()
        ),
        ck.epoch,
        ck.next_seq
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sitesync-ck-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A position of an engine "one", as engines write theirs.
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(tag = "engine", rename_all = "snake_case")]
    enum One {
        One { at: u64, index: u32 },
    }

    impl std::fmt::Display for One {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let One::One { at, index } = self;
            write!(f, "one:{at}#{index}")
        }
    }

    impl std::str::FromStr for One {
        type Err = String;
        fn from_str(_: &str) -> Result<One, String> {
            Err("not needed".into())
        }
    }

    impl LogPosition for One {
        const ENGINE: &'static str = "one";
        fn next_row(&self) -> One {
            let One::One { at, index } = self;
            One::One {
                at: *at,
                index: index + 1,
            }
        }
    }

    /// A position of another engine, "two".
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(tag = "engine", rename_all = "snake_case")]
    enum Two {
        Two { scn: u64 },
    }

    impl std::fmt::Display for Two {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let Two::Two { scn } = self;
            write!(f, "two:{scn}")
        }
    }

    impl std::str::FromStr for Two {
        type Err = String;
        fn from_str(_: &str) -> Result<Two, String> {
            Err("not needed".into())
        }
    }

    impl LogPosition for Two {
        const ENGINE: &'static str = "two";
        fn next_row(&self) -> Two {
            self.clone()
        }
    }

    fn pg(at: u64, index: u32) -> One {
        One::One { at, index }
    }

    fn clk(next_seq: u64) -> Clock {
        Clock {
            next_seq,
            last_ts: None,
        }
    }

    #[tokio::test]
    async fn commit_and_reload() {
        let d = dir("reload");
        let store = CheckpointStore::open(&d, "hint".into()).unwrap();
        assert_eq!(store.load::<One>().unwrap(), None);
        let ck = Checkpoint::new_epoch(None, None);
        store.reset(&ck).await.unwrap();
        let next = ck.advanced(pg(100, 2), clk(5));
        store.commit(&next).await.unwrap();
        drop(store);
        let store = CheckpointStore::open(&d, "hint".into()).unwrap();
        assert_eq!(store.load().unwrap(), Some(next));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn refuses_to_go_backward_except_by_reset() {
        let d = dir("back");
        let store = CheckpointStore::open(&d, "hint".into()).unwrap();
        let ck = Checkpoint::new_epoch(Some(pg(100, 0)), None);
        store.reset(&ck).await.unwrap();
        let err = store
            .commit(&ck.advanced(pg(99, 9), clk(2)))
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Regression { .. }), "{err}");
        assert!(err.to_string().contains("backward"), "{err}");
        // A store of another engine is refused by name.
        let other_engine = Checkpoint::new_epoch(Some(Two::Two { scn: 1000 }), None);
        let err = store.commit(&other_engine).await.unwrap_err();
        assert!(matches!(err, CheckpointError::OtherEngine { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("holds a position of `one`, and this connector reads two"),
            "{err}"
        );
        let mut new_epoch = ck.advanced(pg(200, 0), clk(2));
        new_epoch.epoch += 1;
        assert!(store.commit(&new_epoch).await.is_err());
        // Same position again is fine (an idle re-commit).
        store
            .commit(&ck.advanced(pg(100, 0), clk(1)))
            .await
            .unwrap();
        let reset = Checkpoint::new_epoch(Some(pg(1, 0)), Some(ck.epoch));
        assert!(reset.epoch > ck.epoch);
        store.reset(&reset).await.unwrap();
        assert_eq!(store.load().unwrap(), Some(reset));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_corrupt_record_names_the_store_and_the_reset_command() {
        let d = dir("corrupt");
        let store =
            CheckpointStore::open(&d, reset_hint(Path::new("connectors/paris.toml"))).unwrap();
        store
            .reset(&Checkpoint::new_epoch(Some(pg(5, 0)), None))
            .await
            .unwrap();
        store.corrupt_for_tests().unwrap();
        drop(store);
        let store =
            CheckpointStore::open(&d, reset_hint(Path::new("connectors/paris.toml"))).unwrap();
        let err = store.load::<One>().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&d.display().to_string()), "{text}");
        assert!(text.contains("crc32 mismatch"), "{text}");
        assert!(
            text.contains("sitesync checkpoint reset --connector connectors/paris.toml"),
            "{text}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// What sled's own log checks leave of a damaged store: the record
    /// gone (a torn tail dropped) or an older one (the newest entry
    /// dropped), written straight into sled, past the witness.
    fn sled_holds(store: &CheckpointStore, record: Option<&Checkpoint<One>>) {
        match record {
            None => store.db.remove(RECORD_KEY).unwrap(),
            Some(ck) => store.db.insert(RECORD_KEY, ck.encode()).unwrap(),
        };
        store.db.flush().unwrap();
    }

    #[tokio::test]
    async fn a_store_that_lost_its_record_is_refused_not_taken_for_a_new_one() {
        let d = dir("lost");
        let hint = reset_hint(Path::new("connectors/paris.toml"));
        let store = CheckpointStore::open(&d, hint.clone()).unwrap();
        let ck = Checkpoint::new_epoch(None, None);
        store.reset(&ck).await.unwrap();
        let written = ck.advanced(pg(597, 0), clk(597));
        store.commit(&written).await.unwrap();
        assert!(d.join(WITNESS_FILE).exists());
        sled_holds(&store, None);
        drop(store);
        let store = CheckpointStore::open(&d, hint.clone()).unwrap();
        let err = store.load::<One>().unwrap_err();
        assert!(matches!(err, CheckpointError::Lost { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&d.display().to_string()), "{text}");
        assert!(text.contains("holds no checkpoint"), "{text}");
        assert!(
            text.contains(&format!("one:597#0 (epoch {}, next seq 597)", ck.epoch)),
            "{text}"
        );
        assert!(
            text.contains("corrupt, or was replaced by an older copy"),
            "{text}"
        );
        assert!(
            text.contains("sitesync checkpoint reset --connector connectors/paris.toml"),
            "{text}"
        );
        // The explicit reset recovers.
        let fresh = Checkpoint::new_epoch(Some(pg(600, 0)), Some(ck.epoch));
        store.reset(&fresh).await.unwrap();
        assert_eq!(store.load().unwrap(), Some(fresh));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_store_that_fell_back_to_an_older_record_is_refused() {
        let d = dir("older");
        let store = CheckpointStore::open(&d, "hint".into()).unwrap();
        let ck = Checkpoint::new_epoch(None, None);
        store.reset(&ck).await.unwrap();
        let older = ck.advanced(pg(588, 0), clk(588));
        store.commit(&older).await.unwrap();
        store
            .commit(&older.advanced(pg(597, 0), clk(597)))
            .await
            .unwrap();
        sled_holds(&store, Some(&older));
        let text = store.load::<One>().unwrap_err().to_string();
        assert!(
            text.contains(&format!(
                "holds the checkpoint one:588#0 (epoch {}, next seq 588)",
                ck.epoch
            )),
            "{text}"
        );
        assert!(text.contains("next seq 597"), "{text}");
        // An older epoch is behind whatever its numbers.
        let mut old_epoch = older.advanced(pg(900, 0), clk(900));
        old_epoch.epoch -= 1;
        sled_holds(&store, Some(&old_epoch));
        assert!(matches!(
            store.load::<One>(),
            Err(CheckpointError::Lost { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_record_ahead_of_its_witness_loads_as_a_crash_between_the_two_writes_leaves_it() {
        let d = dir("ahead");
        let store = CheckpointStore::open(&d, "hint".into()).unwrap();
        let ck = Checkpoint::new_epoch(None, None);
        store.reset(&ck).await.unwrap();
        let ahead = ck.advanced(pg(10, 1), clk(11));
        sled_holds(&store, Some(&ahead));
        assert_eq!(store.load().unwrap(), Some(ahead.clone()));
        // A reset whose witness was not written: a later epoch.
        let reset = Checkpoint::new_epoch(Some(pg(1, 0)), Some(ck.epoch));
        sled_holds(&store, Some(&reset));
        assert_eq!(store.load().unwrap(), Some(reset));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_store_written_before_the_witness_loads_and_gets_one_at_its_next_write() {
        let d = dir("nowitness");
        let store = CheckpointStore::open(&d, "hint".into()).unwrap();
        let ck = Checkpoint::new_epoch(Some(pg(5, 0)), None);
        sled_holds(&store, Some(&ck));
        assert!(!d.join(WITNESS_FILE).exists());
        assert_eq!(store.load().unwrap(), Some(ck.clone()));
        let next = ck.advanced(pg(6, 0), clk(2));
        store.commit(&next).await.unwrap();
        assert_eq!(
            Checkpoint::<One>::decode(&std::fs::read(d.join(WITNESS_FILE)).unwrap()).unwrap(),
            next
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_damaged_witness_is_reported_as_such() {
        let d = dir("badwitness");
        let store = CheckpointStore::open(&d, "hint".into()).unwrap();
        store
            .reset(&Checkpoint::<One>::new_epoch(Some(pg(5, 0)), None))
            .await
            .unwrap();
        let path = d.join(WITNESS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
        let text = store.load::<One>().unwrap_err().to_string();
        assert!(text.contains("is corrupt"), "{text}");
        assert!(text.contains("its witness"), "{text}");
        assert!(text.contains("crc32 mismatch"), "{text}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_second_opener_is_told_who_holds_the_store() {
        let d = dir("lock");
        let _first = CheckpointStore::open(&d, "hint".into()).unwrap();
        let err = CheckpointStore::open(&d, "hint".into()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("in use by another sitesync"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(_first);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn decode_rejects_short_and_garbled_records() {
        let corrupt = |r: Result<Checkpoint<One>, Unreadable>| match r {
            Err(Unreadable::Corrupt(detail)) => detail,
            other => panic!("{other:?}"),
        };
        assert!(corrupt(Checkpoint::decode(b"ab")).contains("too short"));
        let mut bytes = Checkpoint::<One>::new_epoch(None, None).encode();
        bytes[6] ^= 1;
        assert!(corrupt(Checkpoint::decode(&bytes)).contains("crc32"));
    }

    /// Any instant chrono holds, to the nanosecond.
    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        let (min, max) = (
            DateTime::<Utc>::MIN_UTC.timestamp(),
            DateTime::<Utc>::MAX_UTC.timestamp(),
        );
        prop_oneof![
            (min..=max, 0u32..1_000_000_000),
            // Around now, where they are in practice.
            (1_700_000_000i64..2_000_000_000, 0u32..1_000_000_000),
        ]
        .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
    }

    fn checkpoint<P: std::fmt::Debug>(
        position: impl Strategy<Value = P>,
    ) -> impl Strategy<Value = Checkpoint<P>> {
        (
            proptest::option::of(position),
            0..=MAX_NUMBER,
            1..=MAX_NUMBER,
            proptest::option::of(instant()),
            instant(),
        )
            .prop_map(
                |(resume, epoch, next_seq, last_ts, written_at)| Checkpoint {
                    format: FORMAT,
                    resume,
                    epoch,
                    next_seq,
                    last_ts,
                    written_at,
                },
            )
    }

    /// `json` as a record: its crc32, then it.
    fn record(json: &[u8]) -> Vec<u8> {
        let mut bytes = crc32fast::hash(json).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        bytes
    }

    /// What any record decodes to: a checkpoint that round trips, or
    /// what is wrong with it.
    fn decodes_or_says_why<P: LogPosition + PartialEq>(bytes: &[u8]) -> Result<(), TestCaseError> {
        match Checkpoint::<P>::decode(bytes) {
            Ok(ck) => prop_assert_eq!(Checkpoint::<P>::decode(&ck.encode()), Ok(ck)),
            Err(Unreadable::Corrupt(detail)) => prop_assert!(
                [
                    "too short",
                    "crc32 mismatch",
                    "does not parse",
                    "record format"
                ]
                .iter()
                .any(|what| detail.contains(what)),
                "{}",
                detail
            ),
            Err(Unreadable::OtherEngine(engine)) => prop_assert_ne!(engine, P::ENGINE),
        }
        Ok(())
    }

    #[test]
    fn a_record_of_another_format_or_engine_says_so() {
        let ck = Checkpoint::<One>::new_epoch(Some(pg(1, 2)), None);
        let mut json = serde_json::to_value(&ck).unwrap();
        json["format"] = 2.into();
        let bytes = record(&serde_json::to_vec(&json).unwrap());
        assert_eq!(
            Checkpoint::<One>::decode(&bytes),
            Err(Unreadable::Corrupt(
                "record format 2 is not the 1 this sitesync reads".into()
            ))
        );
        let two = Checkpoint::<Two>::new_epoch(Some(Two::Two { scn: 5 }), None).encode();
        assert_eq!(
            Checkpoint::<One>::decode(&two),
            Err(Unreadable::OtherEngine("two".into()))
        );
        let e = Checkpoint::<One>::decode(&record(b"{\"format\":1}")).unwrap_err();
        assert!(
            matches!(&e, Unreadable::Corrupt(d) if d.contains("missing field `epoch`")),
            "{e:?}"
        );
    }

    #[test]
    fn a_record_whose_numbers_would_overflow_is_refused() {
        let ck = Checkpoint::<One>::new_epoch(Some(pg(1, 2)), None);
        for (field, value, says) in [
            (
                "epoch",
                u64::MAX,
                "epoch 18446744073709551615 is beyond any time",
            ),
            (
                "next_seq",
                u64::MAX,
                "next_seq 18446744073709551615 is outside 1..=",
            ),
            ("next_seq", 0, "next_seq 0 is outside 1..="),
        ] {
            let mut json = serde_json::to_value(&ck).unwrap();
            json[field] = value.into();
            let e = Checkpoint::<One>::decode(&record(&serde_json::to_vec(&json).unwrap()))
                .unwrap_err();
            assert!(
                matches!(&e, Unreadable::Corrupt(d) if d.starts_with(says)),
                "{field} = {value}: {e:?}"
            );
        }
        let mut json = serde_json::to_value(&ck).unwrap();
        json["next_seq"] = MAX_NUMBER.into();
        json["epoch"] = MAX_NUMBER.into();
        let edge = Checkpoint::<One>::decode(&record(&serde_json::to_vec(&json).unwrap())).unwrap();
        assert_eq!((edge.epoch, edge.next_seq), (MAX_NUMBER, MAX_NUMBER));
        let next = Checkpoint::<One>::new_epoch(None, Some(edge.epoch));
        assert_eq!(
            next.epoch,
            MAX_NUMBER + 1,
            "the next epoch does not overflow"
        );
    }

    proptest! {
        #[test]
        fn checkpoints_round_trip(ck in checkpoint((any::<u64>(), any::<u32>()).prop_map(|(at, index)| pg(at, index)))) {
            prop_assert_eq!(Checkpoint::decode(&ck.encode()), Ok(ck));
        }

        #[test]
        fn postgres_checkpoints_round_trip(
            ck in checkpoint((any::<u64>(), any::<u32>()).prop_map(|(lsn, index)| {
                crate::engine::postgres::position::Position { lsn, index }
            })),
        ) {
            prop_assert_eq!(Checkpoint::decode(&ck.encode()), Ok(ck));
        }

        #[test]
        fn any_bytes_decode_or_say_why(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            decodes_or_says_why::<One>(&bytes)?;
        }

        #[test]
        fn any_json_with_a_good_crc_decodes_or_says_why(
            json in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            decodes_or_says_why::<One>(&record(&json))?;
        }

        #[test]
        fn mangled_records_decode_or_say_why(
            ck in checkpoint((any::<u64>(), any::<u32>()).prop_map(|(at, index)| pg(at, index))),
            at in any::<prop::sample::Index>(),
            cut in 0usize..6,
            junk in "[ -~]{0,6}",
        ) {
            let json = serde_json::to_vec(&ck).unwrap();
            let at = at.index(json.len());
            let mut mangled = json[..at].to_vec();
            mangled.extend_from_slice(junk.as_bytes());
            mangled.extend_from_slice(&json[(at + cut).min(json.len())..]);
            // With the crc of the mangled bytes (the JSON parser's part)
            // and with the one of the original (the crc's part).
            decodes_or_says_why::<One>(&record(&mangled))?;
            let mut stale = record(&json)[..4].to_vec();
            stale.extend_from_slice(&mangled);
            if mangled != json {
                prop_assert!(
                    matches!(Checkpoint::<One>::decode(&stale), Err(Unreadable::Corrupt(d)) if d.contains("crc32 mismatch"))
                );
            }
        }
    }
}
