//! A connection to one Redis server on which every request has a deadline on its whole reply.
//!
//! The `redis` crate's blocking connection bounds each read from the socket, not a reply: a
//! server that sends a byte every 100 ms never times out and never finishes (found by an
//! attack, issue 13). This connection uses the crate's command encoding and reply parser, and
//! owns the socket, so that before every read it sets the socket's timeout to what is left of
//! the request's deadline. It implements [`redis::ConnectionLike`], so commands and pipelines
//! run on it as on the crate's own.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, RedisResult, Value};

/// See the module documentation.
pub struct DeadlineConnection {
    stream: DeadlineStream,
    parser: redis::Parser,
    db: i64,
    timeout: Duration,
    /// A request failed or ran out of time: what is left on the socket cannot be trusted to
    /// belong to the next request, so the connection is not used again.
    broken: bool,
}

/// The socket, with the deadline of the request in flight applied to every read and write.
struct DeadlineStream {
    socket: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn time_left(&self) -> io::Result<Duration> {
        match self.deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no whole reply within the timeout",
            )),
        }
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.set_read_timeout(Some(self.time_left()?))?;
        self.socket.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket.set_write_timeout(Some(self.time_left()?))?;
        self.socket.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

impl DeadlineConnection {
    /// Connects to the server `info` names (TCP only), authenticates and selects its database,
    /// all within `timeout`; each later request gets `timeout` for its whole reply.
    pub fn connect(info: &ConnectionInfo, timeout: Duration) -> RedisResult<DeadlineConnection> {
        let ConnectionAddr::Tcp(host, port) = &info.addr else {
            return Err(unsupported("only redis://HOST:PORT is supported here"));
        };
        let deadline = Instant::now() + timeout;
        let mut last_error = None;
        let mut socket = None;
        for address in (host.as_str(), *port).to_socket_addrs()? {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&address, left) {
                Ok(connected) => {
                    socket = Some(connected);
                    break;
                }
                Err(error) => last_error = Some(error),
            }
        }
        let socket = socket.ok_or_else(|| {
            last_error.unwrap_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "connect"))
        })?;
        socket.set_nodelay(true)?;
        let mut connection = DeadlineConnection {
            stream: DeadlineStream { socket, deadline },
            parser: redis::Parser::new(),
            db: info.redis.db,
            timeout,
            broken: false,
        };
        if let Some(password) = &info.redis.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = &info.redis.username {
                auth.arg(username);
            }
            auth.arg(password).query::<()>(&mut connection)?;
        }
        if info.redis.db != 0 {
            redis::cmd("SELECT")
                .arg(info.redis.db)
                .query::<()>(&mut connection)?;
        }
        Ok(connection)
    }

    /// Sends `packed` and reads `count` replies, all before one deadline.
    fn request(&mut self, packed: &[u8], count: usize) -> RedisResult<Vec<Value>> {
        if self.broken {
            return Err(unsupported("the connection failed before"));
        }
        self.stream.deadline = Instant::now() + self.timeout;
        let result = self.exchange(packed, count);
        self.broken = result.is_err();
        result
    }

    fn exchange(&mut self, packed: &[u8], count: usize) -> RedisResult<Vec<Value>> {
        self.stream.write_all(packed)?;
        let mut replies = Vec::with_capacity(count);
        while replies.len() < count {
            match self.parser.parse_value(&mut self.stream)? {
                Value::Push { .. } => {} // RESP3 out-of-band data between replies
                reply => replies.push(reply),
            }
        }
        Ok(replies)
    }
}

fn unsupported(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, what))
}

impl redis::ConnectionLike for DeadlineConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        Ok(self.request(cmd, 1)?.pop().expect("one reply was read"))
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let mut replies = self.request(cmd, offset + count)?;
        // As the crate's own connection does: an error among the skipped replies (a failed
        // MULTI) is the pipeline's error.
        for reply in replies.drain(..offset) {
            if let Value::ServerError(error) = reply {
                return Err(error.into());
            }
        }
        Ok(replies)
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        !self.broken
    }
}
