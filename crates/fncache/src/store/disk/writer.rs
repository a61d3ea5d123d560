//! The writer thread: operations gather in a queue and are committed together (group commit),
//! with eviction under the cache's limit, in one transaction at a time.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use super::schema::{log_path, LOG_BUDGET};
use super::sql::{
    add_counters, add_evictions, entries, evict_within, keep_unreferenced, low_water, meta, put,
    put_members, remove_file_value, remove_key, remove_values, set_entries, set_meta, stored_limit,
    EvictionBudget, NewEntry, ValuesDir,
};
use super::{parked_counters, value_files};
use super::{BUSY_TIMEOUT, MIN_EVICTIONS_PER_COMMIT};
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;
use crate::store::{Eviction, MappedFile, Member, StoreError, StoredEntry};

pub(super) type Pending = Arc<Mutex<HashMap<KeyId, (Digest, Link, StoredEntry)>>>;

pub(super) struct Writer {
    pub(super) queue: Arc<Queue>,
    /// `None` when the thread could not be started: the queue is closed, and every write is
    /// refused.
    pub(super) thread: Option<JoinHandle<()>>,
}

pub(super) enum Op {
    Put {
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: StoredEntry,
    },
    /// A compile's pack, in its file, and the values kept in it ([`put_members`]).
    PutPack {
        key: KeyId,
        link: Link,
        digest: Digest,
        header: Arc<[u8]>,
        file: Arc<MappedFile>,
        members: Vec<Member>,
    },
    Touch(KeyId),
    RemoveKey(KeyId),
    /// A key whose value was found damaged: the key, and every key sharing its value's file.
    RemoveDamaged(KeyId, Digest),
    RemoveValue(Digest),
    Record(Counters),
    Flush(SyncSender<Result<(), StoreError>>),
    /// Commit now, without an answer, and cut the log past its budget ([`Store::commit_soon`]).
    ///
    /// [`Store::commit_soon`]: crate::store::Store::commit_soon
    CommitSoon,
    Evict(u64, SyncSender<Result<Eviction, StoreError>>),
    Clear(SyncSender<Result<(), StoreError>>),
}

pub(super) struct WriterState {
    pub(super) conn: Connection,
    pub(super) dir: PathBuf,
    /// Bytes on disk (database, log, value files) per accounted byte, measured after each
    /// eviction: SQLite's pages hold rows with slack, so the accounted total alone would let
    /// the directory grow past the limit. Eviction keeps the accounted bytes times this under
    /// the limit. Measured only once the cache is near its limit: it lists every value file,
    /// which no process should pay for at open.
    pub(super) disk_ratio: Option<f64>,
    pub(super) touch_floor: Arc<std::sync::atomic::AtomicI64>,
    pub(super) db_path: PathBuf,
    pub(super) shared: bool,
    pub(super) pending: Pending,
    pub(super) warned: AtomicBool,
    /// The connection runs without `fsync`s ([`WriterState::set_unsynced`]).
    pub(super) unsynced: bool,
}

/// How long the writer lets operations gather before it commits them (group commit), unless
/// someone waits for it (`flush`, `evict_to`, `clear`). Every commit writes again the index
/// leaves its random keys land in, and every thousand pages of log SQLite checkpoints with two
/// `fsync`s, all on the two cores the compile needs: 100 ms rather than 20 made sql.js edits
/// 7% faster end to end and its empty-cache compile 5% (paired medians, docs/performance.md),
/// while another process still sees new entries within a tenth of a second.
pub(super) const GROUP_COMMIT: Duration = Duration::from_millis(100);

/// Operations waiting for the writer. Pushing wakes the writer only when the queue was empty
/// or someone waits for an answer: a compile's thousands of puts and touches cost a lock and a
/// vector push each, not a thread wake-up and a transaction each.
#[derive(Default)]
pub(super) struct Queue {
    ops: Mutex<Vec<Op>>,
    ready: parking_lot::Condvar,
    closed: AtomicBool,
}

