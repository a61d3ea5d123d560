//! The statements the writer's transactions run: storing, removing and evicting values, and
//! the counters kept in `meta`.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension, Transaction};

use super::value_files::{self, FILE_THRESHOLD};
use super::{DB_FILE, LOW_WATER_PERCENT};
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;
use crate::store::{Eviction, StoredEntry, KEY_OVERHEAD, VALUE_OVERHEAD};

/// A lookup: one search in the randomly keyed `entries`, one in `blob_data`, whose ids grow
/// with every insert.
/// A value of a pack (`pack` set) has no row in `blob_data`: its header and its offset in the
/// pack's file are in `within` ([`member_row`]).
pub(super) const GET_SQL: &str =
    "SELECT e.digest, coalesce(e.within, d.data), e.in_file, e.last_used, e.link, e.pack \
     FROM entries e LEFT JOIN blob_data d ON d.id = e.data_id WHERE e.key = ?1";

/// What `within` holds for a value of a pack: its entry header, then where its body starts in
/// the pack's file (u64, little endian).
pub(super) fn member_row(header: &[u8], offset: u64) -> Vec<u8> {
    [header, &offset.to_le_bytes()[..]].concat()
}

/// The header and the offset of a [`member_row`], if it is one.
pub(super) fn parse_member_row(stored: &[u8]) -> Option<(&[u8], u64)> {
    use crate::entry::HEADER_LEN;
    if stored.len() != HEADER_LEN + 8 {
        return None;
    }
    let (header, offset) = stored.split_at(HEADER_LEN);
    Some((header, u64::from_le_bytes(offset.try_into().ok()?)))
}

/// The cache's byte limit as stored in it (0, never set: the default).
pub(super) fn stored_limit(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    let stored = tx
        .prepare_cached("SELECT value FROM meta WHERE name = 'max_bytes'")?
        .query_row([], |row| row.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0);
    Ok(if stored > 0 {
        stored as u64
    } else {
        crate::config::DEFAULT_MAX_BYTES
    })
}

/// Bytes the cache in `dir` takes on disk: the database, its log and index, the value files.
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for suffix in ["", "-wal", "-shm"] {
        let path = dir.join(format!("{DB_FILE}{suffix}"));
        total += fs::symlink_metadata(path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
    }
    total + value_files::total_bytes(dir)
}

pub(super) fn low_water(max_bytes: u64) -> u64 {
    max_bytes / 100 * LOW_WATER_PERCENT
}

pub(super) fn meta(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
}

/// How many values the cache holds, kept in `meta` by every commit so that opening a cache
/// never counts its rows: a full cache (1 GiB) holds about half a million, and counting them
/// took 12-18 ms of every process, half a second on a cold page cache. A cache made before
/// the count was kept is counted once, by its next commit.
pub(super) fn entries(tx: &Transaction<'_>) -> rusqlite::Result<i64> {
    let kept = tx
        .prepare_cached("SELECT value FROM meta WHERE name = 'entries'")?
        .query_row([], |row| row.get(0))
        .optional()?;
    match kept {
        Some(entries) => Ok(entries),
        None => tx.query_row("SELECT COUNT(*) FROM entries", [], |row| row.get(0)),
    }
}

pub(super) fn set_entries(tx: &Transaction<'_>, entries: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta (name, value) VALUES ('entries', ?1) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )?
    .execute([entries.max(0)])?;
    Ok(())
}

pub(super) fn set_meta(tx: &Transaction<'_>, name: &str, value: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = ?2")?
        .execute(params![value, name])?;
    Ok(())
}

pub(super) fn add_counters(tx: &Transaction<'_>, counters: &Counters) -> rusqlite::Result<()> {
    for (name, value) in counters.named() {
        if value > 0 {
            // Inserted if missing: a cache made by an older fncache lacks the newer counters.
            tx.prepare_cached(
                "INSERT INTO meta (name, value) VALUES (?2, ?1) \
                 ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            )?
            .execute(params![value as i64, name])?;
        }
    }
    Ok(())
}

/// Where value files are written, and for whom (see [`value_files::write`]).
#[derive(Clone, Copy)]
pub(super) struct ValuesDir<'a> {
    pub(super) dir: &'a Path,
    pub(super) shared: bool,
}

/// Counts `entries` evictions in the cache's persistent counters.
pub(super) fn add_evictions(tx: &Transaction<'_>, entries: u64) -> rusqlite::Result<()> {
    add_counters(
        tx,
        &Counters {
            evictions: entries,
            ..Counters::default()
        },
    )
}

