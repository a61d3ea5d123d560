//! The remote store: Redis (standalone or Cluster), shared by a fleet of machines.
//!
//! Layout: one Redis string per key, `fncache:v1:<hex key id>`, holding the 32-byte [`Link`]
//! and then the encoded entry. The link binds the entry to the key it is stored under
//! (BLAKE3-keyed over the key id and the entry's digest, with the cache's secret), so that an
//! entry copied under another key is rejected like one written without the secret. This store
//! checks nothing itself: [`Cache`](crate::Cache) checks the link and the entry. Entries are
//! not shared between keys as on disk: Redis has no transactions across keys worth paying for
//! here, and its memory is bounded by its own `maxmemory` policy (or the TTL set here).
//!
//! Redis is never allowed to fail or stall a compile:
//! - every operation has a timeout ([`RemoteConfig::timeout`](crate::RemoteConfig));
//! - a circuit breaker opens after [`FAILURES_TO_OPEN`] failures in a row: while open, reads
//!   miss and writes are dropped without touching the network; every [`RETRY_AFTER`] one
//!   operation is let through to see whether Redis is back, and sharing resumes by itself;
//! - writes go to a background thread that sends them in pipelined batches.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::ConnectionLike;

use super::build::redact;
use super::{Eviction, Found, Origin, Store, StoreError, StoredEntry, Usage};
use crate::config::RemoteConfig;
use crate::entry;
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;

/// Failures in a row that open the circuit.
pub const FAILURES_TO_OPEN: u32 = 3;
/// How long the circuit stays open before one operation tries Redis again.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
const KEY_PREFIX: &str = "fncache:v1:";
const TAG_LEN: usize = 32;
/// Writes sent in one pipeline at most.
const WRITE_BATCH: usize = 256;
/// How long a write waits for others to go in its pipeline (no longer than a flush waits).
const WRITE_LINGER: Duration = Duration::from_millis(5);
/// Reads sent in one pipeline at most by [`Store::get_many`].
const READ_BATCH: usize = 256;

mod connection;

use connection::DeadlineConnection;

enum Client {
    Single(redis::ConnectionInfo),
    Cluster(redis::cluster::ClusterClient),
}

enum Connection {
    Single(DeadlineConnection),
    Cluster(redis::cluster::ClusterConnection),
}

impl Connection {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Connection::Single(c) => c,
            Connection::Cluster(c) => c,
        }
    }
}

/// Opens after repeated failures; lets one operation through now and then while open.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    fn allows(&self) -> bool {
        let mut open_until = self.open_until.lock();
        match *open_until {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                // Half open: this caller tries; others wait for the next period.
                *open_until = Some(Instant::now() + RETRY_AFTER);
                true
            }
            None => true,
        }
    }

    fn succeeded(&self) {
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            *self.open_until.lock() = None;
        }
    }

    /// Returns whether this failure opened the circuit.
    fn failed(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= FAILURES_TO_OPEN {
            let mut open_until = self.open_until.lock();
            let opening = open_until.is_none();
            *open_until = Some(Instant::now() + RETRY_AFTER);
            return opening;
        }
        false
    }

    fn is_open(&self) -> bool {
        self.open_until.lock().is_some()
    }
}

struct Shared {
    client: Client,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    breaker: Breaker,
    warned: AtomicBool,
    location: String,
    errors: AtomicU64,
    /// Time spent waiting for Redis since the budget was last renewed, in microseconds.
    spent_micros: AtomicU64,
    budget: Duration,
    budget_warned: AtomicBool,
}