impl Queue {
    pub(super) fn push(&self, op: Op) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::WriterGone);
        }
        let mut ops = self.ops.lock();
        let wake = ops.is_empty() || op.is_awaited();
        ops.push(op);
        drop(ops);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _guard = self.ops.lock();
        self.ready.notify_one();
    }

    /// The next batch, after letting it gather; `None` once closed and drained.
    fn next_batch(&self) -> Option<Vec<Op>> {
        let mut ops = self.ops.lock();
        while ops.is_empty() {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            self.ready.wait(&mut ops);
        }
        let deadline = Instant::now() + GROUP_COMMIT;
        while !self.closed.load(Ordering::Acquire) && !ops.iter().any(Op::is_awaited) {
            if self.ready.wait_until(&mut ops, deadline).timed_out() {
                break;
            }
        }
        Some(std::mem::take(&mut *ops))
    }
}

/// Stores what a [`Op::Put`] or an [`Op::PutPack`] hands over (see [`put`] and
/// [`put_members`]); returns the accounted bytes and the rows added.
fn put_op(
    tx: &Transaction<'_>,
    values: ValuesDir<'_>,
    op: &Op,
    clock: i64,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, i64)> {
    match op {
        Op::Put {
            key,
            link,
            digest,
            entry,
        } => {
            let new = NewEntry {
                key,
                link,
                digest,
                entry,
            };
            put(tx, values, new, clock, unlink)
        }
        Op::PutPack {
            key,
            link,
            digest,
            header,
            file,
            members,
        } => {
            let entry = StoredEntry::Split {
                header: header.clone(),
                body: file.clone(),
            };
            let new = NewEntry {
                key,
                link,
                digest,
                entry: &entry,
            };
            let (added, rows) = put(tx, values, new, clock, unlink)?;
            let (members_added, member_rows) =
                put_members(tx, values, (digest, file), members, clock, unlink)?;
            Ok((added + members_added, rows + member_rows))
        }
        _ => Ok((0, 0)),
    }
}

/// The sum of `ops`' counters if they are all counter records.
fn only_counters(ops: &[Op]) -> Option<Counters> {
    let mut total = Counters::default();
    for op in ops {
        match op {
            Op::Record(delta) => total.add(delta),
            _ => return None,
        }
    }
    Some(total)
}

/// The writer of a store whose connection could not be opened (on its own thread, after the
/// store was): one warning, then every operation refused, as a failed commit would be.
pub(super) fn refuse_all(queue: &Queue, pending: &Pending, error: &StoreError) {
    log::warn!("cannot write to the cache ({error}); compiling without storing results");
    while let Some(batch) = queue.next_batch() {
        pending.lock().clear(); // nothing that waits would ever be written
        let refused = || StoreError::Unusable(error.to_string());
        for op in batch {
            match op {
                Op::Flush(reply) | Op::Clear(reply) => {
                    let _ = reply.send(Err(refused()));
                }
                Op::Evict(_, reply) => {
                    let _ = reply.send(Err(refused()));
                }
                _ => {}
            }
        }
    }
}

impl Op {
    /// Whether the writer acts on this at once rather than after the group-commit window: a
    /// caller is blocked waiting for its answer, or asked for it now (`CommitSoon`).
    fn is_awaited(&self) -> bool {
        matches!(
            self,
            Op::Flush(_) | Op::CommitSoon | Op::Evict(..) | Op::Clear(_)
        )
    }
}

impl WriterState {
    pub(super) fn run(mut self, queue: &Queue) {
        while let Some(batch) = queue.next_batch() {
            self.apply(batch);
        }
    }

    fn db_error(&self, cause: rusqlite::Error) -> StoreError {
        StoreError::Database {
            path: self.db_path.clone(),
            cause,
        }
    }

