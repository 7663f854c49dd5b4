//! Which redo log files a window needs, and how wide windows are.
//!
//! Since 19c LogMiner's `CONTINUOUS_MINE` is gone: each window adds its log
//! files itself (`DBMS_LOGMNR.ADD_LOGFILE`). The candidates are the online
//! logs (`V$LOG` joined to `V$LOGFILE`, one member per group) and the
//! archived logs still on disk (`V$ARCHIVED_LOG` with `STATUS = 'A'`, not
//! deleted, local destinations) of the database's current incarnation.
//! [`select`] is a pure function over that list, tested here without a
//! server:
//!
//! - only logs of the current incarnation count ([`Incarnation`]): after an
//!   `OPEN RESETLOGS` (flashback, incomplete recovery) sequences start again
//!   at 1 and SCNs after the reset point are reused, so an older
//!   incarnation's archived log can carry the same thread and sequence, or
//!   the same SCNs, as a current one. The listing query filters on
//!   `V$DATABASE`'s `RESETLOGS_CHANGE#` and `RESETLOGS_TIME` already;
//!   [`select`] checks again, so that an older log can never be chosen;
//!   a window starting before the current incarnation's reset point is an
//!   operator error;
//! - a log covers `[FIRST_CHANGE#, NEXT_CHANGE#)`; the current online log's
//!   `NEXT_CHANGE#` is the largest SCN;
//! - per redo thread, the logs overlapping the window `(lo, hi]` are taken,
//!   one file per sequence: the archived copy when there is one (an online
//!   log can be overwritten while it is read once it has been archived),
//!   else the online one;
//! - the sequences taken must be contiguous, and the first must start at or
//!   before `lo + 1`; otherwise the redo for part of the window is gone, and
//!   that is an operator error naming the SCN range and what to do, never
//!   a silent skip.
//!
//! A log switch between listing the logs and mining shows up as LogMiner
//! error ORA-01291 (missing log file) or ORA-00310/00334 (the online log was
//! overwritten): transient, the window is listed and mined again.

use std::collections::BTreeMap;

/// A database incarnation, as `V$DATABASE` and `V$ARCHIVED_LOG` name it:
/// `RESETLOGS_CHANGE#` and `RESETLOGS_TIME` (two flashbacks to one SCN make
/// two incarnations with the same `RESETLOGS_CHANGE#`; the time tells them
/// apart). Online logs always belong to the current one: `OPEN RESETLOGS`
/// reinitialises them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Incarnation {
    pub resetlogs_scn: u64,
    /// `TO_CHAR(RESETLOGS_TIME, 'YYYY-MM-DD HH24:MI:SS')`.
    pub resetlogs_time: String,
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RESETLOGS at SCN {} ({})",
            self.resetlogs_scn, self.resetlogs_time
        )
    }
}

/// One redo log file, online or archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    pub name: String,
    pub thread: u32,
    pub sequence: u64,
    pub first_scn: u64,
    /// `NEXT_CHANGE#`: the first SCN *not* in this log (the largest SCN for
    /// the current online log).
    pub next_scn: u64,
    pub archived: bool,
    /// The incarnation whose redo it holds.
    pub incarnation: Incarnation,
}

/// What [`super::miner::LogMiner::list_logs`] returns: the database's
/// current incarnation and the log files listed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogCatalogue {
    pub current: Incarnation,
    pub files: Vec<LogFile>,
}

impl LogCatalogue {
    /// The files of the current incarnation.
    pub fn current_files(&self) -> impl Iterator<Item = &LogFile> {
        self.files.iter().filter(|f| f.incarnation == self.current)
    }
}

/// The redo for part of a window is not on disk any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingRedo {
    pub thread: u32,
    /// The SCNs that cannot be read: `from..=to`.
    pub from: u64,
    pub to: u64,
    /// What is there instead.
    pub detail: String,
    /// Set when the window starts before the current incarnation's reset
    /// point: restoring archived logs does not help then.
    pub before_reset: bool,
}

impl MissingRedo {
    /// The operator's message.
    pub fn message(&self) -> String {
        if self.before_reset {
            return format!(
                "the redo for SCN {}..{} cannot be mined: {}",
                self.from, self.to, self.detail
            );
        }
        format!(
            "the redo for SCN {}..{} (thread {}) is not available: {}. Outbox rows committed in that range cannot be read. \
             Restore the archived logs (RMAN: RESTORE ARCHIVELOG FROM SCN {} UNTIL SCN {} THREAD {}) and restart sitesync; \
             or, accepting that those events are lost, run `sitesync checkpoint reset --to-latest` and resynchronise the other sites from the archive. \
             To prevent it, keep archived logs until sitesync has read them (`sitesync checkpoint show` prints the SCN it needs)",
            self.from, self.to, self.thread, self.detail, self.from, self.to, self.thread
        )
    }
}

