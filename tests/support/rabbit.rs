//! RabbitMQ for tests: helpers for the machine's shared broker, and private
//! nodes for tests that stop and start the broker.
//!
//! Most tests only publish and consume, so they share the machine's broker
//! (`amqp://guest:guest@127.0.0.1:5672/%2f`, overridable with
//! `SITESYNC_TEST_AMQP_URL`) and isolate themselves with unique exchange and
//! queue names ([`unique_names`]).  Tests that take the broker down (to check
//! that the connector retries and loses nothing) cannot do that to a shared
//! broker, so they start a [`PrivateRabbit`]: a node of its own, with its own
//! ports, data directory and Erlang cookie.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ErrorKind};

use super::{
    TestDir, chown_recursive, command_as, describe_output, free_port, is_root, process_alive,
    process_cmdline_contains, random_hex, signal_and_wait_blocking, tail_file, user_ids,
};

/// URL of the machine's shared broker, unless overridden.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Environment variable overriding [`DEFAULT_AMQP_URL`].
pub const AMQP_URL_ENV: &str = "SITESYNC_TEST_AMQP_URL";

/// URL of the shared broker used by tests that do not need a private node.
pub fn shared_amqp_url() -> String {
    std::env::var(AMQP_URL_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_string())
}

/// A short unique token, `prefix` followed by 8 hex characters (e.g.
/// `unique_names("t")` → `t3f9a0c12`), to derive per-test exchange and queue
/// names on the shared broker so that parallel tests (and earlier runs'
/// leftovers) never see each other's messages.
pub fn unique_names(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(8))
}

/// Opens an AMQP connection (no automatic recovery).
pub async fn try_connect(url: &str) -> lapin::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default()).await
}

/// Opens an AMQP connection; panics (naming the URL) when that fails.
pub async fn connect(url: &str) -> Connection {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {url}: {e}"))
}

/// Number of ready messages in `queue`, or `None` when the queue does not
/// exist.
///
/// Uses a passive declare on a connection of its own: the broker answers a
/// passive declare of a missing queue with a 404 that closes the channel,
/// which must not disturb the caller's channels.  Panics on any other error
/// (broker unreachable, ...): "no such queue" and "cannot ask" must not look
/// alike in a test.  While a broker may be down, poll
/// [`try_queue_len`] instead.
pub async fn queue_len(url: &str, queue: &str) -> Option<u32> {
    try_queue_len(url, queue)
        .await
        .unwrap_or_else(|e| panic!("passive declare of queue {queue:?} on {url}: {e}"))
}

/// Like [`queue_len`], but returns errors other than "no such queue"
/// (e.g. broker unreachable) instead of panicking.
pub async fn try_queue_len(url: &str, queue: &str) -> lapin::Result<Option<u32>> {
    let conn = try_connect(url).await?;
    let result = async {
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
    }
    .await;
    let _ = conn.close(200, "queue_len done".into()).await;
    match result {
        Ok(q) => Ok(Some(q.message_count())),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a lapin error is the broker's 404 NOT_FOUND.
pub fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

/// Consumes and acknowledges messages from `queue` until `expected` messages
/// arrived or `timeout` passed, and returns them in delivery order (body in
/// `data`, headers and other properties in `properties`).
///
/// Fewer than `expected` messages are returned on timeout, so the caller's
/// assertion shows how many arrived.  Messages beyond `expected` are left in
/// the queue (they are requeued when the consumer's channel closes).
/// Acknowledgements are sent in batches (`multiple`) with a prefetch window,
/// which keeps draining 100,000 messages fast.
pub async fn drain(url: &str, queue: &str, expected: usize, timeout: Duration) -> Vec<Delivery> {
    if expected == 0 {
        return Vec::new();
    }
    drain_until(url, queue, timeout, |got| got.len() >= expected).await
}

/// Consumes (and acks) messages of `queue` until `done` says the messages
/// received so far are enough, or `timeout` passes; returns them.  For a
/// quorum queue just after a broker restart the message count of a passive
/// declare can read 0 while the leader starts, so tests that restart the
/// broker wait for content rather than trusting a count.
pub async fn drain_until(
    url: &str,
    queue: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Delivery]) -> bool,
) -> Vec<Delivery> {
    const PREFETCH: u16 = 1000;
    const ACK_EVERY: usize = 250;

    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let conn = connect(url).await;
    let channel = conn.create_channel().await.expect("create channel");
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("basic.qos");
    let consumer_tag = unique_names("drain-");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("consume from {queue:?} on {url}: {e}"));

    let mut unacked = 0usize;
    while !done(&out) {
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => panic!("consuming from {queue:?}: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        unacked += 1;
        if unacked >= ACK_EVERY {
            delivery
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("basic.ack");
            unacked = 0;
        }
        out.push(delivery);
    }
    if unacked > 0
        && let Some(last) = out.last()
    {
        let _ = last.ack(BasicAckOptions { multiple: true }).await;
    }
    let _ = channel.close(200, "drain done".into()).await;
    let _ = conn.close(200, "drain done".into()).await;
    out
}