impl Shared {
    /// Whether this compile's time for the remote tier is used up (warned about once).
    fn over_budget(&self) -> bool {
        let spent = Duration::from_micros(self.spent_micros.load(Ordering::Relaxed));
        if spent <= self.budget {
            return false;
        }
        if !self.budget_warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "the remote cache {} is slow: this compile waited {:.1} s for it in all, its \
                 budget; the rest compiles without it",
                self.location,
                spent.as_secs_f64()
            );
        }
        true
    }

    fn connect(&self) -> redis::RedisResult<Connection> {
        if let Some(conn) = self.idle.lock().pop() {
            return Ok(conn);
        }
        Ok(match &self.client {
            Client::Single(info) => {
                Connection::Single(DeadlineConnection::connect(info, self.timeout)?)
            }
            // The cluster client's own connections bound each read, not a whole reply.
            Client::Cluster(client) => Connection::Cluster(client.get_connection()?),
        })
    }

    /// Runs `op` on a connection, through the breaker and the budget; `None` when the breaker
    /// is open, the budget spent, or the operation failed (which is counted, and warned about
    /// once). A reply slower than half the timeout counts as a failure for the breaker too,
    /// though it is used: a Redis that answers just under the timeout every time must not slow
    /// every lookup down.
    fn run<T>(
        &self,
        op: impl FnOnce(&mut dyn ConnectionLike) -> redis::RedisResult<T>,
    ) -> Option<T> {
        self.run_on(|conn| op(conn.as_dyn()))
    }

    /// [`Shared::run`], for an operation that needs to know which kind of connection it has.
    fn run_on<T>(&self, op: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Option<T> {
        if self.over_budget() || !self.breaker.allows() {
            return None;
        }
        let start = Instant::now();
        let result = self.connect().and_then(|mut conn| {
            let result = op(&mut conn);
            if result.is_ok() {
                self.idle.lock().push(conn); // a connection that failed is dropped
            }
            result
        });
        let elapsed = start.elapsed();
        self.spent_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let error = match result {
            Ok(value) if elapsed <= self.timeout / 2 => {
                self.breaker.succeeded();
                return Some(value);
            }
            Ok(value) => {
                self.breaker.failed();
                return Some(value);
            }
            Err(error) => error,
        };
        self.errors.fetch_add(1, Ordering::Relaxed);
        let opened = self.breaker.failed();
        if opened && !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "the remote cache {} is not answering ({error}); compiling without it, \
                 and trying it again every {} s",
                self.location,
                RETRY_AFTER.as_secs()
            );
        }
        None
    }
}

/// A Redis-backed store. See the module documentation.
pub struct RedisStore {
    shared: Arc<Shared>,
    ttl: Option<Duration>,
    /// Errors already handed on by [`Store::take_counters`].
    errors_taken: AtomicU64,
    writes: Option<mpsc::Sender<WriteOp>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

enum WriteOp {
    Set(String, Vec<u8>),
    Delete(String),
    Flush(mpsc::SyncSender<()>),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("location", &self.shared.location)
            .finish()
    }
}

