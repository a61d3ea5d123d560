//! Tiers: a list of stores, fastest first (in practice memory, the local disk, a remote store
//! shared by a fleet), that together are one store.
//!
//! A read goes down the tiers and returns the first hit, marked with the tier it came from;
//! once the cache has verified it, [`Store::fill`] copies it into the faster tiers (a value from
//! Redis is kept on the local disk, so the next process on this machine reads it locally). A
//! write goes to every tier; each decides what it keeps (the memory tier keeps no large values,
//! a read-only tier nothing). One tier is the tier of record: its limits, counters and
//! statistics are the cache's, and the other tiers' own counts (a remote tier's errors) are
//! added to it.
//!
//! A value the tier of record keeps in a file of its own, or once in its pack's file (the
//! disk store: [`Store::put_in_file`], [`Store::put_with_members`]), is kept so there, and
//! handed whole to the other tiers: Redis keeps an entry per key, whichever file the local
//! disk keeps it in.

use std::sync::Arc;

use super::{Eviction, FileOfValues, Found, Store, StoreError, StoredEntry, Usage};
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;

/// See the module documentation.
#[derive(Debug)]
pub struct TieredStore {
    tiers: Vec<Arc<dyn Store>>,
    of_record: usize,
}

impl TieredStore {
    /// `tiers`, fastest first; `tiers[of_record]` keeps the limits, counters and statistics.
    pub fn new(tiers: Vec<Arc<dyn Store>>, of_record: usize) -> TieredStore {
        assert!(
            of_record < tiers.len(),
            "the tier of record is one of the tiers"
        );
        TieredStore { tiers, of_record }
    }

    fn record_tier(&self) -> &Arc<dyn Store> {
        &self.tiers[self.of_record]
    }

    /// The first of the tiers `asked` picks that has `key`, fastest first.
    fn get_from(
        &self,
        key: &KeyId,
        asked: impl Fn(&Arc<dyn Store>) -> bool,
    ) -> Result<Option<Found>, StoreError> {
        // An error in one tier is the cache's to report, but a slower tier may still serve.
        let mut first_error = None;
        for (index, tier) in self.tiers.iter().enumerate() {
            if !asked(tier) {
                continue;
            }
            match tier.get(key) {
                Ok(Some(found)) => {
                    return Ok(Some(Found {
                        tier: index,
                        ..found
                    }))
                }
                Ok(None) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(None), Err)
    }
}

impl Store for TieredStore {
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        self.get_from(key, |_| true)
    }

    fn get_local(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        self.get_from(key, |tier| !tier.is_remote())
    }

    fn is_remote(&self) -> bool {
        self.tiers.iter().all(|tier| tier.is_remote())
    }

    fn has_remote_tier(&self) -> bool {
        self.tiers.iter().any(|tier| tier.has_remote_tier())
    }