/// Bytes accounted for one row of `entries`: its value and its key.
fn accounted(size: i64) -> i64 {
    size + (VALUE_OVERHEAD + KEY_OVERHEAD) as i64
}

/// One value to store under one key, as [`Store::put`](crate::store::Store::put) takes it.
pub(super) struct NewEntry<'a> {
    pub(super) key: &'a KeyId,
    pub(super) link: &'a Link,
    pub(super) digest: &'a Digest,
    pub(super) entry: &'a StoredEntry,
}

/// Stores `new`, replacing what its key held; returns the accounted bytes added and the rows
/// added (0 or 1). A value of a pack is stored only if the pack's file is in place: it lives
/// as long as that file ([`keep_unreferenced`]), and one evicted meanwhile is not written
/// again for it.
pub(super) fn put(
    tx: &Transaction<'_>,
    values: ValuesDir<'_>,
    new: NewEntry<'_>,
    clock: i64,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, i64)> {
    let NewEntry {
        key,
        link,
        digest,
        entry,
    } = new;
    let (header, body) = entry.parts();
    let len = header.len() + body.len();
    // A split entry's body is in a file already, whatever its size (a compile's pack, whose
    // values lie in it); a whole one goes to a file from `FILE_THRESHOLD`.
    let in_file = match entry {
        StoredEntry::Split { .. } => true,
        StoredEntry::Within { .. } => false,
        StoredEntry::Whole(_) => len >= FILE_THRESHOLD,
    };
    let member;
    // The bytes kept in `blob_data`, the bytes accounted, and the pack's file if a member.
    let (stored, size, pack): (&[u8], usize, Option<&Digest>) = match entry {
        StoredEntry::Within {
            file_digest,
            offset,
            ..
        } => {
            if fs::symlink_metadata(value_files::path(values.dir, file_digest)).is_err() {
                return Ok((0, 0));
            }
            member = member_row(header, *offset);
            (&member[..], member.len(), Some(file_digest))
        }
        StoredEntry::Whole(entry) if !in_file => (&entry[..], len, None),
        _ => {
            // Before the row, so that a committed row always has its file (a file without a
            // row is an orphan that `gc` sweeps). A split entry's file was written by the
            // caller, and `body` maps it: written again only if it went missing since.
            let written = match entry {
                StoredEntry::Split { .. }
                    if fs::symlink_metadata(value_files::path(values.dir, digest)).is_ok() =>
                {
                    Ok(())
                }
                StoredEntry::Split { .. } => {
                    value_files::write_anew(values.dir, digest, &[body], values.shared)
                }
                _ => value_files::write(values.dir, digest, body, values.shared),
            };
            written.map_err(|e| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("cannot write the value file: {e}").into(),
                )
            })?;
            (header, len, None)
        }
    };
    // What the key holds now: digest, link, and the pack's file of a value kept in one.
    type Current = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);
    let current: Option<Current> = tx
        .prepare_cached("SELECT digest, link, pack FROM entries WHERE key = ?1")?
        .query_row([key.0.as_bytes()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let mut added = 0;
    let mut rows = 1;
    match current {
        Some((d, l, p))
            if d == digest.as_bytes()
                && l == link.as_bytes()
                && p.as_deref() == pack.map(|p| &p.as_bytes()[..]) =>
        {
            tx.prepare_cached("UPDATE entries SET last_used = ?1 WHERE key = ?2")?
                .execute(params![clock, key.0.as_bytes()])?;
            return Ok((0, 0));
        }
        Some(_) => {
            // A key that now points elsewhere (a false link rewritten, a value stored anew,
            // in another pack or on its own): the old row goes, with its bytes.
            let (freed, _) = remove_key(tx, key, unlink)?;
            added -= freed;
            rows = 0;
        }
        None => {}
    }
    if let Some(pack) = pack {
        insert_member(tx, key, link, digest, pack, stored, clock)?;
    } else {
        tx.prepare_cached("INSERT INTO blob_data (data) VALUES (?1)")?
            .execute([stored])?;
        let data_id = tx.last_insert_rowid();
        tx.prepare_cached(
            "INSERT INTO entries (key, link, digest, data_id, size, last_used, in_file) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            key.0.as_bytes(),
            link.as_bytes(),
            digest.as_bytes(),
            data_id,
            size as i64,
            clock,
            in_file,
        ])?;
    }
    added += accounted(size as i64);
    Ok((added, rows))
}