impl RedisStore {
    /// Connects lazily: an unreachable Redis is not an error here, only a store that misses.
    pub fn open(config: &RemoteConfig) -> Result<RedisStore, StoreError> {
        let urls: Vec<&str> = config.url.split(',').map(str::trim).collect();
        let bad = |e: redis::RedisError| {
            StoreError::Unusable(format!(
                "remote cache URL {}: {e}; expected redis://HOST:PORT[/DB]",
                redact(&config.url)
            ))
        };
        let client = if urls.len() > 1 || config.url.starts_with("redis+cluster://") {
            let urls: Vec<String> = urls
                .iter()
                .map(|u| u.replacen("redis+cluster://", "redis://", 1))
                .collect();
            Client::Cluster(
                redis::cluster::ClusterClient::builder(urls)
                    .connection_timeout(config.timeout)
                    .response_timeout(config.timeout)
                    .build()
                    .map_err(bad)?,
            )
        } else {
            let client = redis::Client::open(config.url.as_str()).map_err(bad)?;
            Client::Single(client.get_connection_info().clone())
        };
        let shared = Arc::new(Shared {
            client,
            timeout: config.timeout,
            idle: Mutex::new(Vec::new()),
            breaker: Breaker::default(),
            warned: AtomicBool::new(false),
            location: redact(&config.url),
            errors: AtomicU64::new(0),
            spent_micros: AtomicU64::new(0),
            budget: config.budget,
            budget_warned: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let ttl = config.ttl;
        let thread = std::thread::Builder::new()
            .name("fncache-remote".into())
            .spawn(move || write_loop(&writer_shared, ttl, rx))
            .map_err(|e| StoreError::Unusable(format!("cannot start the remote writer: {e}")))?;
        let (writes, writer) = (Some(tx), Some(thread));
        Ok(RedisStore {
            shared,
            ttl: config.ttl,
            errors_taken: AtomicU64::new(0),
            writes,
            writer,
        })
    }

    /// Failed operations since this store was opened (timeouts, refused connections).
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    /// Whether the circuit breaker is keeping Redis out of compiles right now.
    pub fn is_circuit_open(&self) -> bool {
        self.shared.breaker.is_open()
    }

    /// The time-to-live new entries get, if any.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    fn send(&self, op: WriteOp) {
        if let Some(writes) = &self.writes {
            let _ = writes.send(op);
        }
    }
}

/// What a stored value holds: the 32-byte link, then the encoded entry. A value too short for
/// its link is handed on with a link of zeros and whatever digest its header claims: the cache
/// rejects it, counts it and removes the key.
fn found_entry(value: &[u8]) -> Found {
    let link = value.get(..TAG_LEN).and_then(Link::from_slice);
    let stored = value.get(TAG_LEN..).unwrap_or_default();
    Found {
        digest: entry::header_digest(stored).unwrap_or(Digest([0; 32])),
        link: link.unwrap_or(Link(Digest([0; 32]))),
        entry: StoredEntry::Whole(Arc::from(stored)),
        origin: Origin::Remote,
        tier: 0,
    }
}

fn redis_key(key: &KeyId) -> String {
    format!("{KEY_PREFIX}{}", key.0.to_hex())
}

fn write_loop(shared: &Shared, ttl: Option<Duration>, rx: mpsc::Receiver<WriteOp>) {
    while let Ok(first) = rx.recv() {
        // Writes made during a compile come one at a time: each sent at once was a round trip
        // of its own (sql.js: 2,034 of them), and the waking and switching slowed the compile
        // threads on two cores. The batch waits up to WRITE_LINGER for more, unless a flush is
        // waiting for it.
        let linger_until = Instant::now() + WRITE_LINGER;
        let mut flushing = matches!(first, WriteOp::Flush(_));
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            let next = if flushing {
                rx.try_recv().ok()
            } else {
                let left = linger_until.saturating_duration_since(Instant::now());
                rx.recv_timeout(left).ok()
            };
            let Some(op) = next else { break };
            flushing |= matches!(op, WriteOp::Flush(_));
            batch.push(op);
        }
        let mut commands = Vec::new();
        let mut flushes = Vec::new();
        for op in batch {
            match op {
                WriteOp::Set(key, value) => {
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(key).arg(value);
                    if let Some(ttl) = ttl {
                        cmd.arg("EX").arg(ttl.as_secs().max(1));
                    }
                    commands.push(cmd);
                }
                WriteOp::Delete(key) => {
                    let mut cmd = redis::cmd("DEL");
                    cmd.arg(key);
                    commands.push(cmd);
                }
                WriteOp::Flush(reply) => flushes.push(reply),
            }
        }
        if !commands.is_empty() {
            // A failed batch is dropped: the entries are a cache, compiled again if missing.
            shared.run_on(move |conn| send_pipelined(conn, commands));
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

/// Sends `commands` in one pipeline: to the one server, or, in a cluster, split by the node
/// that owns each key's hash slot (the cluster client's pipeline does the splitting).
fn send_pipelined(conn: &mut Connection, commands: Vec<redis::Cmd>) -> redis::RedisResult<()> {
    query_pipelined::<redis::Value>(conn, commands.into_iter()).map(drop)
}

/// Sends `commands` in one pipeline, as [`send_pipelined`] does, and returns their replies in
/// order.
fn query_pipelined<T: redis::FromRedisValue>(
    conn: &mut Connection,
    commands: impl Iterator<Item = redis::Cmd>,
) -> redis::RedisResult<Vec<T>> {
    match conn {
        Connection::Single(conn) => {
            let mut pipe = redis::pipe();
            for cmd in commands {
                pipe.add_command(cmd);
            }
            pipe.query(conn)
        }
        Connection::Cluster(conn) => {
            let mut pipe = redis::cluster::cluster_pipe();
            for cmd in commands {
                pipe.add_command(cmd);
            }
            pipe.query(conn)
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.writes.take(); // the writer sends what is queued, then stops
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Store for RedisStore {
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        let name = redis_key(key);
        let Some(found) = self
            .shared
            .run(|conn| redis::cmd("GET").arg(&name).query::<Option<Vec<u8>>>(conn))
        else {
            return Ok(None);
        };
        let Some(value) = found else {
            return Ok(None);
        };
        Ok(Some(found_entry(&value)))
    }

    /// Pipelined `GET`s, [`READ_BATCH`] keys per round trip; in a cluster the pipeline is
    /// split by the node that owns each key's hash slot. Each batch goes through the breaker
    /// and the budget like any operation, so a Redis that is down costs what they allow.
    fn get_many(
        &self,
        keys: &[KeyId],
        found: &mut dyn FnMut(KeyId, Found),
    ) -> Result<(), StoreError> {
        for batch in keys.chunks(READ_BATCH) {
            let names: Vec<String> = batch.iter().map(redis_key).collect();
            let Some(values) = self.shared.run_on(|conn| {
                let commands = names.iter().map(|name| {
                    let mut cmd = redis::cmd("GET");
                    cmd.arg(name);
                    cmd
                });
                query_pipelined::<Option<Vec<u8>>>(conn, commands)
            }) else {
                return Ok(()); // counted, and warned about by the breaker
            };
            for (key, value) in batch.iter().zip(values) {
                if let Some(value) = value {
                    found(*key, found_entry(&value));
                }
            }
        }
        Ok(())
    }

    fn put(
        &self,
        key: KeyId,
        link: Link,
        _digest: Digest,
        entry: Arc<[u8]>,
    ) -> Result<(), StoreError> {
        if self.shared.breaker.is_open() {
            return Ok(()); // nothing to send it to; the writer would drop it anyway
        }
        let mut value = Vec::with_capacity(TAG_LEN + entry.len());
        value.extend_from_slice(link.as_bytes());
        value.extend_from_slice(&entry);
        self.send(WriteOp::Set(redis_key(&key), value));
        Ok(())
    }

    fn remove_key(&self, key: &KeyId) -> Result<(), StoreError> {
        self.send(WriteOp::Delete(redis_key(key)));
        Ok(())
    }

    fn remove_value(&self, _digest: &Digest) -> Result<(), StoreError> {
        Ok(()) // one entry per key here: removed with its key
    }

    fn record(&self, _delta: &Counters) {}

    fn take_counters(&self) -> Counters {
        let errors = self.errors();
        let taken = self.errors_taken.swap(errors, Ordering::Relaxed);
        Counters {
            remote_errors: errors.saturating_sub(taken),
            ..Counters::default()
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        if let Some(writes) = &self.writes {
            let (tx, rx) = mpsc::sync_channel(1);
            if writes.send(WriteOp::Flush(tx)).is_ok() {
                // Bounded like everything remote: writes still queued after this are dropped
                // with the process (they are a cache).
                let _ = rx.recv_timeout(self.shared.budget + self.shared.timeout * 4);
            }
        }
        Ok(())
    }

    fn renew_budget(&self) {
        self.shared.spent_micros.store(0, Ordering::Relaxed);
        self.shared.budget_warned.store(false, Ordering::Relaxed);
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        Ok(Counters::default())
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        Ok(Usage::default())
    }

    fn max_bytes(&self) -> u64 {
        0 // bounded by Redis' maxmemory
    }

    fn evict_to(&self, _max_bytes: u64) -> Result<Eviction, StoreError> {
        Ok(Eviction::default()) // Redis evicts by its own policy
    }

    fn clear(&self) -> Result<(), StoreError> {
        Err(StoreError::Unusable(
            "the remote cache is shared; clear it with Redis' own tools (keys fncache:v1:*)".into(),
        ))
    }

    fn for_each_entry(&self, _visit: &mut dyn FnMut(Digest, &[u8])) -> Result<(), StoreError> {
        Ok(()) // verified on every read; not scanned
    }

    fn for_each_link(&self, _visit: &mut dyn FnMut(KeyId, Digest, Link)) -> Result<(), StoreError> {
        Ok(()) // verified on every read; not scanned
    }

    fn location(&self) -> String {
        self.shared.location.clone()
    }

    fn is_read_only(&self) -> bool {
        false // a read-only remote tier is this store inside a ReadOnlyStore
    }

    fn is_remote(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_lets_one_through_later() {
        let breaker = Breaker::default();
        for _ in 1..FAILURES_TO_OPEN {
            assert!(!breaker.failed());
            assert!(breaker.allows(), "still closed");
        }
        assert!(breaker.failed(), "this failure opens it");
        assert!(!breaker.allows());
        // RETRY_AFTER later: half open, one operation tries.
        *breaker.open_until.lock() = Some(Instant::now() - Duration::from_millis(1));
        assert!(breaker.allows(), "one operation tries again");
        assert!(!breaker.allows(), "and only one per period");
        breaker.succeeded();
        assert!(!breaker.is_open());
        assert!(breaker.allows());
    }

    #[test]
    fn a_success_between_failures_keeps_the_breaker_closed() {
        let breaker = Breaker::default();
        for _ in 0..10 {
            breaker.failed();
            breaker.succeeded();
        }
        assert!(!breaker.is_open());
    }

    /// A server that trickles its reply a byte every 50 ms: a 200 ms deadline on the whole
    /// reply ends the request, though every single read would have been in time.
    #[test]
    fn a_trickled_reply_runs_out_of_time() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut client, _) = listener.accept().unwrap();
            let mut request = [0u8; 64];
            let _ = client.read(&mut request);
            for byte in b"+PONG-PONG-PONG-PONG\r\n" {
                std::thread::sleep(Duration::from_millis(50));
                if client.write_all(&[*byte]).is_err() {
                    break;
                }
            }
        });
        let info = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection_info()
            .clone();
        let mut conn = DeadlineConnection::connect(&info, Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let reply = redis::cmd("PING").query::<String>(&mut conn);
        assert!(reply.is_err(), "{reply:?}");
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
        assert!(!redis::ConnectionLike::is_open(&conn), "not used again");
    }
}
