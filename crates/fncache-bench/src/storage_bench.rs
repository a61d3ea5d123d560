//! Storage-engine benchmark: the measurement that chose fncache's disk store.
//!
//! The workload is a function cache's: N entries (default 20,000) of 0.2 to 64 KiB
//! (log-uniform), 32-byte keys; cold inserts, then lookups from one and from two threads (a
//! parallel compile on this 2-core machine), then 4 processes sharing one cache at once. Three
//! engines: one file per entry (two hex levels, write to a temporary file then rename), SQLite
//! (fncache's own `DiskStore`: WAL, batched writer, LRU touch on every hit), LMDB (heed).
//!
//!     cargo run --release -p fncache-bench --bin storage-bench -- [ENTRIES] [functions|wide]
//!
//! Prints a Markdown table (docs/design.md keeps the one that chose the engine).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fncache::{Digest, DiskStore, KeyId, Store};

trait Engine: Sync {
    fn put(&self, key: &[u8; 32], value: &[u8]) -> Result<()>;
    /// Puts many entries the way the engine batches best.
    fn put_all(&self, entries: &[([u8; 32], Vec<u8>)]) -> Result<()> {
        for (k, v) in entries {
            self.put(k, v)?;
        }
        Ok(())
    }
    fn get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>>;
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

struct Files(PathBuf);

impl Files {
    fn path(&self, key: &[u8; 32]) -> PathBuf {
        let hex = blake3::Hash::from_bytes(*key).to_hex();
        self.0.join(&hex[..2]).join(&hex[2..])
    }
}

impl Engine for Files {
    fn put(&self, key: &[u8; 32], value: &[u8]) -> Result<()> {
        let path = self.path(key);
        std::fs::create_dir_all(path.parent().unwrap())?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, value)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
    fn get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(key)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

struct Sqlite(DiskStore);

impl Engine for Sqlite {
    fn put(&self, key: &[u8; 32], value: &[u8]) -> Result<()> {
        self.0
            .put(KeyId(Digest(*key)), Digest::of(value), Arc::from(value))?;
        Ok(())
    }
    fn get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(&KeyId(Digest(*key)))?.map(|(_, v)| {
            let (h, b) = v.parts();
            [h, b].concat()
        }))
    }
    fn flush(&self) -> Result<()> {
        Ok(self.0.flush()?)
    }
}

struct Lmdb {
    env: heed::Env,
    db: heed::Database<heed::types::Bytes, heed::types::Bytes>,
}

impl Lmdb {
    fn open(dir: &Path) -> Result<Lmdb> {
        std::fs::create_dir_all(dir)?;
        let env = unsafe {
            heed::EnvOpenOptions::new()
                .map_size(8 << 30)
                .max_dbs(1)
                .open(dir)?
        };
        let mut wtxn = env.write_txn()?;
        let db = env.create_database(&mut wtxn, Some("entries"))?;
        wtxn.commit()?;
        Ok(Lmdb { env, db })
    }
}

impl Engine for Lmdb {
    fn put(&self, key: &[u8; 32], value: &[u8]) -> Result<()> {
        let mut wtxn = self.env.write_txn()?;
        self.db.put(&mut wtxn, key, value)?;
        wtxn.commit()?;
        Ok(())
    }
    fn put_all(&self, entries: &[([u8; 32], Vec<u8>)]) -> Result<()> {
        for chunk in entries.chunks(1000) {
            let mut wtxn = self.env.write_txn()?;
            for (k, v) in chunk {
                self.db.put(&mut wtxn, k, v)?;
            }
            wtxn.commit()?;
        }
        Ok(())
    }
    fn get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let rtxn = self.env.read_txn()?;
        Ok(self.db.get(&rtxn, key)?.map(|v| v.to_vec()))
    }
}

/// A small deterministic generator (xorshift), so every engine sees the same workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Value sizes: `functions` follows compiled functions (log-normal, median 1.5 KiB, p90
/// 8 KiB, 200 B to 64 KiB); `wide` is log-uniform over 200 B to 64 KiB.
static FUNCTION_SIZES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn value_len(rng: &mut Rng) -> usize {
    if FUNCTION_SIZES.load(std::sync::atomic::Ordering::Relaxed) {
        let u1 = (rng.next() % 1_000_000 + 1) as f64 / 1_000_001.0;
        let u2 = (rng.next() % 1_000_000) as f64 / 1_000_000.0;
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (1536.0 * (z * 1.31).exp()).clamp(200.0, 65536.0) as usize
    } else {
        let exp = (rng.next() % 10_000) as f64 / 10_000.0;
        (200.0 * (65536.0f64 / 200.0).powf(exp)) as usize
    }
}

fn workload(count: usize, seed: u64) -> Vec<([u8; 32], Vec<u8>)> {
    let mut rng = Rng(seed | 1);
    (0..count)
        .map(|i| {
            let key =
                *blake3::hash(&[seed.to_le_bytes(), (i as u64).to_le_bytes()].concat()).as_bytes();
            let len = value_len(&mut rng);
            let mut value = vec![0u8; len];
            for chunk in value.chunks_mut(8) {
                let r = rng.next().to_le_bytes();
                chunk.copy_from_slice(&r[..chunk.len()]);
            }
            (key, value)
        })
        .collect()
}