/// The files to add for the window `(lo, hi]`, in (thread, sequence)
/// order, from the current incarnation's logs only.
pub fn select(catalogue: &LogCatalogue, lo: u64, hi: u64) -> Result<Vec<LogFile>, MissingRedo> {
    let want_from = lo.saturating_add(1);
    let current = &catalogue.current;
    if want_from < current.resetlogs_scn {
        return Err(MissingRedo {
            before_reset: true,
            thread: 0,
            from: want_from,
            to: current.resetlogs_scn - 1,
            detail: format!(
                "the database was opened with RESETLOGS at SCN {} ({}: flashback or incomplete recovery), and redo before that point belongs to an older incarnation, which sitesync does not mine. \
                 Changes committed before the reset and not yet read are in that incarnation's archived logs; if the other sites have them or they may be dropped, \
                 move the checkpoint to the reset point: `sitesync checkpoint reset --to-position oracle:{}#0@{}`",
                current.resetlogs_scn,
                current.resetlogs_time,
                current.resetlogs_scn,
                current.resetlogs_scn
            ),
        });
    }
    let mut threads: BTreeMap<u32, BTreeMap<u64, &LogFile>> = BTreeMap::new();
    for f in catalogue.current_files() {
        let seqs = threads.entry(f.thread).or_default();
        match seqs.get(&f.sequence) {
            Some(existing) if existing.archived => {}
            _ => {
                seqs.insert(f.sequence, f);
            }
        }
    }
    let mut out = Vec::new();
    for (thread, seqs) in threads {
        // The logs of this thread that hold any SCN of the window.
        let needed: Vec<&LogFile> = seqs
            .values()
            .copied()
            .filter(|f| f.first_scn <= hi && f.next_scn > want_from)
            .collect();
        let Some(first) = needed.first() else {
            // Nothing of this thread overlaps the window: either the thread
            // wrote nothing then (its logs are all before or after), or
            // every log covering the window is gone.
            let before = seqs.values().rev().find(|f| f.next_scn <= want_from);
            let after = seqs.values().find(|f| f.first_scn > hi);
            if let (None, Some(after)) = (before, after) {
                return Err(MissingRedo {
                    before_reset: false,
                    thread,
                    from: want_from,
                    to: after.first_scn.saturating_sub(1).min(hi),
                    detail: format!(
                        "the oldest log on disk is sequence {} from SCN {}",
                        after.sequence, after.first_scn
                    ),
                });
            }
            continue;
        };
        if first.first_scn > want_from {
            return Err(MissingRedo {
                before_reset: false,
                thread,
                from: want_from,
                to: first.first_scn - 1,
                detail: format!(
                    "the oldest log on disk is sequence {} from SCN {}",
                    first.sequence, first.first_scn
                ),
            });
        }
        for pair in needed.windows(2) {
            if pair[1].sequence != pair[0].sequence + 1 {
                return Err(MissingRedo {
                    before_reset: false,
                    thread,
                    from: pair[0].next_scn,
                    to: pair[1].first_scn.saturating_sub(1).max(pair[0].next_scn),
                    detail: format!(
                        "archived log sequences {}..{} are missing",
                        pair[0].sequence + 1,
                        pair[1].sequence - 1
                    ),
                });
            }
        }
        out.extend(needed.into_iter().cloned());
    }
    Ok(out)
}

/// One enabled redo thread (`V$THREAD`): the redo of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedoThread {
    pub thread: u32,
    /// `INSTANCE`: the instance that writes it (empty when unknown).
    pub instance: String,
    /// `STATUS`: `OPEN` or `CLOSED`.
    pub status: String,
    /// `ENABLED`: `PUBLIC` or `PRIVATE`.
    pub enabled: String,
}