    fn apply(&mut self, batch: Vec<Op>) {
        let mut data = Vec::new();
        let mut control = Vec::new();
        for op in batch {
            match op {
                Op::Flush(_) | Op::CommitSoon | Op::Evict(..) | Op::Clear(_) => control.push(op),
                _ => data.push(op),
            }
        }
        let committed = if data.is_empty() {
            Ok(())
        } else if let Some(counters) = only_counters(&data) {
            // Nothing but counters (a process that only read): parked in a file rather than
            // a transaction that would create the log and `fsync` three times.
            if counters.is_zero() {
                Ok(())
            } else {
                match parked_counters::park(&self.dir, &counters, self.shared) {
                    Ok(()) => Ok(()),
                    Err(error) => {
                        log::debug!("counters not parked ({error}); committing them");
                        self.commit(&data)
                    }
                }
            }
        } else {
            let committed = self.commit(&data);
            if committed.is_ok() {
                // Cut as soon as the log is past its budget, while the compile still runs:
                // the checkpoint's `fsync`s are waited for on this thread, beside the
                // compile, instead of in the flush at its end (a sql.js edit's flush: 8.2 to
                // 5.3 ms, end to end paired 0.991 over 60 interleaved runs).
                self.cut_log_past_budget();
            }
            committed
        };
        if let Err(error) = &committed {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "cannot write to the cache ({error}); compiling without storing results"
                );
            }
        }
        // Committed or not, these values are no longer waiting: a failed write is a miss later.
        {
            let mut pending = self.pending.lock();
            let mut done = |key: &KeyId, digest: &Digest| {
                if pending.get(key).is_some_and(|(d, _, _)| d == digest) {
                    pending.remove(key);
                }
            };
            for op in &data {
                match op {
                    Op::Put { key, digest, .. } => done(key, digest),
                    Op::PutPack {
                        key,
                        digest,
                        members,
                        ..
                    } => {
                        done(key, digest);
                        for member in members {
                            done(&member.key, &member.digest);
                        }
                    }
                    _ => {}
                }
            }
        }
        for op in control {
            match op {
                Op::Flush(reply) => {
                    let result = match &committed {
                        Ok(()) => {
                            self.cut_log_past_budget();
                            Ok(())
                        }
                        Err(e) => Err(StoreError::Unusable(e.to_string())),
                    };
                    let _ = reply.send(result);
                }
                Op::CommitSoon => {
                    if committed.is_ok() {
                        self.cut_log_past_budget();
                    }
                }
                Op::Evict(max_bytes, reply) => {
                    let _ = reply.send(self.evict(max_bytes));
                }
                Op::Clear(reply) => {
                    let _ = reply.send(self.clear());
                }
                _ => unreachable!("data ops were split off above"),
            }
        }
    }

    /// Leaves the write-ahead log in place for the next process while it is within
    /// [`LOG_BUDGET`] (schema.rs, [`keep_log_on_close`](super::schema::keep_log_on_close)): a
    /// small compile's flush then makes no checkpoint and no `fsync`. A longer log is copied
    /// into the database and cut to nothing (`TRUNCATE`), without waiting: if another process
    /// is reading or writing it, as much as it allows is copied, and the log is cut by a later
    /// flush. A flush does this so that a cache at rest holds at most the budget in its log.
    fn cut_log_past_budget(&mut self) {
        let log_bytes = fs::symlink_metadata(log_path(&self.db_path)).map_or(0, |m| m.len());
        if log_bytes <= LOG_BUDGET || !self.synced() {
            return;
        }
        let _ = self.conn.busy_timeout(Duration::ZERO);
        let checkpointed = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok((row.get::<_, i64>(0)? != 0, row.get::<_, i64>(1)?))
            });
        let _ = self.conn.busy_timeout(BUSY_TIMEOUT);
        match checkpointed {
            Ok((true, _)) => {
                log::debug!("log of {log_bytes} bytes not cut: another process uses it")
            }
            Ok(_) => {}
            Err(error) => log::debug!("checkpoint skipped: {error}"),
        }
    }

    /// Copies the write-ahead log into the database as far as no reader needs it
    /// (`PASSIVE`: never waits for another process).
    fn checkpoint(&mut self) {
        if !self.synced() {
            return;
        }
        let checkpointed = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
            });
        match checkpointed {
            Ok((log, copied)) if copied < log => {
                log::debug!(
                    "checkpoint: {copied} of {log} log pages copied; a reader holds the rest"
                )
            }
            Ok(_) => {}
            Err(error) => log::debug!("checkpoint skipped: {error}"),
        }
    }

    /// Runs `body` in one `BEGIN IMMEDIATE` transaction: committed whole, or rolled back.
    fn in_transaction<T>(
        &mut self,
        body: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = self.db_path.clone();
        let db_error = |cause| StoreError::Database {
            path: path.clone(),
            cause,
        };
        if self.unsynced {
            self.set_unsynced(false).map_err(db_error)?;
        }
        // The safety level may not change inside a transaction, so the log is looked at
        // before it, and again once the write lock is held: only then can no other process
        // have started the log in between.
        let starts_log = log_is_empty(&path)
            && match self.set_unsynced(true) {
                Ok(()) => true,
                Err(_) => {
                    self.set_unsynced(false).map_err(db_error)?;
                    false
                }
            };
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate);
        if starts_log && tx.is_ok() && !log_is_empty(&path) {
            drop(tx); // rolls back what has not begun
            self.set_unsynced(false).map_err(db_error)?;
            tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate);
        }
        let committed = tx.and_then(|tx| {
            let value = body(&tx)?; // dropping `tx` rolls back
            tx.commit()?;
            Ok(value)
        });
        if self.unsynced {
            // Should this fail, `unsynced` stays set: no checkpoint runs, and the next
            // transaction tries again before it begins.
            self.set_unsynced(false).map_err(db_error)?;
        }
        committed.map_err(db_error)
    }

    /// Turns the `fsync`s of the next transaction off (`off` true), or back on.
    ///
    /// A commit that starts the log `fsync`s its header before any frame: on two cores and a
    /// real disk, 1-12 ms that a short process waits for at its flush (docs/performance.md,
    /// "A new log without its header's fsync"). That `fsync` guards a log being reused: were
    /// the new header and frames written out of order before a power cut, old frames could be
    /// replayed over newer pages (SQLite's ticket ff5be73dee). An empty log has no old frames
    /// in place (docs/design.md, "A new log's header is not `fsync`ed", says why), so the
    /// transaction that starts it runs at `synchronous = OFF`; at the usual `NORMAL` a commit
    /// makes no other `fsync` in WAL mode. A checkpoint without `fsync`s
    /// would not be safe, so the automatic one is off meanwhile (the next commit runs it if
    /// the log has grown past it), and the others wait for [`WriterState::synced`].
    fn set_unsynced(&mut self, off: bool) -> rusqlite::Result<()> {
        if off {
            self.unsynced = true;
            self.conn
                .execute_batch("PRAGMA synchronous = OFF; PRAGMA wal_autocheckpoint = 0")
        } else {
            self.conn.execute_batch(&format!(
                "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}"
            ))?;
            self.unsynced = false;
            Ok(())
        }
    }

    /// Whether a checkpoint may run: the connection `fsync`s as usual.
    fn synced(&mut self) -> bool {
        !self.unsynced || self.set_unsynced(false).is_ok()
    }

    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let known_ratio = self.disk_ratio;
        let mut measured_ratio = None;
        let (dir, db_path) = (self.dir.clone(), self.db_path.clone());
        let shared = self.shared;
        let mut unlink = Vec::new();
        let evicted = self.in_transaction(|tx| {
            // The limit is the cache's, read in the transaction: a process that was started
            // with another one does not evict down to it.
            let max_bytes = stored_limit(tx)?;
            let mut bytes = meta(tx, "bytes")?;
            let mut clock = meta(tx, "clock")?;
            let mut entries = entries(tx)?;
            let mut added_bytes = 0;
            let mut counters = Counters::default();
            // Values to remove by digest, gathered so that one pass over the keys finds them
            // all (see `remove_values`); removed before a later put could store them again.
            let mut doomed = HashSet::new();
            for op in ops {
                match op {
                    Op::Put { .. } | Op::PutPack { .. } => {
                        if !doomed.is_empty() {
                            let doomed = std::mem::take(&mut doomed);
                            let (freed, removed) = remove_values(tx, &doomed, &mut unlink)?;
                            bytes -= freed;
                            entries -= removed;
                        }
                        clock += 1;
                        let values = ValuesDir { dir: &dir, shared };
                        let (added, rows) = put_op(tx, values, op, clock, &mut unlink)?;
                        bytes += added;
                        added_bytes += added;
                        entries += rows;
                    }
                    Op::Touch(key) => {
                        clock += 1;
                        tx.prepare_cached("UPDATE entries SET last_used = ?1 WHERE key = ?2")?
                            .execute(params![clock, key.0.as_bytes()])?;
                    }
                    Op::RemoveKey(key) => {
                        let (freed, removed) = remove_key(tx, key, &mut unlink)?;
                        bytes -= freed;
                        entries -= i64::from(removed);
                    }
                    Op::RemoveDamaged(key, digest) => {
                        let (freed, removed) = remove_key(tx, key, &mut unlink)?;
                        let (shared_freed, shared) = remove_file_value(tx, digest, &mut unlink)?;
                        bytes -= freed + shared_freed;
                        entries -= i64::from(removed) + shared;
                    }
                    Op::RemoveValue(digest) => {
                        doomed.insert(*digest);
                    }
                    Op::Record(delta) => counters.add(delta),
                    _ => {}
                }
            }
            let (freed, removed) = remove_values(tx, &doomed, &mut unlink)?;
            bytes -= freed;
            entries -= removed;
            let mut evicted = false;
            // The ratio is at most MAX_DISK_RATIO: below the limit by that much, it cannot matter.
            let ratio = match known_ratio {
                Some(ratio) => ratio,
                None if bytes as f64 * MAX_DISK_RATIO > max_bytes as f64 => *measured_ratio
                    .insert(disk_ratio(&dir, bytes, used_database_bytes(tx, &db_path)?)),
                None => 1.0,
            };
            if bytes as f64 * ratio > max_bytes as f64 {
                let target = (low_water(max_bytes) as f64 / ratio) as u64;
                let budget = EvictionBudget {
                    values: MIN_EVICTIONS_PER_COMMIT,
                    bytes: added_bytes,
                    under: (max_bytes as f64 / ratio) as i64,
                };
                let eviction = evict_within(tx, &mut bytes, target, Some(budget), &mut unlink)?;
                counters.evictions += eviction.entries;
                entries -= eviction.entries as i64;
                evicted = eviction.entries > 0;
            }
            // The values of a pack whose file goes (evicted, or removed) go with it.
            let (freed, removed) = keep_unreferenced(tx, &mut unlink)?;
            bytes -= freed;
            entries -= removed;
            counters.evictions += removed as u64;
            set_meta(tx, "bytes", bytes)?;
            set_meta(tx, "clock", clock)?;
            set_entries(tx, entries)?;
            // Counters that processes which only read parked in files, folded in here.
            counters.add(&parked_counters::fold(&dir));
            add_counters(tx, &counters)?;
            Ok((evicted, clock, entries, max_bytes))
        })?;
        let (evicted, clock, entries, max_bytes) = evicted;
        self.touch_floor
            .store(clock - entries.max(0) / 2, Ordering::Relaxed);
        if measured_ratio.is_some() {
            self.disk_ratio = measured_ratio;
        }
        self.unlink(&unlink);
        if evicted {
            // The next inserts take the freed pages before the file grows, so a full cache
            // keeps them rather than give them back and take them again: moving pages to the
            // freed ones took a third of an eviction's time. They are given back when the
            // directory is over the limit by more than `FREE_PAGE_SLACK` (a lowered limit),
            // and by `gc`.
            if resting_disk_bytes(&self.db_path, &self.dir)
                > max_bytes + max_bytes / FREE_PAGE_SLACK
            {
                self.vacuum();
            } else {
                self.checkpoint();
            }
            self.measure_disk_ratio();
        }
        Ok(())
    }

    /// Removes the files of values whose rows are gone: after the commit, so that a rolled
    /// back removal never leaves a row without its file.
    fn unlink(&self, digests: &[Digest]) {
        for digest in digests {
            value_files::remove(&self.dir, digest);
        }
    }

    /// Evicts until the cache takes at most `max_bytes` on disk: a few rounds, since what a
    /// round frees on disk is only known once the pages are given back.
    fn evict(&mut self, max_bytes: u64) -> Result<Eviction, StoreError> {
        let mut total = self.forget_lost_files()?;
        for _ in 0..4 {
            let ratio = self.measured_disk_ratio();
            let mut unlink = Vec::new();
            let eviction = self.in_transaction(|tx| {
                let mut bytes = meta(tx, "bytes")?;
                let before = entries(tx)?; // counted before any row goes, if it must be
                let target = (max_bytes as f64 / ratio) as u64;
                let mut eviction = evict_within(tx, &mut bytes, target, None, &mut unlink)?;
                let (freed, removed) = keep_unreferenced(tx, &mut unlink)?;
                bytes -= freed;
                eviction.entries += removed as u64;
                eviction.bytes += freed.max(0) as u64;
                set_meta(tx, "bytes", bytes)?;
                set_entries(tx, before - eviction.entries as i64)?;
                add_evictions(tx, eviction.entries)?;
                Ok(eviction)
            })?;
            self.unlink(&unlink);
            total.entries += eviction.entries;
            total.bytes += eviction.bytes;
            self.sweep_value_files();
            self.vacuum_now();
            self.measure_disk_ratio();
            if eviction.entries == 0 || resting_disk_bytes(&self.db_path, &self.dir) <= max_bytes {
                break;
            }
        }
        Ok(total)
    }

    /// Removes the rows of values whose files are gone (removed by [`make_room`] on a full
    /// disk, or by hand), so that they stop costing a miss and count no more toward the limit.
    fn forget_lost_files(&mut self) -> Result<Eviction, StoreError> {
        let dir = self.dir.clone();
        let mut unlink = Vec::new();
        let lost = self.in_transaction(|tx| {
            let digests: Vec<Digest> = tx
                .prepare("SELECT DISTINCT digest FROM entries WHERE in_file")?
                .query_map([], |row| row.get::<_, Vec<u8>>(0))?
                .filter_map(|r| r.map(|d| Digest::from_slice(&d)).transpose())
                .collect::<rusqlite::Result<_>>()?;
            let mut bytes = meta(tx, "bytes")?;
            let before = entries(tx)?; // counted before any row goes, if it must be
            let mut lost = Eviction::default();
            for digest in digests {
                if fs::symlink_metadata(value_files::path(&dir, &digest)).is_err() {
                    let (freed, removed) = remove_file_value(tx, &digest, &mut unlink)?;
                    bytes -= freed;
                    lost.entries += removed as u64;
                    lost.bytes += freed.max(0) as u64;
                }
            }
            // The values kept in a lost pack's file are lost with it, whether its row was
            // just removed or went before (another process unlinked the file after this one
            // stored a value of it).
            let packs: Vec<Digest> = tx
                .prepare("SELECT DISTINCT pack FROM entries WHERE pack IS NOT NULL")?
                .query_map([], |row| row.get::<_, Vec<u8>>(0))?
                .filter_map(|r| r.map(|d| Digest::from_slice(&d)).transpose())
                .collect::<rusqlite::Result<_>>()?;
            for pack in packs {
                if fs::symlink_metadata(value_files::path(&dir, &pack)).is_err() {
                    unlink.push(pack);
                }
            }
            let (freed, removed) = keep_unreferenced(tx, &mut unlink)?;
            bytes -= freed;
            lost.entries += removed as u64;
            lost.bytes += freed.max(0) as u64;
            set_meta(tx, "bytes", bytes)?;
            set_entries(tx, before - lost.entries as i64)?;
            add_evictions(tx, lost.entries)?;
            Ok(lost)
        })?;
        Ok(lost)
    }

    /// Removes value files that no row refers to: left by a process killed between its commit
    /// and its unlink, or by a put whose transaction rolled back. Inside a write transaction:
    /// a writer writes a value's file only while it holds the write lock, so no file can be
    /// between its write and its row's commit while the sweep lists and removes.
    fn sweep_value_files(&mut self) {
        let dir = self.dir.clone();
        let swept = self.in_transaction(|tx| {
            let in_files: HashSet<Digest> = tx
                .prepare("SELECT digest FROM entries WHERE in_file")?
                .query_map([], |row| row.get::<_, Vec<u8>>(0))?
                .filter_map(|r| r.map(|d| Digest::from_slice(&d)).transpose())
                .collect::<rusqlite::Result<_>>()?;
            Ok(value_files::sweep(&dir, &|d| in_files.contains(d)))
        });
        match swept {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::debug!("cannot sweep value files: {e}"),
            Err(e) => log::debug!("cannot list value files: {e}"),
        }
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "BEGIN IMMEDIATE;
                 DELETE FROM entries; DELETE FROM blob_data;
                 UPDATE meta SET value = 0 WHERE name IN ('bytes', 'entries');
                 COMMIT;",
            )
            .map_err(|e| self.db_error(e))?;
        value_files::remove_all(&self.dir).map_err(|cause| StoreError::Io {
            path: self.dir.join(value_files::VALUES_DIR),
            cause,
        })?;
        self.vacuum();
        Ok(())
    }

    /// Measures [`WriterState::disk_ratio`].
    fn measure_disk_ratio(&mut self) {
        let accounted = self
            .conn
            .query_row("SELECT value FROM meta WHERE name = 'bytes'", [], |row| {
                row.get::<_, i64>(0)
            })
            .unwrap_or(0);
        let Ok(database) = used_database_bytes(&self.conn, &self.db_path) else {
            return; // measured by the next commit that needs it
        };
        self.disk_ratio = Some(disk_ratio(&self.dir, accounted, database));
    }

    /// [`WriterState::disk_ratio`], measured now if it is not known yet.
    fn measured_disk_ratio(&mut self) -> f64 {
        if self.disk_ratio.is_none() {
            self.measure_disk_ratio();
        }
        self.disk_ratio.unwrap_or(1.0)
    }

    /// Gives freed pages back to the file system, so that eviction shrinks the file.
    fn vacuum(&mut self) {
        self.give_back_pages("PRAGMA wal_checkpoint(PASSIVE)");
    }

    /// [`WriterState::vacuum`], then a checkpoint that waits for readers, so that the file has
    /// its new size at once (for `gc`, which measures it; a compile never waits for this).
    fn vacuum_now(&mut self) {
        self.give_back_pages("PRAGMA wal_checkpoint(TRUNCATE)");
    }

    fn give_back_pages(&mut self, checkpoint: &str) {
        if !self.synced() {
            return;
        }
        // incremental_vacuum frees one page per step: it must be stepped to the end (one
        // `execute_batch` step freed a single page, and the file never shrank).
        let vacuumed = self
            .conn
            .prepare("PRAGMA incremental_vacuum")
            .and_then(|mut stmt| {
                let mut rows = stmt.query([])?;
                while rows.next()?.is_some() {}
                Ok(())
            });
        let checkpointed = vacuumed.and_then(|()| self.conn.query_row(checkpoint, [], |_| Ok(())));
        if let Err(e) = checkpointed {
            log::debug!("incremental vacuum failed: {e}");
        }
    }
}