    /// Each tier is asked, in one batch, for the keys the faster ones did not have.
    fn get_many(
        &self,
        keys: &[KeyId],
        found: &mut dyn FnMut(KeyId, Found),
    ) -> Result<(), StoreError> {
        let mut first_error = None;
        let mut missing: Vec<KeyId> = keys.to_vec();
        for (index, tier) in self.tiers.iter().enumerate() {
            if missing.is_empty() {
                break;
            }
            let mut answered = std::collections::HashSet::new();
            let result = tier.get_many(&missing, &mut |key, entry| {
                answered.insert(key);
                found(
                    key,
                    Found {
                        tier: index,
                        ..entry
                    },
                );
            });
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
            missing.retain(|key| !answered.contains(key));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Puts what a slower tier found, verified by the cache, into every faster tier.
    fn fill(&self, key: KeyId, found: &Found) {
        let StoredEntry::Whole(bytes) = &found.entry else {
            return; // a mapped value file lives on the local disk already
        };
        for tier in &self.tiers[..found.tier.min(self.tiers.len())] {
            let _ = tier.put(key, found.link, found.digest, bytes.clone());
        }
    }

    fn put(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: Arc<[u8]>,
    ) -> Result<(), StoreError> {
        let mut result = Ok(());
        for (index, tier) in self.tiers.iter().enumerate() {
            let put = tier.put(key, link, digest, entry.clone());
            if index == self.of_record {
                result = put;
            }
        }
        result
    }

    /// The tier of record writes the file; the others get the entry whole. `false` (nothing
    /// stored) if the tier of record does not keep values so: the caller puts it whole.
    fn put_in_file(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        header: Arc<[u8]>,
        body: &[u8],
    ) -> Result<bool, StoreError> {
        let kept = self
            .record_tier()
            .put_in_file(key, link, digest, header.clone(), body);
        if let Ok(false) = kept {
            return kept;
        }
        self.put_to_others(key, link, digest, whole(&header, body));
        kept
    }

    fn keeps_members(&self) -> bool {
        self.record_tier().keeps_members()
    }

    /// The tier of record keeps the values once, in their file; the others get each value
    /// whole, as if each had been put on its own, and the file's entry whole too if it is
    /// read whole (a pack).
    fn put_with_members(&self, values: FileOfValues<'_>) -> Result<bool, StoreError> {
        let (key, link, digest, parts) = (values.key, values.link, values.digest, values.parts);
        let (header, read_whole) = (values.header.clone(), values.read_whole);
        let members = values.members.clone(); // their headers are shared, not copied
        let kept = self.record_tier().put_with_members(values);
        if let Ok(false) = kept {
            return kept;
        }
        if read_whole {
            self.put_to_others(key, link, digest, whole_of_parts(&header, parts));
        }
        let starts = part_starts(parts);
        for member in &members {
            // A member whose slice is not in the file is stored nowhere; it is compiled again.
            let value = usize::try_from(member.offset).ok().zip(
                crate::entry::body_len(&member.header).and_then(|len| usize::try_from(len).ok()),
            );
            if let Some(value) = value.and_then(|(at, len)| range_of_parts(parts, &starts, at, len))
            {
                self.put_to_others(
                    member.key,
                    member.link,
                    member.digest,
                    whole(&member.header, &value),
                );
            }
        }
        kept
    }

    fn remove_key(&self, key: &KeyId) -> Result<(), StoreError> {
        self.each(|tier| tier.remove_key(key))
    }

    fn remove_value(&self, digest: &Digest) -> Result<(), StoreError> {
        self.each(|tier| tier.remove_value(digest))
    }

    fn remove_damaged(&self, key: &KeyId, digest: &Digest) -> Result<(), StoreError> {
        self.each(|tier| tier.remove_damaged(key, digest))
    }

    fn record(&self, delta: &Counters) {
        let mut delta = *delta;
        for (index, tier) in self.tiers.iter().enumerate() {
            if index != self.of_record {
                delta.add(&tier.take_counters());
            }
        }
        self.record_tier().record(&delta);
    }

    fn renew_budget(&self) {
        for tier in &self.tiers {
            tier.renew_budget();
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.each(|tier| tier.flush())
    }

    fn expect_writes(&self) {
        for tier in &self.tiers {
            tier.expect_writes();
        }
    }

    fn commit_soon(&self) {
        for tier in &self.tiers {
            tier.commit_soon();
        }
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        self.record_tier().counters()
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        self.record_tier().usage()
    }

    fn max_bytes(&self) -> u64 {
        self.record_tier().max_bytes()
    }

    fn evict_to(&self, max_bytes: u64) -> Result<Eviction, StoreError> {
        self.record_tier().evict_to(max_bytes)
    }

    /// Clears the tiers up to the tier of record; those behind it are shared with other
    /// machines and are not cleared from one of them.
    fn clear(&self) -> Result<(), StoreError> {
        let mut result = Ok(());
        for (index, tier) in self.tiers[..=self.of_record].iter().enumerate() {
            let cleared = tier.clear();
            if index == self.of_record {
                result = cleared;
            }
        }
        result
    }

    fn for_each_entry(&self, visit: &mut dyn FnMut(Digest, &[u8])) -> Result<(), StoreError> {
        self.record_tier().for_each_entry(visit)
    }

    fn for_each_link(&self, visit: &mut dyn FnMut(KeyId, Digest, Link)) -> Result<(), StoreError> {
        self.record_tier().for_each_link(visit)
    }

    fn disk_bytes(&self) -> Option<u64> {
        self.record_tier().disk_bytes()
    }

    fn location(&self) -> String {
        self.tiers[self.of_record..]
            .iter()
            .map(|tier| tier.location())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn is_read_only(&self) -> bool {
        self.tiers.iter().all(|tier| tier.is_read_only())
    }
}

/// Where each of `parts` starts in their concatenation.
fn part_starts(parts: &[&[u8]]) -> Vec<usize> {
    let mut at = 0;
    parts
        .iter()
        .map(|part| {
            let start = at;
            at += part.len();
            start
        })
        .collect()
}

/// The bytes at `start..start + len` of the concatenation of `parts` (which start at
/// `starts`): borrowed where they lie within one part (a file of values is cut at each value),
/// else gathered.
fn range_of_parts<'a>(
    parts: &[&'a [u8]],
    starts: &[usize],
    start: usize,
    len: usize,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    let first = starts.partition_point(|&at| at <= start).checked_sub(1)?;
    let within = start - starts[first];
    if let Some(bytes) = parts[first].get(within..within.checked_add(len)?) {
        return Some(std::borrow::Cow::Borrowed(bytes));
    }
    let mut gathered = Vec::with_capacity(len);
    let mut skip = within;
    for part in &parts[first..] {
        let part = part.get(skip..).unwrap_or_default();
        skip = 0;
        let take = part.len().min(len - gathered.len());
        gathered.extend_from_slice(&part[..take]);
        if gathered.len() == len {
            return Some(std::borrow::Cow::Owned(gathered));
        }
    }
    None
}

/// An entry made of `header` and `body`, as [`Store::put`] takes it.
fn whole(header: &[u8], body: &[u8]) -> Arc<[u8]> {
    whole_of_parts(header, &[body])
}

/// An entry made of `header` and the concatenation of `parts`, copied once.
fn whole_of_parts(header: &[u8], parts: &[&[u8]]) -> Arc<[u8]> {
    let len = header.len() + parts.iter().map(|part| part.len()).sum::<usize>();
    let mut entry = Arc::<[u8]>::new_uninit_slice(len);
    let slots = Arc::get_mut(&mut entry).expect("a new Arc is not shared");
    let mut at = 0;
    for piece in std::iter::once(header).chain(parts.iter().copied()) {
        slots[at..at + piece.len()].write_copy_of_slice(piece);
        at += piece.len();
    }
    // SAFETY: every byte was written just above.
    unsafe { entry.assume_init() }
}

impl TieredStore {
    /// Puts `entry` into every tier but the tier of record (which stored it its own way).
    fn put_to_others(&self, key: KeyId, link: Link, digest: Digest, entry: Arc<[u8]>) {
        for (index, tier) in self.tiers.iter().enumerate() {
            if index != self.of_record {
                let _ = tier.put(key, link, digest, entry.clone());
            }
        }
    }

    /// Runs `op` on every tier; the result is the tier of record's.
    fn each(
        &self,
        op: impl Fn(&Arc<dyn Store>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut result = Ok(());
        for (index, tier) in self.tiers.iter().enumerate() {
            let done = op(tier);
            if index == self.of_record {
                result = done;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::read_only::ReadOnlyStore;
    use crate::store::Member;

    fn entry(seed: u8) -> (KeyId, Link, Digest, Arc<[u8]>) {
        let key = KeyId(Digest::of(&[seed, 1]));
        let bytes: Arc<[u8]> = vec![seed; 100].into();
        let digest = Digest::of(&bytes);
        (key, Link::new(None, &key, &digest), digest, bytes)
    }

    fn three() -> (Vec<Arc<MemoryStore>>, TieredStore) {
        let stores: Vec<Arc<MemoryStore>> = (0..3)
            .map(|_| Arc::new(MemoryStore::new(1 << 20)))
            .collect();
        let tiers = stores.iter().map(|s| s.clone() as Arc<dyn Store>).collect();
        (stores, TieredStore::new(tiers, 1))
    }

    #[test]
    fn a_read_goes_down_the_tiers_and_says_which_one_served() {
        let (stores, tiered) = three();
        let (key, link, digest, bytes) = entry(7);
        stores[2].put(key, link, digest, bytes).unwrap();
        let found = tiered.get(&key).unwrap().expect("the slowest tier has it");
        assert_eq!(found.tier, 2);
        assert!(
            stores[0].get(&key).unwrap().is_none(),
            "no fill before the cache verifies"
        );
        tiered.fill(key, &found);
        assert!(stores[0].get(&key).unwrap().is_some());
        assert!(stores[1].get(&key).unwrap().is_some());
        assert_eq!(tiered.get(&key).unwrap().unwrap().tier, 0);
    }

    #[test]
    fn writes_reach_every_tier_and_removals_too() {
        let (stores, tiered) = three();
        let (key, link, digest, bytes) = entry(3);
        tiered.put(key, link, digest, bytes).unwrap();
        assert!(stores.iter().all(|s| s.get(&key).unwrap().is_some()));
        tiered.remove_key(&key).unwrap();
        assert!(stores.iter().all(|s| s.get(&key).unwrap().is_none()));
    }

    #[test]
    fn the_tier_of_record_keeps_the_counts_and_clear_spares_the_tiers_behind_it() {
        let (stores, tiered) = three();
        tiered.record(&Counters {
            hits: 5,
            ..Counters::default()
        });
        assert_eq!(stores[1].counters().unwrap().hits, 5);
        assert_eq!(stores[0].counters().unwrap().hits, 0);
        let (key, link, digest, bytes) = entry(9);
        tiered.put(key, link, digest, bytes).unwrap();
        tiered.clear().unwrap();
        assert!(stores[0].get(&key).unwrap().is_none());
        assert!(stores[1].get(&key).unwrap().is_none());
        assert!(
            stores[2].get(&key).unwrap().is_some(),
            "a shared tier is not cleared"
        );
    }

    /// A header and its link for `value` under `key`, as the cache makes them.
    fn header_for(key: &KeyId, value: &[u8]) -> (Arc<[u8]>, Digest, Link) {
        let (header, digest) = crate::entry::header_of(value, None);
        (
            Arc::from(&header[..]),
            digest,
            Link::new(None, key, &digest),
        )
    }

    /// A real disk store as the tier of record, with a memory store behind it standing for
    /// Redis (a tier that keeps each entry whole).
    /// `values` as the members of a file holding them one after another, keyed by their index
    /// and `tag`.
    fn members_of(values: &[Vec<u8>], tag: u8) -> Vec<Member> {
        let mut offset = 0;
        (values.iter().enumerate())
            .map(|(index, value)| {
                let key = KeyId(Digest::of(&[index as u8, tag]));
                let (header, digest, link) = header_for(&key, value);
                let member = Member {
                    key,
                    link,
                    digest,
                    header,
                    offset,
                };
                offset += value.len() as u64;
                member
            })
            .collect()
    }

    fn disk_then_remote(
        dir: &std::path::Path,
    ) -> (
        Arc<super::super::disk::DiskStore>,
        Arc<MemoryStore>,
        TieredStore,
    ) {
        let disk = Arc::new(super::super::disk::DiskStore::open(dir, 1 << 30, false).unwrap());
        let remote = Arc::new(MemoryStore::new(1 << 30));
        let tiered = TieredStore::new(vec![disk.clone(), remote.clone()], 0);
        (disk, remote, tiered)
    }

    /// The disk keeps a pack's values once, in its file, and a module in a file of its own;
    /// the tiers beside it (Redis, memory) get each entry whole, as a put would have made it.
    #[test]
    fn the_disk_keeps_files_its_way_and_the_other_tiers_get_whole_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, remote, tiered) = disk_then_remote(dir.path());
        assert!(tiered.keeps_members());

        let values: Vec<Vec<u8>> = (0..3u8).map(|seed| vec![seed; 40_000]).collect();
        let pack: Vec<u8> = values.concat();
        let members = members_of(&values, 9);
        let mut expected: Vec<_> = (members.iter().zip(&values))
            .map(|(member, value)| (member.key, whole(&member.header, value)))
            .collect();
        // Handed over as a compile hands its pack: each value a part of its own.
        let parts: Vec<&[u8]> = values.iter().map(|value| &value[..]).collect();
        let pack_key = KeyId(Digest::of(b"pack"));
        let (header, digest, link) = header_for(&pack_key, &pack);
        assert!(tiered
            .put_with_members(FileOfValues {
                key: pack_key,
                link,
                digest,
                header: header.clone(),
                parts: &parts,
                members,
                read_whole: true,
            })
            .unwrap());
        let module = vec![7u8; 100_000];
        let module_key = KeyId(Digest::of(b"module"));
        let (module_header, module_digest, module_link) = header_for(&module_key, &module);
        assert!(tiered
            .put_in_file(
                module_key,
                module_link,
                module_digest,
                module_header.clone(),
                &module
            )
            .unwrap());
        tiered.flush().unwrap();

        expected.push((pack_key, whole(&header, &pack)));
        expected.push((module_key, whole(&module_header, &module)));
        for (key, entry) in &expected {
            let found = remote
                .get(key)
                .unwrap()
                .expect("the other tier has it whole");
            assert!(matches!(&found.entry, StoredEntry::Whole(bytes) if bytes == entry));
            let local = disk.get(key).unwrap().expect("the disk has it");
            assert!(
                !matches!(local.entry, StoredEntry::Whole(_)),
                "the disk serves it from a file"
            );
            let (local_header, local_body) = local.entry.parts();
            assert_eq!([local_header, local_body].concat(), entry[..]);
        }
    }

    /// A file that only holds its members' values is not handed to the other tiers: they get
    /// the values alone, whole even where the parts were cut inside one.
    #[test]
    fn a_file_of_values_alone_reaches_the_other_tiers_as_its_values() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, remote, tiered) = disk_then_remote(dir.path());
        let values: Vec<Vec<u8>> = (0..2u8).map(|seed| vec![seed; 50_000]).collect();
        let file: Vec<u8> = values.concat();
        let members = members_of(&values, 7);
        let keys: Vec<KeyId> = members.iter().map(|member| member.key).collect();
        let file_key = KeyId(Digest::of(b"held"));
        let (header, digest, link) = header_for(&file_key, &file);
        assert!(tiered
            .put_with_members(FileOfValues {
                key: file_key,
                link,
                digest,
                header,
                parts: &[&file[..30_000], &file[30_000..]],
                members,
                read_whole: false,
            })
            .unwrap());
        tiered.flush().unwrap();
        assert!(disk.get(&file_key).unwrap().is_some());
        assert!(remote.get(&file_key).unwrap().is_none(), "never read whole");
        for (key, value) in keys.iter().zip(&values) {
            let found = remote.get(key).unwrap().expect("each value");
            assert_eq!(found.entry.parts().1, &value[..]);
            assert!(disk.get(key).unwrap().is_some());
        }
    }

    /// Where the tier of record keeps no files, nothing is stored and the caller puts whole.
    #[test]
    fn without_files_in_the_tier_of_record_nothing_is_stored_by_the_file_puts() {
        let (stores, tiered) = three();
        assert!(!tiered.keeps_members());
        let key = KeyId(Digest::of(b"module"));
        let module = vec![1u8; 100_000];
        let (header, digest, link) = header_for(&key, &module);
        assert!(!tiered
            .put_in_file(key, link, digest, header, &module)
            .unwrap());
        assert!(stores.iter().all(|s| s.get(&key).unwrap().is_none()));
    }

    #[test]
    fn a_read_only_tier_serves_and_keeps_nothing_new() {
        let memory = Arc::new(MemoryStore::new(1 << 20));
        let behind = Arc::new(MemoryStore::new(1 << 20));
        let (key, link, digest, bytes) = entry(1);
        behind.put(key, link, digest, bytes.clone()).unwrap();
        let tiered = TieredStore::new(
            vec![memory.clone(), Arc::new(ReadOnlyStore::new(behind.clone()))],
            0,
        );
        assert_eq!(tiered.get(&key).unwrap().unwrap().tier, 1);
        let (other, link, digest, bytes) = entry(2);
        tiered.put(other, link, digest, bytes).unwrap();
        assert!(behind.get(&other).unwrap().is_none());
        assert!(memory.get(&other).unwrap().is_some());
        tiered.remove_key(&key).unwrap();
        assert!(behind.get(&key).unwrap().is_some());
    }
}