impl RedoThread {
    /// From a row read as text: `THREAD#`, `INSTANCE`, `STATUS`, `ENABLED`.
    pub fn from_text(row: &[Option<String>]) -> RedoThread {
        let text = |i: usize| {
            row.get(i)
                .and_then(|c| c.as_deref())
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        RedoThread {
            thread: text(0).parse().unwrap_or(0),
            instance: text(1),
            status: text(2),
            enabled: text(3),
        }
    }
}

/// Whether sitesync can mine this database: one enabled redo thread.
///
/// With several (Oracle RAC), each instance's log writer writes its own
/// thread, and the commit sitesync makes before each window flushes only
/// the connected instance's. Another instance may hold an open
/// transaction's INSERT in its log buffer for up to 3 s, past the end of
/// the window that covers the INSERT's SCN; the COMMIT, read later, then
/// finds nothing buffered and the event is lost. Flushing every instance
/// (as Debezium's RAC flush strategy does, over one connection per node) is
/// not implemented, so such a database is refused with this message: a
/// documented limit.
pub fn single_redo_thread(threads: &[RedoThread]) -> Result<(), String> {
    if threads.len() <= 1 {
        return Ok(());
    }
    let named: Vec<String> = threads
        .iter()
        .map(|t| {
            let mut s = format!("thread {}", t.thread);
            let details: Vec<&str> = [t.instance.as_str(), t.status.as_str(), t.enabled.as_str()]
                .into_iter()
                .filter(|d| !d.is_empty())
                .collect();
            if !details.is_empty() {
                s.push_str(&format!(" ({})", details.join(", ")));
            }
            s
        })
        .collect();
    Err(format!(
        "the database has {} enabled redo threads ({}): it is a RAC database, or was one. sitesync does not mine more than one redo thread, a documented limit (docs/engines/oracle.md): \
         before each window it flushes the connected instance's log writer only, and another instance's redo can reach disk after the window that covers it, losing events. \
         Run sitesync against a single-instance database; if the extra threads are left over from a former RAC, a DBA disables them (ALTER DATABASE DISABLE THREAD n) and `sitesync check` passes",
        threads.len(),
        named.join(", ")
    ))
}

/// Adaptive window width, in SCNs.
///
/// A window that returns more rows than `target_rows` halves the width
/// (down to `min`); one that returns fewer than a quarter of it while
/// behind the database's current SCN doubles it (up to `max`). Idle, the
/// width does not matter: the window ends at the current SCN.
#[derive(Debug, Clone)]
pub struct WindowSizer {
    pub min: u64,
    pub max: u64,
    pub target_rows: usize,
    width: u64,
}

impl WindowSizer {
    pub fn new(min: u64, max: u64, target_rows: usize) -> WindowSizer {
        let min = min.max(1);
        let max = max.max(min);
        WindowSizer {
            min,
            max,
            target_rows: target_rows.max(1),
            width: (min.saturating_mul(10)).clamp(min, max),
        }
    }

    pub fn width(&self) -> u64 {
        self.width
    }

    /// The next window after `lo`: `(lo, hi]`, `hi` at most `current`.
    /// `None` when there is nothing new to read.
    pub fn next(&self, lo: u64, current: u64) -> Option<(u64, u64)> {
        (current > lo).then(|| (lo, lo.saturating_add(self.width).min(current)))
    }