/// Inserts the row of a value of the pack `pack` (no row in `blob_data`: `within` holds its
/// header and offset), unless its key has a row; `false` then.
fn insert_member(
    tx: &Transaction<'_>,
    key: &KeyId,
    link: &Link,
    digest: &Digest,
    pack: &Digest,
    within: &[u8],
    clock: i64,
) -> rusqlite::Result<bool> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO entries \
             (key, link, digest, data_id, size, last_used, in_file, pack, within) \
             VALUES (?1, ?2, ?3, 0, ?4, ?5, 0, ?6, ?7) ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![
            key.0.as_bytes(),
            link.as_bytes(),
            digest.as_bytes(),
            within.len() as i64,
            clock,
            pack.as_bytes(),
            within,
        ])?;
    Ok(inserted == 1)
}

/// Stores the values of the pack whose file is named `pack`, each under its key, as [`put`]
/// would one by one, with one search per key where the key is new (nearly always: a compile
/// holds for its pack only values it made); returns the accounted bytes and the rows added.
/// Called once the pack's own row is in place, in the same transaction.
pub(super) fn put_members(
    tx: &Transaction<'_>,
    values: ValuesDir<'_>,
    pack: (&Digest, &Arc<super::MappedFile>),
    members: &[crate::store::Member],
    clock: i64,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, i64)> {
    let (mut added, mut rows) = (0, 0);
    for member in members {
        let within = member_row(&member.header, member.offset);
        if insert_member(
            tx,
            &member.key,
            &member.link,
            &member.digest,
            pack.0,
            &within,
            clock,
        )? {
            added += accounted(within.len() as i64);
            rows += 1;
            continue;
        }
        // The key has a row already: replaced, as `put` replaces one.
        let entry = StoredEntry::Within {
            header: member.header.clone(),
            file: pack.1.clone(),
            file_digest: *pack.0,
            offset: member.offset,
        };
        let new = NewEntry {
            key: &member.key,
            link: &member.link,
            digest: &member.digest,
            entry: &entry,
        };
        let (bytes, row) = put(tx, values, new, clock, unlink)?;
        added += bytes;
        rows += row;
    }
    Ok((added, rows))
}

