//! The statements the writer's transactions run: storing, removing and evicting values, and
//! the counters kept in `meta`.

use std::fs;
use std::path::Path;

use rusqlite::{params, OptionalExtension, Transaction};

use super::value_files::{self, FILE_THRESHOLD};
use super::{DB_FILE, LOW_WATER_PERCENT};
use crate::entry::HEADER_LEN;
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;
use crate::store::{Eviction, KEY_OVERHEAD, VALUE_OVERHEAD};

pub(super) const GET_SQL: &str =
    "SELECT k.digest, d.data, m.in_file, m.last_used, k.link FROM keys k \
     JOIN blob_meta m ON m.digest = k.digest \
     JOIN blob_data d ON d.id = m.data_id WHERE k.id = ?1";

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
        None => tx.query_row("SELECT COUNT(*) FROM blob_meta", [], |row| row.get(0)),
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

/// Stores one value under one key; returns the accounted bytes added and whether the value is
/// new (not only a new key for a value already stored).
pub(super) fn put(
    tx: &Transaction<'_>,
    values: ValuesDir<'_>,
    key: &KeyId,
    link: &Link,
    digest: &Digest,
    entry: &[u8],
    clock: i64,
) -> rusqlite::Result<(i64, bool)> {
    let mut added = 0;
    let in_file = entry.len() >= FILE_THRESHOLD;
    if in_file {
        // Before the row, so that a committed row always has its file (a file without a row
        // is an orphan that `gc` sweeps); rewritten if it went missing since.
        value_files::write(values.dir, digest, &entry[HEADER_LEN..], values.shared).map_err(
            |e| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("cannot write the value file: {e}").into(),
                )
            },
        )?;
    }
    let known = tx
        .prepare_cached("UPDATE blob_meta SET last_used = ?1 WHERE digest = ?2")?
        .execute(params![clock, digest.as_bytes()])?
        > 0;
    if !known {
        let stored = if in_file { &entry[..HEADER_LEN] } else { entry };
        tx.prepare_cached("INSERT INTO blob_data (data) VALUES (?1)")?
            .execute([stored])?;
        let data_id = tx.last_insert_rowid();
        tx.prepare_cached(
            "INSERT INTO blob_meta (digest, data_id, size, last_used, in_file) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            digest.as_bytes(),
            data_id,
            entry.len() as i64,
            clock,
            in_file
        ])?;
        added += entry.len() as i64 + VALUE_OVERHEAD as i64;
    }
    let current: Option<(Vec<u8>, Vec<u8>)> = tx
        .prepare_cached("SELECT digest, link FROM keys WHERE id = ?1")?
        .query_row([key.0.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    match current {
        None => {
            tx.prepare_cached("INSERT INTO keys (id, digest, link) VALUES (?1, ?2, ?3)")?
                .execute(params![
                    key.0.as_bytes(),
                    digest.as_bytes(),
                    link.as_bytes()
                ])?;
            added += KEY_OVERHEAD as i64;
        }
        Some((d, l)) if d != digest.as_bytes() || l != link.as_bytes() => {
            tx.prepare_cached("UPDATE keys SET digest = ?2, link = ?3 WHERE id = ?1")?
                .execute(params![
                    key.0.as_bytes(),
                    digest.as_bytes(),
                    link.as_bytes()
                ])?;
        }
        Some(_) => {}
    }
    Ok((added, !known))
}

/// Removes a value and the keys pointing at it; returns the accounted bytes freed and whether
/// there was such a value. A value kept in a file is added to `unlink`, for removal once the
/// transaction has committed.
pub(super) fn remove_value(
    tx: &Transaction<'_>,
    digest: &Digest,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, bool)> {
    let found: Option<(i64, i64, bool)> = tx
        .prepare_cached("SELECT data_id, size, in_file FROM blob_meta WHERE digest = ?1")?
        .query_row([digest.as_bytes()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let keys = tx
        .prepare_cached("DELETE FROM keys WHERE digest = ?1")?
        .execute([digest.as_bytes()])? as i64;
    let Some((data_id, size, in_file)) = found else {
        return Ok((keys * KEY_OVERHEAD as i64, false));
    };
    if in_file {
        unlink.push(*digest);
    }
    tx.prepare_cached("DELETE FROM blob_data WHERE id = ?1")?
        .execute([data_id])?;
    tx.prepare_cached("DELETE FROM blob_meta WHERE digest = ?1")?
        .execute([digest.as_bytes()])?;
    Ok((
        size + VALUE_OVERHEAD as i64 + keys * KEY_OVERHEAD as i64,
        true,
    ))
}

/// Evicts least recently used values until `bytes <= target`.
/// Where one eviction may stop, short of its target: once it has evicted at least `values`
/// values, freed at least `bytes` bytes, and left at most `under` accounted bytes.
#[derive(Clone, Copy)]
pub(super) struct EvictionBudget {
    pub values: u64,
    pub bytes: i64,
    pub under: i64,
}

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
    // The oldest first, read from the index on `last_used` (a cache made before it had one gets
    // it here, once): sorting the whole table took 150 ms at half a million values, for every
    // eviction. Removal follows the reading.
    tx.execute_batch("CREATE INDEX IF NOT EXISTS blob_meta_by_use ON blob_meta(last_used)")?;
    let mut victims = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT digest, size FROM blob_meta INDEXED BY blob_meta_by_use ORDER BY last_used",
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
            let digest: Vec<u8> = row.get(0)?;
            let size = row.get::<_, i64>(1)? + VALUE_OVERHEAD as i64;
            to_free -= size;
            freed += size;
            victims.push(digest);
        }
    }
    for victim in victims {
        if *bytes <= target as i64 {
            break;
        }
        let Some(digest) = Digest::from_slice(&victim) else {
            tx.prepare_cached("DELETE FROM blob_meta WHERE digest = ?1")?
                .execute([&victim])?;
            continue;
        };
        let (freed, _) = remove_value(tx, &digest, unlink)?;
        *bytes -= freed;
        eviction.entries += 1;
        eviction.bytes += freed.max(0) as u64;
    }
    Ok(eviction)
}