    /// Adjusts after a window that returned `rows` rows; `caught_up` when it
    /// ended at the current SCN.
    pub fn record(&mut self, rows: usize, caught_up: bool) {
        if rows > self.target_rows {
            self.width = (self.width / 2).max(self.min);
        } else if !caught_up && rows < self.target_rows / 4 {
            self.width = self.width.saturating_mul(2).min(self.max);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn log(seq: u64, first: u64, next: u64, archived: bool) -> LogFile {
        LogFile {
            name: format!("/u01/{}/{seq}.log", if archived { "arch" } else { "redo" }),
            thread: 1,
            sequence: seq,
            first_scn: first,
            next_scn: next,
            archived,
            incarnation: Incarnation::default(),
        }
    }

    fn cat(files: &[LogFile]) -> LogCatalogue {
        LogCatalogue {
            current: Incarnation::default(),
            files: files.to_vec(),
        }
    }

    fn names(files: &[LogFile]) -> Vec<String> {
        files.iter().map(|f| f.name.clone()).collect()
    }

    #[test]
    fn picks_the_logs_overlapping_the_window_archived_first() {
        let files = vec![
            log(10, 100, 200, true),
            log(11, 200, 300, true),
            log(11, 200, 300, false),
            log(12, 300, u64::MAX, false),
            log(9, 0, 100, true),
        ];
        assert_eq!(
            names(&select(&cat(&files), 150, 250).unwrap()),
            vec!["/u01/arch/10.log", "/u01/arch/11.log"]
        );
        assert_eq!(
            names(&select(&cat(&files), 250, 1000).unwrap()),
            vec!["/u01/arch/11.log", "/u01/redo/12.log"]
        );
        // (199, 200]: SCN 200 is in sequence 11 only.
        assert_eq!(
            names(&select(&cat(&files), 199, 200).unwrap()),
            vec!["/u01/arch/11.log"]
        );
        // (99, 100]: SCN 100 starts sequence 10.
        assert_eq!(
            names(&select(&cat(&files), 99, 100).unwrap()),
            vec!["/u01/arch/10.log"]
        );
    }

    #[test]
    fn a_log_switch_is_a_window_over_two_logs() {
        let files = vec![log(11, 200, 300, false), log(12, 300, u64::MAX, false)];
        assert_eq!(select(&cat(&files), 290, 310).unwrap().len(), 2);
    }

    #[test]
    fn a_gone_archived_log_is_an_error_naming_the_scn_range() {
        let files = vec![log(12, 300, 400, true), log(13, 400, u64::MAX, false)];
        let e = select(&cat(&files), 150, 350).unwrap_err();
        assert_eq!((e.from, e.to), (151, 299));
        let m = e.message();
        assert!(m.contains("SCN 151..299"), "{m}");
        assert!(m.contains("RESTORE ARCHIVELOG"), "{m}");
        assert!(m.contains("checkpoint reset --to-latest"), "{m}");
        // The whole window before the oldest log.
        let e = select(&cat(&files), 150, 250).unwrap_err();
        assert_eq!((e.from, e.to), (151, 250));
    }

    #[test]
    fn a_hole_in_the_sequences_is_an_error() {
        let files = vec![
            log(10, 100, 200, true),
            log(12, 300, 400, true),
            log(13, 400, u64::MAX, false),
        ];
        let e = select(&cat(&files), 150, 350).unwrap_err();
        assert_eq!((e.from, e.to), (200, 299));
        assert!(e.detail.contains("11..11"), "{}", e.detail);
    }

    #[test]
    fn threads_are_checked_each_on_its_own() {
        let mut t2 = log(5, 120, u64::MAX, false);
        t2.thread = 2;
        let files = vec![log(10, 100, u64::MAX, false), t2];
        assert_eq!(select(&cat(&files), 150, 250).unwrap().len(), 2);
        let e = select(&cat(&files), 110, 250).unwrap_err();
        assert_eq!(e.thread, 2);
    }

    /// Two incarnations of thread 1: the old one ran to SCN 900; a
    /// flashback to SCN 450 and `OPEN RESETLOGS` started the current one
    /// at 451, with its sequences numbered from 1 again.
    pub(crate) fn two_incarnations() -> LogCatalogue {
        let old = Incarnation {
            resetlogs_scn: 1,
            resetlogs_time: "2026-01-01 00:00:00".into(),
        };
        let new = Incarnation {
            resetlogs_scn: 451,
            resetlogs_time: "2026-02-01 00:00:00".into(),
        };
        let file = |inc: &Incarnation, tag: &str, seq, first, next, archived| LogFile {
            name: format!("{tag}/{seq}"),
            thread: 1,
            sequence: seq,
            first_scn: first,
            next_scn: next,
            archived,
            incarnation: inc.clone(),
        };
        LogCatalogue {
            current: new.clone(),
            files: vec![
                file(&old, "old", 1, 1, 300, true),
                file(&old, "old", 2, 300, 600, true),
                file(&old, "old", 3, 600, 900, true),
                file(&new, "new", 1, 451, 700, true),
                file(&new, "new", 2, 700, u64::MAX, false),
            ],
        }
    }

    #[test]
    fn defect_6_an_older_incarnations_archived_log_is_never_selected() {
        let catalogue = two_incarnations();
        // Same thread and sequence in both incarnations: only the current
        // one's log is mined, never the older archived copy.
        assert_eq!(names(&select(&catalogue, 460, 520).unwrap()), vec!["new/1"]);
        // SCNs the older incarnation also used (600..900): the current
        // incarnation's logs, across its log switch.
        assert_eq!(
            names(&select(&catalogue, 650, 750).unwrap()),
            vec!["new/1", "new/2"]
        );
        // A window starting before the reset point cannot be mined from
        // the current incarnation: an operator error naming the fix, not
        // the older incarnation's redo.
        let e = select(&catalogue, 400, 500).unwrap_err();
        assert!(e.before_reset);
        assert_eq!((e.from, e.to), (401, 450));
        let m = e.message();
        assert!(m.contains("RESETLOGS at SCN 451"), "{m}");
        assert!(
            m.contains("checkpoint reset --to-position oracle:451#0@451"),
            "{m}"
        );
        assert!(!m.contains("RESTORE ARCHIVELOG"), "{m}");
    }

    #[test]
    fn windows_shrink_when_full_and_grow_when_behind_and_sparse() {
        let mut w = WindowSizer::new(1_000, 100_000, 10_000);
        assert_eq!(w.width(), 10_000);
        assert_eq!(w.next(500, 400), None);
        assert_eq!(w.next(500, 600), Some((500, 600)));
        assert_eq!(w.next(500, 1_000_000), Some((500, 10_500)));
        w.record(50_000, false);
        assert_eq!(w.width(), 5_000);
        for _ in 0..10 {
            w.record(50_000, false);
        }
        assert_eq!(w.width(), 1_000);
        w.record(10, true);
        assert_eq!(w.width(), 1_000, "caught up: no reason to grow");
        for _ in 0..20 {
            w.record(10, false);
        }
        assert_eq!(w.width(), 100_000);
    }
}