/// Removes a key and the value it holds; returns the accounted bytes freed and whether there
/// was such a key. A value kept in a file is added to `unlink`, for removal once the
/// transaction has committed if no row refers to it by then ([`keep_unreferenced`]).
pub(super) fn remove_key(
    tx: &Transaction<'_>,
    key: &KeyId,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, bool)> {
    let found: Option<(Vec<u8>, i64, i64, bool)> = tx
        .prepare_cached("SELECT digest, data_id, size, in_file FROM entries WHERE key = ?1")?
        .query_row([key.0.as_bytes()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let Some((digest, data_id, size, in_file)) = found else {
        return Ok((0, false));
    };
    tx.prepare_cached("DELETE FROM entries WHERE key = ?1")?
        .execute([key.0.as_bytes()])?;
    tx.prepare_cached("DELETE FROM blob_data WHERE id = ?1")?
        .execute([data_id])?;
    if let (true, Some(digest)) = (in_file, Digest::from_slice(&digest)) {
        unlink.push(digest);
    }
    Ok((accounted(size), true))
}

/// Keeps in `unlink` only the value files that no row refers to, at the end of a transaction:
/// the keys of a value in a file share it, and a put later in the same transaction may have
/// taken up the file of a key removed before it (the same value under another key, or under
/// the same key with a new link), finding it in place. The values of a pack whose file goes
/// go with it; returns the accounted bytes they freed and their rows.
pub(super) fn keep_unreferenced(
    tx: &Transaction<'_>,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, i64)> {
    unlink.sort_unstable();
    unlink.dedup();
    let mut referenced =
        tx.prepare_cached("SELECT 1 FROM entries WHERE digest = ?1 AND in_file LIMIT 1")?;
    let mut unreferenced = Vec::with_capacity(unlink.len());
    for digest in unlink.drain(..) {
        if !referenced.exists([digest.as_bytes()])? {
            unreferenced.push(digest);
        }
    }
    *unlink = unreferenced;
    let (mut freed, mut removed) = (0, 0);
    for pack in unlink.iter() {
        let (bytes, rows) = remove_members(tx, pack)?;
        freed += bytes;
        removed += rows;
    }
    Ok((freed, removed))
}

/// Removes the values kept in the file of the pack `pack`; returns the accounted bytes freed
/// and the rows removed.
fn remove_members(tx: &Transaction<'_>, pack: &Digest) -> rusqlite::Result<(i64, i64)> {
    let (rows, size): (i64, i64) = tx
        .prepare_cached("SELECT COUNT(*), coalesce(sum(size), 0) FROM entries WHERE pack = ?1")?
        .query_row([pack.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))?;
    if rows == 0 {
        return Ok((0, 0));
    }
    tx.prepare_cached("DELETE FROM entries WHERE pack = ?1")?
        .execute([pack.as_bytes()])?;
    Ok((size + rows * (VALUE_OVERHEAD + KEY_OVERHEAD) as i64, rows))
}

/// Removes every key whose value has one of `digests`; returns the accounted bytes freed and
/// the keys removed. Values kept in files are found through their index; the others by one
/// pass over the keys, since no index on digests is kept for them (it would be a third randomly
/// keyed tree for every insert): this serves `verify`, not a compile.
pub(super) fn remove_values(
    tx: &Transaction<'_>,
    digests: &HashSet<Digest>,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, i64)> {
    if digests.is_empty() {
        return Ok((0, 0));
    }
    let keys: Vec<KeyId> = {
        let mut stmt = tx.prepare_cached("SELECT key, digest FROM entries")?;
        let mut rows = stmt.query([])?;
        let mut keys = Vec::new();
        while let Some(row) = rows.next()? {
            let digest = Digest::from_slice(row.get_ref(1)?.as_blob()?);
            if digest.is_some_and(|d| digests.contains(&d)) {
                if let Some(key) = Digest::from_slice(row.get_ref(0)?.as_blob()?) {
                    keys.push(KeyId(key));
                }
            }
        }
        keys
    };
    remove_keys(tx, &keys, unlink)
}

/// Removes every key whose value is kept in the file of `digest` (found damaged or lost);
/// returns the accounted bytes freed and the keys removed.
pub(super) fn remove_file_value(
    tx: &Transaction<'_>,
    digest: &Digest,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, i64)> {
    let keys: Vec<Vec<u8>> = tx
        .prepare_cached("SELECT key FROM entries WHERE digest = ?1 AND in_file")?
        .query_map([digest.as_bytes()], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let keys: Vec<KeyId> = keys
        .iter()
        .filter_map(|k| Digest::from_slice(k))
        .map(KeyId)
        .collect();
    remove_keys(tx, &keys, unlink)
}

/// [`remove_key`] for each of `keys`; returns the accounted bytes freed and the keys removed.
fn remove_keys(
    tx: &Transaction<'_>,
    keys: &[KeyId],
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, i64)> {
    let (mut freed, mut removed) = (0, 0);
    for key in keys {
        let (bytes, found) = remove_key(tx, key, unlink)?;
        freed += bytes;
        removed += i64::from(found);
    }
    Ok((freed, removed))
}

/// Where one eviction may stop, short of its target: once it has evicted at least `values`
/// values, freed at least `bytes` bytes, and left at most `under` accounted bytes.
#[derive(Clone, Copy)]
pub(super) struct EvictionBudget {
    pub values: u64,
    pub bytes: i64,
    pub under: i64,
}

/// Evicts least recently used keys, with their values, until `bytes <= target`.
pub(super) fn evict_within(
    tx: &Transaction<'_>,
    bytes: &mut i64,
    target: u64,
    budget: Option<EvictionBudget>,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<Eviction> {
    let mut eviction = Eviction::default();
    if *bytes <= target as i64 {
        return Ok(eviction);
    }
    // The oldest first, read from the index on `last_used`; removal follows the reading.
    let mut victims = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT key, size, data_id FROM entries INDEXED BY entries_by_use ORDER BY last_used",
        )?;
        let mut rows = stmt.query([])?;
        let mut to_free = *bytes - target as i64;
        let mut freed = 0;
        while to_free > 0 {
            let enough = |b: EvictionBudget| {
                victims.len() as u64 >= b.values && freed >= b.bytes && *bytes - freed <= b.under
            };
            if budget.is_some_and(enough) {
                break;
            }
            let Some(row) = rows.next()? else { break };
            let key: Vec<u8> = row.get(0)?;
            let size = accounted(row.get::<_, i64>(1)?);
            to_free -= size;
            freed += size;
            victims.push((key, row.get::<_, i64>(2)?));
        }
    }
    for (victim, data_id) in victims {
        if *bytes <= target as i64 {
            break;
        }
        let Some(key) = Digest::from_slice(&victim).map(KeyId) else {
            // A key column of the wrong length: a damaged row, removed without a count.
            tx.prepare_cached("DELETE FROM entries WHERE key = ?1")?
                .execute([&victim])?;
            tx.prepare_cached("DELETE FROM blob_data WHERE id = ?1")?
                .execute([data_id])?;
            continue;
        };
        let (freed, _) = remove_key(tx, &key, unlink)?;
        *bytes -= freed;
        eviction.entries += 1;
        eviction.bytes += freed.max(0) as u64;
    }
    Ok(eviction)
}