/// A full cache holds about one commit's freed pages at any time, and its directory sits at
/// the limit: giving them back whenever it was over the limit at all ran `incremental_vacuum`
/// after nearly every commit of a compile into a full cache (7-18 ms each). They are given
/// back once they take the directory over the limit by more than a 1/32 of it (32 MiB of the
/// default 1 GiB; within the limit's tolerance, docs/design.md).
const FREE_PAGE_SLACK: u64 = 32;

/// The most bytes on disk that one accounted byte is taken to cost: a bound on the measured
/// ratio, so that a cache of odd files cannot make eviction empty it.
const MAX_DISK_RATIO: f64 = 4.0;

/// Bytes on disk per accounted byte (see [`WriterState::disk_ratio`]), between 1 and
/// [`MAX_DISK_RATIO`], from the database's pages in use (`database`, in bytes) and the value
/// files in `dir`.
fn disk_ratio(dir: &Path, accounted: i64, database: u64) -> f64 {
    // Below this, the fixed size of an empty database says nothing about page slack.
    if accounted < 64 << 10 {
        return 1.0;
    }
    let used = database + value_files::total_bytes(dir);
    (used as f64 / accounted as f64).clamp(1.0, MAX_DISK_RATIO)
}

/// The bytes the database takes on disk, its free pages left out (they are what the next
/// inserts take before the file grows): the larger of its pages in use as `conn` sees them,
/// those still in the log included (which the file has only once the log is copied into it),
/// and the blocks of its file, which the file system may have allocated ahead of the pages.
/// (Measured from the file alone, the ratio read about 1.0 when commits made during a compile
/// had not been copied yet, and eviction left the directory 2.5% over the limit's tolerance.)
fn used_database_bytes(conn: &Connection, db_path: &Path) -> rusqlite::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let (pages, free): (i64, i64) = conn.query_row(
        "SELECT (page_count - freelist_count) * page_size, freelist_count * page_size \
         FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let file = fs::symlink_metadata(db_path).map_or(0, |m| m.blocks() * 512);
    Ok((pages.max(0) as u64).max(file.saturating_sub(free.max(0) as u64)))
}