/// Deletes queues (cleanup after a test on the shared broker).  Missing
/// queues and errors are ignored.
pub async fn delete_queues<S: AsRef<str>>(url: &str, names: &[S]) {
    let Ok(conn) = try_connect(url).await else {
        return;
    };
    for name in names {
        // A channel per queue: an error closes the channel it happened on.
        if let Ok(channel) = conn.create_channel().await {
            let _ = channel
                .queue_delete(name.as_ref().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(200, "cleanup".into()).await;
        }
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// Deletes exchanges (cleanup after a test on the shared broker).  Missing
/// exchanges and errors are ignored.
pub async fn delete_exchanges<S: AsRef<str>>(url: &str, names: &[S]) {
    let Ok(conn) = try_connect(url).await else {
        return;
    };
    for name in names {
        if let Ok(channel) = conn.create_channel().await {
            let _ = channel
                .exchange_delete(name.as_ref().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = channel.close(200, "cleanup".into()).await;
        }
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

// ---------------------------------------------------------------------------
// Private node
// ---------------------------------------------------------------------------

/// Prefix of private nodes' temporary directories.
const DIR_PREFIX: &str = "ssrmq-";
/// User that runs the node when the tests run as root (Debian's packaging
/// owns everything RabbitMQ by this user).
const RABBIT_USER: &str = "rabbitmq";
/// How many times the first start is retried with fresh ports when another
/// process grabbed one of them in between.
const PORT_ATTEMPTS: usize = 5;
/// Time allowed for the node to boot (a cold boot takes a few seconds; with
/// several nodes booting at once on 2 cores it takes longer).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for the node's OS process to exit after `rabbitmqctl stop`.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

const MISSING_RABBIT: &str =
    "RabbitMQ not found: install it with `apt-get install rabbitmq-server`";

/// A private RabbitMQ node owned by one test, for tests that stop, kill and
/// restart the broker.
///
/// Everything lives in a temporary directory (owned by the `rabbitmq` user
/// when the tests run as root): data (`mnesia/`), logs (`log/`), config
/// files, pid file and the Erlang cookie, which is private too because
/// `HOME` points at that directory for both the server and `rabbitmqctl`.
/// The node uses its own AMQP and distribution ports, its own
/// `rabbitmq.conf` and `rabbitmq-env.conf` (so the machine's files, which
/// pin `rabbit@localhost` and port 5672, do not apply) and no plugins.
/// It registers with the machine's epmd under a unique name (`sst<hex>`).
///
/// Ports and data survive [`stop`](Self::stop) / [`start_again`](Self::start_again),
/// so durable quorum queues keep their messages.  Dropping it kills the
/// node and deletes its directory (kept when `SITESYNC_KEEP_TEST_DIRS` is
/// set); the log tail is printed first if the test is panicking.
///
/// Methods take `&self`, so the node can be shared with spawned tasks.
#[derive(Debug)]
pub struct PrivateRabbit {
    dir: TestDir,
    /// Directory holding the real `rabbitmq-server` and `rabbitmqctl` scripts.
    bin: PathBuf,
    /// `Some("rabbitmq")` when commands must run through `runuser`.
    user: Option<String>,
    node: String,
    amqp_port: u16,
    dist_port: u16,
    /// OS pid of the running node (`beam.smp`), 0 when not running.
    pid: AtomicI32,
}

/// Why a boot attempt failed.
enum BootError {
    /// One of our ports was taken by another process: retry on other ports.
    PortTaken(String),
    Other(String),
}

impl PrivateRabbit {
    /// Creates and boots a private node; returns once it accepts AMQP
    /// connections.  Panics (with the node's log) on failure.
    pub async fn start() -> PrivateRabbit {
        let began = Instant::now();
        super::sweep_orphans_once();
        let bin = find_bin_dir();
        let user = (is_root() && user_ids(RABBIT_USER).is_some()).then(|| RABBIT_USER.to_string());
        let dir = TestDir::new(DIR_PREFIX).expect("create RabbitMQ test directory");
        let node = format!("sst{}@localhost", random_hex(8));

        let mut rabbit = PrivateRabbit {
            dir,
            bin,
            user,
            node,
            amqp_port: 0,
            dist_port: 0,
            pid: AtomicI32::new(0),
        };
        for attempt in 1..=PORT_ATTEMPTS {
            rabbit.amqp_port = free_port();
            rabbit.dist_port = free_port();
            rabbit.prepare_dir();
            match rabbit.boot().await {
                Ok(()) => break,
                Err(BootError::PortTaken(why)) if attempt < PORT_ATTEMPTS => {
                    eprintln!("[harness] private RabbitMQ: {why}; retrying on other ports");
                    // Whatever the failed boot initialised is discarded.
                    let _ = fs::remove_dir_all(rabbit.dir.path().join("mnesia"));
                    let _ = fs::remove_dir_all(rabbit.dir.path().join("log"));
                }
                Err(BootError::PortTaken(why) | BootError::Other(why)) => {
                    panic!(
                        "private RabbitMQ node {} failed to start: {why}",
                        rabbit.node
                    )
                }
            }
        }
        eprintln!(
            "[harness] private RabbitMQ node {} on port {} ready in {:?} ({})",
            rabbit.node,
            rabbit.amqp_port,
            began.elapsed(),
            rabbit.dir.path().display()
        );
        rabbit
    }

    /// AMQP URL of this node (`guest`/`guest`, default vhost).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// AMQP port (127.0.0.1).
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// Erlang node name, e.g. `sst1a2b3c4d@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The node's main log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("log").join("rabbit.log")
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path(), lines)
    }

    /// Whether the node's OS process is running (as far as this handle
    /// knows: it was started and not stopped or killed through it).
    pub fn is_running(&self) -> bool {
        let pid = self.pid.load(Ordering::SeqCst);
        pid > 0 && process_alive(pid)
    }

    /// Graceful stop (`rabbitmqctl -n NODE stop`); returns once the node's
    /// OS process has exited, so its ports are free for
    /// [`start_again`](Self::start_again).
    pub async fn stop(&self) {
        let out = self.rabbitmqctl(&["stop"]).await;
        if !out.status.success() {
            panic!(
                "rabbitmqctl -n {} stop failed: {}\n--- node log ---\n{}",
                self.node,
                describe_output(&out),
                self.log_tail(30)
            );
        }
        self.wait_exited().await;
    }

    /// Kills the node with SIGKILL (a broker crash: no goodbye to clients,
    /// nothing flushed beyond what RabbitMQ already fsync'ed) and waits until
    /// it is gone.
    pub async fn kill(&self) {
        let pid = self.current_pid();
        if pid > 0 && process_cmdline_contains(pid, &self.dir.path().to_string_lossy()) {
            // SAFETY: plain kill(2) on the node's own beam process.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        self.wait_exited().await;
    }

    /// Boots the node again on the same data directory, node name and
    /// ports; returns once it accepts AMQP connections.
    pub async fn start_again(&self) {
        if let Err(BootError::PortTaken(why) | BootError::Other(why)) = self.boot().await {
            panic!(
                "private RabbitMQ node {} failed to start again: {why}",
                self.node
            );
        }
    }

    /// Environment of every server and CLI command for this node.
    fn env(&self) -> Vec<(String, String)> {
        let d = self.dir.path().display();
        [
            // The Erlang cookie is read from $HOME: server and CLI must agree.
            ("HOME", format!("{d}")),
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_string()),
            ("RABBITMQ_NODE_PORT", self.amqp_port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", format!("{d}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{d}/log")),
            ("RABBITMQ_LOGS", format!("{d}/log/rabbit.log")),
            ("RABBITMQ_PID_FILE", format!("{d}/rabbit.pid")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                format!("{d}/enabled_plugins"),
            ),
            ("RABBITMQ_CONFIG_FILE", format!("{d}/rabbitmq.conf")),
            // Never created: keeps /etc/rabbitmq/advanced.config out.
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                format!("{d}/advanced.config"),
            ),
            // Replaces /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost).
            ("RABBITMQ_CONF_ENV_FILE", format!("{d}/rabbitmq-env.conf")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Writes the node's files (config, env, plugins, cookie) and gives the
    /// directory to the `rabbitmq` user.
    fn prepare_dir(&self) {
        let d = self.dir.path();
        for sub in ["mnesia", "log"] {
            fs::create_dir_all(d.join(sub)).expect("create RabbitMQ subdirectory");
        }
        // No plugins: management (15672) or prometheus (15692) would clash
        // with the machine's node if it enabled them.
        fs::write(d.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "# Written by the sitesync test harness (tests/support/rabbit.rs).\n\
                 listeners.tcp.1 = 127.0.0.1:{port}\n\
                 log.console = false\n\
                 log.file.level = info\n\
                 disk_free_limit.absolute = 10MB\n",
                port = self.amqp_port
            ),
        )
        .expect("write rabbitmq.conf");
        // Same loopback-only distribution as the machine's rabbitmq-env.conf.
        fs::write(
            d.join("rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS=127.0.0.1\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .expect("write rabbitmq-env.conf");
        let cookie = d.join(".erlang.cookie");
        if !cookie.exists() {
            // Written before anything runs: if the CLI ran first it would
            // create a different random cookie and never reach the node.
            let value = random_hex(20).to_uppercase();
            fs::write(&cookie, value).expect("write .erlang.cookie");
            fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
                .expect("chmod .erlang.cookie");
        }
        if self.user.is_some() {
            let (uid, gid) = user_ids(RABBIT_USER).expect("rabbitmq user");
            chown_recursive(d, uid, gid).expect("chown RabbitMQ test directory");
        }
    }

    /// Launches `rabbitmq-server -detached` and polls until the node
    /// accepts an AMQP connection, its process died, or it wrote a crash
    /// dump.
    async fn boot(&self) -> Result<(), BootError> {
        let d = self.dir.path();
        for dump in [
            d.join("erl_crash.dump"),
            d.join("log").join("erl_crash.dump"),
        ] {
            let _ = fs::remove_file(dump);
        }
        let _ = fs::remove_file(d.join("rabbit.pid"));
        let startup_log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("startup.log"))
            .expect("open startup.log");
        let mut cmd = self.command("rabbitmq-server");
        cmd.arg("-detached")
            .stdout(startup_log.try_clone().expect("dup startup.log"))
            .stderr(startup_log);
        // `-detached` forks the VM into the background and returns at once.
        let status = tokio::process::Command::from(cmd)
            .status()
            .await
            .unwrap_or_else(|e| panic!("cannot run rabbitmq-server: {e}"));
        if !status.success() {
            return Err(BootError::Other(format!(
                "rabbitmq-server -detached: {status}\n{}",
                self.diagnostics()
            )));
        }

        let url = self.amqp_url();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut delay = Duration::from_millis(50);
        loop {
            if let Ok(conn) = try_connect(&url).await {
                let _ = conn.close(200, "harness readiness probe".into()).await;
                let pid = read_pid(&d.join("rabbit.pid")).unwrap_or(0);
                self.pid.store(pid, Ordering::SeqCst);
                return Ok(());
            }
            let pid = read_pid(&d.join("rabbit.pid"));
            let exited = pid.is_some_and(|pid| !process_alive(pid));
            if let Some(slogan) = self.crash_slogan() {
                // Let the VM finish writing the dump and exit, so that a
                // retry does not race with it for the directory.
                if let Some(pid) = pid {
                    let _ = super::wait_for(async || !process_alive(pid), STOP_TIMEOUT).await;
                }
                let why = format!("node crashed: {slogan}\n{}", self.diagnostics());
                // AMQP port taken: `could_not_start_listener` (the log says
                // eaddrinuse); distribution port taken: `dist_port_already_used`.
                let port_taken = [
                    "eaddrinuse",
                    "could_not_start_listener",
                    "dist_port_already_used",
                ]
                .iter()
                .any(|s| slogan.contains(s));
                return Err(if port_taken {
                    BootError::PortTaken(why)
                } else {
                    BootError::Other(why)
                });
            }
            if exited {
                // It may have exited between the two checks above, after
                // writing a dump: look once more before giving up on a cause.
                if self.crash_slogan().is_some() {
                    continue;
                }
                return Err(BootError::Other(format!(
                    "node process exited during boot\n{}",
                    self.diagnostics()
                )));
            }
            if Instant::now() >= deadline {
                return Err(BootError::Other(format!(
                    "no AMQP connection on {url} after {BOOT_TIMEOUT:?}\n{}",
                    self.diagnostics()
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// The "Slogan:" line (the reason) of an Erlang crash dump written by the
    /// node, if any.  Boot failures before logging is set up (e.g. the
    /// distribution port is taken) only show up there.
    fn crash_slogan(&self) -> Option<String> {
        let d = self.dir.path();
        for dump in [
            d.join("erl_crash.dump"),
            d.join("log").join("erl_crash.dump"),
        ] {
            let Ok(file) = fs::File::open(&dump) else {
                continue;
            };
            let mut head = String::new();
            let _ = file.take(64 * 1024).read_to_string(&mut head);
            let slogan = head
                .lines()
                .find_map(|l| l.strip_prefix("Slogan: "))
                .unwrap_or("<crash dump without slogan yet>");
            return Some(format!("{slogan} ({})", dump.display()));
        }
        None
    }

    /// Startup output and log tail, for panic messages.
    fn diagnostics(&self) -> String {
        format!(
            "--- startup output ---\n{}\n--- node log ({}) ---\n{}",
            tail_file(&self.dir.path().join("startup.log"), 20),
            self.log_path().display(),
            self.log_tail(30)
        )
    }

    /// The node's pid: the one recorded at boot, else the pid file's.
    fn current_pid(&self) -> i32 {
        match self.pid.load(Ordering::SeqCst) {
            0 => read_pid(&self.dir.path().join("rabbit.pid")).unwrap_or(0),
            pid => pid,
        }
    }

    /// Polls until the node's OS process is gone.
    async fn wait_exited(&self) {
        let pid = self.current_pid();
        if pid > 0 {
            let gone = super::wait_for(async || !process_alive(pid), STOP_TIMEOUT).await;
            if let Err(e) = gone {
                panic!(
                    "RabbitMQ node {} (pid {pid}) did not exit: {e}\n--- node log ---\n{}",
                    self.node,
                    self.log_tail(30)
                );
            }
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    /// Runs `rabbitmqctl -n NODE ARGS…` with the node's environment (and
    /// cookie), e.g. `node.rabbitmqctl(&["list_queues", "name", "messages"])`.
    /// Takes about a second: the CLI is an Erlang VM of its own.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.command("rabbitmqctl");
        cmd.arg("-n").arg(&self.node).args(args);
        tokio::process::Command::from(cmd)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run rabbitmqctl: {e}"))
    }

    /// A command for one of RabbitMQ's scripts, as the `rabbitmq` user
    /// when root, with this node's environment and nothing inherited that
    /// could redirect it (`RABBITMQ_*`, `ERL_*` variables of the caller).
    fn command(&self, script: &str) -> std::process::Command {
        let mut cmd = command_as(
            self.user.as_deref(),
            &self.bin.join(script),
            &self.env(),
            self.dir.path(),
        );
        for (key, _) in std::env::vars_os() {
            if let Some(k) = key.to_str()
                && (k.starts_with("RABBITMQ_") || k.starts_with("ERL_"))
            {
                cmd.env_remove(k);
            }
        }
        cmd
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- private RabbitMQ node {} log ({}), last 40 lines ---\n{}",
                self.node,
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        // The data is thrown away, so no graceful stop: SIGKILL is immediate.
        let pid = self.current_pid();
        if pid > 0 && process_cmdline_contains(pid, &self.dir.path().to_string_lossy()) {
            signal_and_wait_blocking(pid, libc::SIGKILL, Duration::from_secs(10));
        }
        // `self.dir` (a TestDir) removes the directory when dropped next.
    }
}

/// The directory holding the real `rabbitmq-server`/`rabbitmqctl` scripts.
///
/// On Debian, `/usr/sbin/rabbitmq-server` is a wrapper that switches to the
/// `rabbitmq` user with `su` (so `HOME`, hence the cookie, becomes
/// `/var/lib/rabbitmq`) and refuses other users; the harness calls the
/// scripts under `/usr/lib/rabbitmq/bin` itself instead, with its own `HOME`.
/// Elsewhere, the scripts found on `PATH` are used.
pub fn find_bin_dir() -> PathBuf {
    let debian = Path::new("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() && debian.join("rabbitmqctl").exists() {
        return debian.to_path_buf();
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("rabbitmq-server").exists() && dir.join("rabbitmqctl").exists() {
                return dir;
            }
        }
    }
    panic!("{MISSING_RABBIT}");
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Kills nodes left behind by test processes that died without cleaning up
/// (see [`TestDir::sweep_orphans`]).
pub(super) fn sweep_orphans() {
    TestDir::sweep_orphans(DIR_PREFIX, |dir: &Path| {
        if let Some(pid) = read_pid(&dir.join("rabbit.pid"))
            && process_cmdline_contains(pid, &dir.to_string_lossy())
        {
            signal_and_wait_blocking(pid, libc::SIGKILL, Duration::from_secs(10));
        }
    });
}