fn open(engine: &str, dir: &Path) -> Result<Box<dyn Engine>> {
    Ok(match engine {
        "files" => Box::new(Files(dir.to_path_buf())),
        "sqlite" => Box::new(Sqlite(DiskStore::open(dir, u64::MAX / 4, false)?)),
        "lmdb" => Box::new(Lmdb::open(dir)?),
        other => bail!("unknown engine {other}"),
    })
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p) as usize]
}

struct Row {
    engine: &'static str,
    put_us: f64,
    get_p50_us: f64,
    get_p99_us: f64,
    two_thread_gets_per_s: f64,
    disk_mib: f64,
    shared_ok: String,
}

fn bench(
    engine_name: &str,
    entries: &[([u8; 32], Vec<u8>)],
    root: &Path,
    sizes: &str,
) -> Result<Row> {
    let dir = root.join(engine_name);
    let engine = open(engine_name, &dir)?;
    let start = Instant::now();
    engine.put_all(entries)?;
    engine.flush()?;
    let put_us = start.elapsed().as_secs_f64() * 1e6 / entries.len() as f64;

    // Single-thread lookups in random order.
    let mut rng = Rng(42);
    let mut samples = Vec::with_capacity(entries.len());
    for _ in 0..entries.len() {
        let (k, v) = &entries[rng.below(entries.len())];
        let t = Instant::now();
        let got = engine.get(k)?.context("entry missing")?;
        samples.push(t.elapsed());
        if got.len() != v.len() {
            bail!("{engine_name}: wrong value");
        }
    }
    let get_p50_us = percentile(&mut samples, 0.5).as_secs_f64() * 1e6;
    let get_p99_us = percentile(&mut samples, 0.99).as_secs_f64() * 1e6;

    // Two threads, as a parallel compile on this machine does.
    let per_thread = entries.len();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..2u64 {
            let engine = &engine;
            scope.spawn(move || {
                let mut rng = Rng(7 + t);
                for _ in 0..per_thread {
                    engine.get(&entries[rng.below(entries.len())].0).unwrap();
                }
            });
        }
    });
    let two_thread_gets_per_s = (2 * per_thread) as f64 / start.elapsed().as_secs_f64();
    engine.flush()?;
    drop(engine);
    let disk_mib = du(&dir) as f64 / (1 << 20) as f64;

    // Four processes sharing one cache: each writes its own entries and reads everyone's.
    let shared = root.join(format!("{engine_name}-shared"));
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..4)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "worker",
                    engine_name,
                    shared.to_str().unwrap(),
                    &i.to_string(),
                    sizes,
                ])
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut ok = 0;
    for mut child in children {
        if child.wait()?.success() {
            ok += 1;
        }
    }
    let engine = open(engine_name, &shared)?;
    let mut intact = 0;
    for i in 0..4u64 {
        for (k, v) in workload(WORKER_ENTRIES, 1000 + i) {
            if engine.get(&k)?.as_deref() == Some(&v[..]) {
                intact += 1;
            }
        }
    }
    let shared_ok = format!("{ok}/4 ok, {intact}/{} intact", 4 * WORKER_ENTRIES);
    Ok(Row {
        engine: match engine_name {
            "files" => "files (ab/<hex>, temp+rename)",
            "sqlite" => "SQLite (fncache DiskStore)",
            _ => "LMDB (heed)",
        },
        put_us,
        get_p50_us,
        get_p99_us,
        two_thread_gets_per_s,
        disk_mib,
        shared_ok,
    })
}

const WORKER_ENTRIES: usize = 2000;

/// One of the four sharing processes: writes its entries one by one, reading others' between.
fn worker(engine_name: &str, dir: &Path, index: u64) -> Result<()> {
    let engine = open(engine_name, dir)?;
    let mine = workload(WORKER_ENTRIES, 1000 + index);
    let mut rng = Rng(index + 99);
    for (i, (k, v)) in mine.iter().enumerate() {
        engine.put(k, v)?;
        if i % 4 == 0 {
            let other = workload(1, 1000 + rng.below(4) as u64);
            let _ = engine.get(&other[0].0)?;
        }
    }
    engine.flush()?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        FUNCTION_SIZES.store(args[4] == "functions", std::sync::atomic::Ordering::Relaxed);
        return worker(&args[1], Path::new(&args[2]), args[3].parse()?);
    }
    let count: usize = args
        .first()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let sizes = args.get(1).cloned().unwrap_or_else(|| "functions".into());
    FUNCTION_SIZES.store(sizes == "functions", std::sync::atomic::Ordering::Relaxed);
    let entries = workload(count, 1);
    let total: usize = entries.iter().map(|(_, v)| v.len()).sum();
    let root = tempfile::Builder::new()
        .prefix("fncache-storage-bench")
        .tempdir_in("/var/tmp")?;
    println!(
        "{count} entries, {:.1} MiB of values ({sizes} sizes), keys 32 bytes\n",
        total as f64 / (1 << 20) as f64
    );
    println!("| engine | put (us/entry, batched where the engine can) | get p50 (us) | get p99 (us) | 2 threads (gets/s) | disk (MiB) | 4 processes sharing |");
    println!("|---|---|---|---|---|---|---|");
    for engine in ["files", "sqlite", "lmdb"] {
        let row = bench(engine, &entries, root.path(), &sizes)?;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.0}k | {:.1} | {} |",
            row.engine,
            row.put_us,
            row.get_p50_us,
            row.get_p99_us,
            row.two_thread_gets_per_s / 1000.0,
            row.disk_mib,
            row.shared_ok
        );
    }
    Ok(())
}