/// What the cache takes on disk once no process has it open: the database and the value
/// files. The log is left out: a flush cuts it back to at most [`LOG_BUDGET`] (inside the
/// limit's tolerance), and while processes run it is theirs.
fn resting_disk_bytes(db_path: &Path, dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let database = fs::symlink_metadata(db_path).map_or(0, |m| m.blocks() * 512);
    database + value_files::total_bytes(dir)
}

/// Whether the write-ahead log at `db_path` is empty, so that the next commit starts it.
fn log_is_empty(db_path: &Path) -> bool {
    match fs::symlink_metadata(log_path(db_path)) {
        Ok(meta) => meta.len() == 0,
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

/// SQLite's default: a commit that leaves this many pages of log checkpoints it.
const AUTOCHECKPOINT_PAGES: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    /// The database's size for the limit counts the pages a commit left in the log, which the
    /// file has only once the log is copied into it: eviction measured from the file left a
    /// cache over the limit when a compile's commits had not been copied yet.
    #[test]
    fn the_database_is_measured_with_the_pages_still_in_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fncache.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (b BLOB);",
        )
        .unwrap();
        conn.execute("INSERT INTO t VALUES (zeroblob(1000000))", [])
            .unwrap();
        let file = fs::metadata(&path).unwrap().len();
        assert!(file < 100_000, "the pages are still in the log: {file}");
        let measured = used_database_bytes(&conn, &path).unwrap();
        assert!(measured >= 1_000_000, "{measured}");
        let ratio = disk_ratio(dir.path(), 1_000_000, measured);
        assert!((1.0..1.1).contains(&ratio), "{ratio}");
    }

    /// A writer whose connection could not be opened answers every flush with the error and
    /// forgets what waited to be written, instead of leaving callers blocked or served
    /// values that will never be stored.
    #[test]
    fn a_writer_without_a_connection_refuses_and_forgets() {
        let queue = Arc::new(Queue::default());
        let pending: Pending = Arc::default();
        let (key, digest) = (KeyId(Digest::of(b"key")), Digest::of(b"entry"));
        let entry = StoredEntry::Whole(Arc::from(&b"entry"[..]));
        let link = Link(Digest::of(b"link"));
        pending.lock().insert(key, (digest, link, entry.clone()));
        let thread = {
            let (queue, pending) = (queue.clone(), pending.clone());
            std::thread::spawn(move || {
                refuse_all(
                    &queue,
                    &pending,
                    &StoreError::Unusable("no connection".into()),
                )
            })
        };
        queue
            .push(Op::Put {
                key,
                link,
                digest,
                entry,
            })
            .unwrap();
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        queue.push(Op::Flush(reply)).unwrap();
        let error = answer
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap_err();
        assert!(error.to_string().contains("no connection"), "{error}");
        assert!(pending.lock().is_empty());
        queue.close();
        thread.join().unwrap();
    }

    /// Only the transaction that starts the log runs without `fsync`s, and the connection is
    /// back at its usual level, automatic checkpoints included, once it has committed.
    #[test]
    fn only_the_transaction_that_starts_the_log_skips_its_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("fncache.db");
        let conn = Connection::open(&db_path).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch("PRAGMA synchronous = NORMAL").unwrap();
        let mut state = WriterState {
            conn,
            dir: dir.path().to_owned(),
            disk_ratio: None,
            touch_floor: Arc::default(),
            db_path: db_path.clone(),
            shared: false,
            pending: Arc::default(),
            warned: AtomicBool::new(false),
            unsynced: false,
        };
        let level_inside = |state: &mut WriterState, sql: &str| {
            state
                .in_transaction(|tx| {
                    tx.execute_batch(sql)?;
                    tx.query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0))
                })
                .unwrap()
        };
        let settings = |state: &WriterState| {
            let synchronous: i64 = state
                .conn
                .query_row("PRAGMA synchronous", [], |row| row.get(0))
                .unwrap();
            let autocheckpoint: i64 = state
                .conn
                .query_row("PRAGMA wal_autocheckpoint", [], |row| row.get(0))
                .unwrap();
            (synchronous, autocheckpoint, state.unsynced)
        };
        assert!(log_is_empty(&db_path));
        assert_eq!(level_inside(&mut state, "CREATE TABLE t (x)"), 0, "OFF");
        assert!(!log_is_empty(&db_path));
        assert_eq!(settings(&state), (1, 1000, false), "NORMAL again");
        assert_eq!(level_inside(&mut state, "INSERT INTO t VALUES (1)"), 1);
        // Cut to nothing, the log is started again by the next transaction.
        state
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        assert!(log_is_empty(&db_path));
        assert_eq!(level_inside(&mut state, "INSERT INTO t VALUES (2)"), 0);
        assert_eq!(settings(&state), (1, 1000, false));
        // A log another process started is not this transaction's to start.
        let other = Connection::open(&db_path).unwrap();
        state
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        assert!(log_is_empty(&db_path));
        other.execute_batch("INSERT INTO t VALUES (3)").unwrap();
        assert_eq!(level_inside(&mut state, "INSERT INTO t VALUES (4)"), 1);
        assert_eq!(settings(&state), (1, 1000, false));
    }
}
