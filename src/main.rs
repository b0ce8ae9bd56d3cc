//! The `ferry` command line: `lead`, `follow`, `node`, `handoff`, `cluster`, `status`,
//! `checksum` and `demo`.
//!
//! Each subcommand is a thin layer over the library: it parses flags, reads the secret, sets up
//! logging, and maps errors to one clear message and a non-zero exit.

mod config;
mod demo;
mod lead;
mod signals;
mod status_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use ferry::auth::{Secret, Secrets, SharedSecrets};
use ferry::engine::EngineKind;
use ferry::frame::Durability;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Replicates a message broker's data directory from a leader to followers, in real time",
    long_about = "Replicates a message broker's data directory from a leader to followers, in real time.\n\n\
        The leader ships file ranges straight from the page cache (io_uring splice, or sendfile on \
        the fallback engine); followers keep byte-identical copies and ack what they hold at the \
        durability they were asked for.\n\n\
        The shared secret comes from --secret-file FILE or the FERRY_SECRET environment variable.\n\
        Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
struct Cli {
    /// Read settings from this TOML file (`key = value`, `[lead]`/`[follow]`/`[node]` sections;
    /// `handoff` and `cluster` read `[node]`'s etcd and prefix); flags and FERRY_* environment
    /// variables win over it. FERRY_CONFIG may name it instead.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct SecretArgs {
    /// File holding the shared secret (trailing newline ignored). FERRY_SECRET may hold the
    /// secret itself instead.
    #[arg(long, value_name = "FILE", env = "FERRY_SECRET_FILE")]
    secret_file: Option<PathBuf>,
}

/// Where a cluster lives: the etcd endpoints and its key prefix (`node`, `handoff`, `cluster`;
/// global so that `ferry cluster status --etcd URL` takes them after its action).
#[derive(clap::Args, Clone)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. http://10.0.0.1:2379,http://10.0.0.2:2379).
    #[arg(
        long,
        global = true,
        value_name = "URL[,URL...]",
        env = "FERRY_ETCD",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// Key prefix in etcd; nodes with the same prefix form one cluster.
    #[arg(long, global = true, default_value = "ferry", env = "FERRY_PREFIX")]
    prefix: String,
}

/// What `ferry cluster` does.
#[derive(Subcommand)]
enum ClusterAction {
    /// Who leads, the in-sync replica set (the nodes that may be elected), whether the cluster
    /// has held data, its lineage, and each node that runs or campaigns, read from etcd.
    Status {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// With every node stopped: forget the in-sync replica set, the mark that the cluster has
    /// held data, its lineage and any pending handoff, so the first node started leads whatever
    /// its data dir holds. Refused while any node runs. For a cluster whose node with the data cannot
    /// lead (README, Troubleshooting).
    Reset,
    /// Replace the shared secret kept in etcd (`ferry node --secret-from-etcd`) with a new
    /// random one, with no node restarted: the old one moves to PREFIX/secret-previous, still
    /// accepted, and the command waits until every running node holds the new one. Give it to
    /// any follower outside the cluster, then run this with --finish.
    RotateSecret {
        /// End the rotation: once every running node holds the new secret, stop accepting the
        /// old one (leaders close the connections made with it).
        #[arg(long)]
        finish: bool,
        /// How long to wait for every running node to hold the new secret.
        #[arg(long, value_name = "SECONDS", default_value_t = ferry::cluster_secret::ROTATION_WAIT_S_DEFAULT)]
        timeout: u64,
        /// Rotate to the secret in this file (trailing newline ignored, as `ferry follow
        /// --secret-file` reads it) instead of a random one: the file to give to followers
        /// outside the cluster.
        #[arg(long, value_name = "FILE", conflicts_with = "finish")]
        secret_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Serve DIR to followers, replicating every change made to it (inotify; see README for mmap).
    ///
    /// On SIGTERM or SIGINT it stops and writes DIR/.ferry/leader, from which the next `ferry
    /// lead` on DIR (same boot) resumes: followers then hash none of the files unchanged since.
    /// While serving it rewrites that record every --record-interval-ms, so a crash or SIGKILL
    /// leaves one too (followers then hash what changed since it). Started on a follower's DIR
    /// (a promotion by hand, its leader gone; stop `ferry follow` first), it goes on from the
    /// instance that follower followed, so the other followers keep what they held up to the
    /// last MARK it synced instead of hashing it (README, Initial sync). On SIGHUP it reads
    /// --secret-file and --previous-secret-file again (a rotation with no restart).
    Lead {
        /// The data directory to replicate.
        #[arg(long, value_name = "DIR", env = "FERRY_DATA_DIR")]
        data_dir: PathBuf,
        /// Address to listen on for followers, e.g. 0.0.0.0:7070.
        #[arg(long, value_name = "ADDR", env = "FERRY_LISTEN")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        secret: SecretArgs,
        /// During a rotation of the shared secret: also accept followers that authenticate
        /// with the secret in this file (the one being replaced), warning about each. Remove it
        /// once every follower holds the new one (README, Troubleshooting); a file that does
        /// not exist holds none.
        #[arg(long, value_name = "FILE", env = "FERRY_PREVIOUS_SECRET_FILE")]
        previous_secret_file: Option<PathBuf>,
        /// I/O engine; by default io_uring when it works here, else the fallback (logged).
        #[arg(long, value_name = "uring|fallback", env = "FERRY_IO_ENGINE")]
        io_engine: Option<EngineKind>,
        /// A follower that has not acked a MARK for this long is reported as lagging.
        #[arg(long, value_name = "MS", default_value_t = ferry::lag::ACK_TIMEOUT_MS_DEFAULT, env = "FERRY_ACK_TIMEOUT_MS")]
        ack_timeout_ms: u64,
        /// TCP congestion control for the connections to followers (e.g. cubic); by default
        /// the system's. BBR without the fq qdisc paces every send with a kernel timer, costing
        /// CPU, throughput and latency on a fast link (README).
        #[arg(long, value_name = "NAME", env = "FERRY_TCP_CONGESTION")]
        tcp_congestion: Option<String>,
        /// How often to rewrite DIR/.ferry/leader while serving, so that if this leader dies
        /// the next one resumes its instance; shorter means less hashing after a crash, more
        /// small writes. 0: only at a graceful stop.
        #[arg(long, value_name = "MS", default_value_t = ferry::leader_record::LEADER_RECORD_INTERVAL_MS, env = "FERRY_RECORD_INTERVAL_MS")]
        record_interval_ms: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics and JSON at http://ADDR/status.
        #[arg(long, value_name = "ADDR", env = "FERRY_HTTP")]
        http: Option<std::net::SocketAddr>,
    },
    /// Keep DIR a byte-identical copy of the leader's data directory.
    ///
    /// SIGTERM or SIGINT stops it in order: it notes in DIR/.ferry/held what it holds, so its
    /// restart hashes none of it, and exits 0 (non-zero with --once, which did not finish).
    /// SIGHUP reads --secret-file and --previous-secret-file again, for its next connection.
    Follow {
        /// Where the copy lives. Files the leader lacks are removed (never DIR/.ferry/).
        #[arg(long, value_name = "DIR", env = "FERRY_DATA_DIR")]
        data_dir: PathBuf,
        /// The leader's address, host:port.
        #[arg(long, value_name = "ADDR", env = "FERRY_LEADER")]
        leader: String,
        #[command(flatten)]
        secret: SecretArgs,
        /// During a rotation of the shared secret: the secret being replaced, with which this
        /// follower authenticates when the leader refuses the current one (it has not taken the
        /// new one yet), so the two may be reloaded in either order. Remove it once the
        /// rotation is over (README, Troubleshooting); a file that does not exist holds none.
        #[arg(long, value_name = "FILE", env = "FERRY_PREVIOUS_SECRET_FILE")]
        previous_secret_file: Option<PathBuf>,
        /// What must hold before this follower acks: received, written (page cache) or synced (fdatasync).
        #[arg(
            long,
            value_name = "LEVEL",
            default_value = "synced",
            env = "FERRY_DURABILITY"
        )]
        durability: Durability,
        /// Exit 0 once DIR matches the leader's index as of the connection (a one-shot sync).
        #[arg(long, env = "FERRY_ONCE")]
        once: bool,
        /// Take over DIR though it holds files and was never a ferry data dir (no DIR/.ferry/),
        /// e.g. a copy seeded from the leader's data, or though its files were copied from
        /// another data dir than the leader's (another lineage): files the leader lacks are
        /// deleted. Without it such a DIR is refused; an empty or new DIR, or a copy of this
        /// leader's, is not.
        #[arg(long, env = "FERRY_ADOPT")]
        adopt: bool,
        /// I/O engine; by default io_uring when it works here, else the fallback (logged).
        #[arg(long, value_name = "uring|fallback", env = "FERRY_IO_ENGINE")]
        io_engine: Option<EngineKind>,
        /// Serve Prometheus metrics at http://ADDR/metrics and JSON at http://ADDR/status.
        #[arg(long, value_name = "ADDR", env = "FERRY_HTTP")]
        http: Option<std::net::SocketAddr>,
    },
    /// Join a cluster of nodes that elect a leader through etcd: lead when elected, else follow.
    ///
    /// SIGTERM or SIGINT leaves the cluster; a leader first hands off to its most caught-up
    /// follower, as `ferry handoff` does (at most --leave-handoff-timeout to catch up, as much
    /// to drain; else it leaves without), then resigns at once. SIGHUP reads --secret-file and
    /// --previous-secret-file again (a rotation with no restart).
    Node {
        /// The data directory.
        #[arg(long, value_name = "DIR", env = "FERRY_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        cluster: EtcdArgs,
        /// Address to listen on for followers when leading.
        #[arg(long, value_name = "ADDR", env = "FERRY_LISTEN")]
        listen: std::net::SocketAddr,
        /// host:port the other nodes reach this node's --listen at.
        #[arg(long, value_name = "ADDR", env = "FERRY_ADVERTISE")]
        advertise: String,
        /// Seconds a leader's etcd lease lives without keepalives; a dead leader is replaced, and
        /// a leader cut off from etcd stops leading, within about this long.
        #[arg(long, value_name = "SECONDS", default_value_t = ferry::cluster::LEASE_TTL_S_DEFAULT, env = "FERRY_LEASE_TTL")]
        lease_ttl: i64,
        #[command(flatten)]
        secret: SecretArgs,
        /// During a rotation of the shared secret: the secret in this file (the one being
        /// replaced) is also accepted while leading, with a warning for each follower using
        /// it, and used to follow a leader that refuses the current one (not reloaded yet).
        /// Remove it once every node holds the new one (README, Troubleshooting); a file that
        /// does not exist holds none.
        #[arg(long, value_name = "FILE", env = "FERRY_PREVIOUS_SECRET_FILE")]
        previous_secret_file: Option<PathBuf>,
        /// I/O engine; by default io_uring when it works here, else the fallback (logged).
        #[arg(long, value_name = "uring|fallback", env = "FERRY_IO_ENGINE")]
        io_engine: Option<EngineKind>,
        /// Shell command run once this node is elected leader.
        #[arg(long, value_name = "CMD", env = "FERRY_ON_LEADER_ELECTED")]
        on_leader_elected: Option<String>,
        /// Shell command run when this node stops leading (fenced, lease lost, leaving), and
        /// when a handoff (asked for, or on leaving) starts its final drain: the application
        /// must have stopped writing when it returns.
        #[arg(long, value_name = "CMD", env = "FERRY_ON_LEADER_LOST")]
        on_leader_lost: Option<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics and JSON at http://ADDR/status.
        #[arg(long, value_name = "ADDR", env = "FERRY_HTTP")]
        http: Option<std::net::SocketAddr>,
        /// Keep the shared secret in etcd at PREFIX/secret (created at random by the first node)
        /// instead of --secret-file / FERRY_SECRET; `ferry cluster rotate-secret` replaces it
        /// while the node runs.
        #[arg(
            long,
            env = "FERRY_SECRET_FROM_ETCD",
            conflicts_with = "previous_secret_file"
        )]
        secret_from_etcd: bool,
        /// TCP congestion control to lead with (e.g. cubic); by default the system's. Checked
        /// at start (see `ferry lead --help`).
        #[arg(long, value_name = "NAME", env = "FERRY_TCP_CONGESTION")]
        tcp_congestion: Option<String>,
        /// While leading, how often to rewrite DIR/.ferry/leader, so that if this node dies and
        /// leads again it resumes its instance (see `ferry lead --help`). 0: only when it stops.
        #[arg(long, value_name = "MS", default_value_t = ferry::leader_record::LEADER_RECORD_INTERVAL_MS, env = "FERRY_RECORD_INTERVAL_MS")]
        record_interval_ms: u64,
        /// Follow into DIR though it holds files and was never a ferry data dir (see `ferry
        /// follow --help`); without it such a node leads when elected but does not follow.
        #[arg(long, env = "FERRY_ADOPT")]
        adopt: bool,
        /// While DIR holds no files, wait this long after joining the election before
        /// campaigning (following any leader meanwhile), so that a node that holds data, such
        /// as the broker's when a cluster is set up, is elected first. 0: campaign at once.
        #[arg(long, value_name = "SECONDS", default_value_t = ferry::cluster::EMPTY_WAIT_S_DEFAULT, env = "FERRY_EMPTY_WAIT")]
        empty_wait: u64,
        /// On SIGTERM or SIGINT a leader hands off first (see above): how long it waits for
        /// the target, each of two waits (to catch up, then to sync the final drain). Past
        /// either it leaves without a handoff, and what was written since the followers' last
        /// acks is on this node only. 0: leave at once, without one. A handoff asked for
        /// (`ferry handoff`) that is under way when the stop comes gets as long from then.
        #[arg(long, value_name = "SECONDS", default_value_t = ferry::cluster::LEAVE_HANDOFF_TIMEOUT_S_DEFAULT, env = "FERRY_LEAVE_HANDOFF_TIMEOUT")]
        leave_handoff_timeout: u64,
    },
    /// Move leadership of a `ferry node` cluster to another node with zero loss: the leader
    /// waits until the target holds everything synced, runs its on-leader-lost hook (the
    /// application stops writing), ships the rest, then resigns to the target.
    ///
    /// The target goes on with the leader's instance, so the other nodes, the old leader
    /// among them, hash only the files written in the last second before it (README, Cluster).
    Handoff {
        #[command(flatten)]
        cluster: EtcdArgs,
        /// The node (its --advertise address) to hand over to; by default the in-sync follower
        /// that has synced the most.
        #[arg(long, value_name = "NODE_ID")]
        to: Option<String>,
        /// Give up after this many seconds, and leave the leader leading: a leader still
        /// waiting for the target (at most 30 s to catch up, 30 s to drain) does not hand off
        /// later.
        #[arg(long, value_name = "SECONDS", default_value_t = 90)]
        timeout: u64,
    },
    /// See a `ferry node` cluster in etcd (who leads, who may, who runs), reset who may lead, or
    /// rotate the shared secret kept there.
    Cluster {
        #[command(flatten)]
        cluster: EtcdArgs,
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Show a leader's followers (or a follower's own state), from its --http endpoint.
    Status {
        /// The node's --http address, e.g. http://127.0.0.1:9100 or 127.0.0.1:9100.
        url: String,
        /// Print the node's /status JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh the table in place every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Print `<sha1>  <path>` for every replicated file in DIR, sorted, so replicas compare with diff.
    Checksum {
        /// The data directory.
        dir: PathBuf,
    },
    /// Run a leader and two followers in a temporary directory under a write load, show live
    /// lag, and check that all copies match.
    Demo {
        /// How long the writer appends.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        seconds: u64,
        /// I/O engine for the leader and followers.
        #[arg(long, value_name = "uring|fallback", env = "FERRY_IO_ENGINE")]
        io_engine: Option<EngineKind>,
    },
}

fn read_secret(args: &SecretArgs) -> anyhow::Result<Secret> {
    let bytes = match (&args.secret_file, std::env::var_os("FERRY_SECRET")) {
        (Some(path), _) => read_secret_file(path)?,
        (None, Some(value)) => value.into_encoded_bytes(),
        (None, None) => bail!(
            "no secret: pass --secret-file FILE or set FERRY_SECRET (leader and followers must share it)"
        ),
    };
    secret_of(bytes)
}

/// The secret in `path`, a trailing newline dropped; warned about when every user of the
/// machine may read or change the file.
fn read_secret_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let cannot = || format!("cannot read the secret file {}", path.display());
    // One open for the bytes and the mode: the file read is the file whose mode is judged.
    let mut file = std::fs::File::open(path).with_context(cannot)?;
    let mode = file.metadata().with_context(cannot)?.permissions().mode();
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).with_context(cannot)?;
    if mode & 0o006 != 0 {
        tracing::warn!(
            "the secret file {} may be read or changed by every user of this machine (mode \
             {:o}), any of whom can then join as a follower or pose as the leader: `chmod 600 \
             {}` (or 640, with a group of its own)",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

/// `--previous-secret-file`'s secret: none if not given, or if the file does not exist (a
/// rotation ended: the file removed and the process reloaded).
fn read_previous_secret(path: &Option<PathBuf>) -> anyhow::Result<Option<Secret>> {
    let Some(path) = path.as_deref() else {
        return Ok(None);
    };
    if !path.exists() {
        tracing::info!(
            "no previous secret: {} does not exist (only the current one is used)",
            path.display()
        );
        return Ok(None);
    }
    read_secret_file(path).and_then(secret_of).map(Some)
}

/// Where a leader's or follower's secrets come from, read again on SIGHUP.
pub(crate) struct SecretSource {
    secret: SecretArgs,
    previous_file: Option<PathBuf>,
}

impl SecretSource {
    pub(crate) fn read(&self) -> anyhow::Result<Secrets> {
        Ok(Secrets {
            current: read_secret(&self.secret)?,
            previous: read_previous_secret(&self.previous_file)?,
        })
    }

    /// `read` on SIGHUP: warns first where the current secret cannot change (it comes from
    /// FERRY_SECRET, which a running process cannot be given anew).
    pub(crate) fn reread(&self) -> anyhow::Result<Secrets> {
        if self.secret.secret_file.is_none() {
            tracing::warn!(
                "SIGHUP: the secret comes from FERRY_SECRET, which cannot change while ferry \
                 runs: give it as --secret-file to rotate it without a restart"
            );
        }
        self.read()
    }
}

/// A secret from its bytes, warned about when short.
fn secret_of(bytes: Vec<u8>) -> anyhow::Result<Secret> {
    let len = bytes.len();
    let secret = Secret::new(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    if len < SECRET_BYTES_MIN_ADVISED {
        tracing::warn!(
            "the shared secret is {len} bytes: anyone who sees one handshake on the network can \
             try secrets this short offline against it; use {SECRET_BYTES_MIN_ADVISED} random \
             bytes or more (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
        );
    }
    Ok(secret)
}

/// Below this many bytes the secret is warned about (docs/SECURITY.md, threat model).
const SECRET_BYTES_MIN_ADVISED: usize = 16;

/// Tells systemd (when it runs us) that the follower is ready once its first sync is applied,
/// and keeps its watchdog fed while the follower's state can be read.
fn spawn_follower_notifier(status: std::sync::Arc<std::sync::Mutex<ferry::status::FollowerSelf>>) {
    let notifier = ferry::notify::Notifier::from_env();
    let tick = notifier.tick();
    let _ = std::thread::Builder::new()
        .name("ferry-notify".into())
        .spawn(move || {
            let mut ready = false;
            loop {
                let Ok(me) = status.lock().map(|s| s.clone()) else {
                    return;
                };
                if !ready && me.sync_done {
                    ready = true;
                    notifier.ready(&format!("in sync with {}", me.leader));
                }
                notifier.watchdog();
                std::thread::sleep(tick);
            }
        });
}

/// Waits on its own thread for SIGINT or SIGTERM (blocked as `signals`) and then sets `stop`:
/// the follower ends its connection in order (its held record notes what it holds) and
/// returns. The signal, once one came. (Without that thread the signals would stay blocked, and
/// SIGTERM would not stop the process: failing to start it is an error.)
fn stop_on_signal(
    signals: libc::sigset_t,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    (source, secrets): (SecretSource, SharedSecrets),
) -> std::io::Result<std::sync::Arc<std::sync::OnceLock<i32>>> {
    let got = std::sync::Arc::new(std::sync::OnceLock::new());
    let seen = got.clone();
    std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || loop {
            if let Some(signal) =
                signals::wait_signal(&signals, std::time::Duration::from_secs(3600))
            {
                if signal == libc::SIGHUP {
                    reload_follower_secret(&source, &secrets);
                    continue;
                }
                tracing::info!("signal {signal}: stopping");
                let _ = seen.set(signal);
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
        })?;
    Ok(got)
}

/// SIGHUP to `ferry follow`: its secrets read again, for its next connection (a rotation; the
/// leader closes a connection made with a secret it rotated out, and the follower then
/// reconnects at once with the new one; refused with the current one, it tries the previous).
fn reload_follower_secret(source: &SecretSource, secrets: &SharedSecrets) {
    match source.reread() {
        Ok(read) => {
            let previous = if read.previous.is_some() {
                "; a previous one too, tried if the leader refuses the current one (a rotation)"
            } else {
                "; no previous one"
            };
            let new_current = secrets.get().current != read.current;
            secrets.set(read);
            if new_current {
                tracing::info!(
                    "SIGHUP: a new shared secret read: the next connection authenticates with \
                     it{previous}"
                );
            } else {
                tracing::info!("SIGHUP: the shared secret is unchanged{previous}");
            }
        }
        Err(e) => tracing::error!("SIGHUP: cannot read the secrets again: {e:#}; keeping them"),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    ferry::kept_open::raise_open_files_limit();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = <Cli as clap::CommandFactory>::command();
    let known = |sub: &str| -> Vec<String> {
        command
            .find_subcommand(sub)
            .map(|c| {
                c.get_arguments()
                    .filter_map(|a| a.get_long().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    // `handoff` and `cluster` act on a node's cluster: they read its section (etcd, prefix).
    let borrowers = [("handoff", "node"), ("cluster", "node")];
    let args = match config::apply(args, &["lead", "follow", "node"], &borrowers, known) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Lead {
            data_dir,
            listen,
            secret,
            previous_secret_file,
            io_engine,
            ack_timeout_ms,
            tcp_congestion,
            record_interval_ms,
            http,
        } => {
            let settings = lead::Settings {
                secrets: SecretSource {
                    secret,
                    previous_file: previous_secret_file,
                },
                engine: io_engine,
                ack_timeout_ms,
                tcp_congestion,
                record_interval_ms,
                http,
            };
            lead::run(data_dir, listen, settings)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Follow {
            data_dir,
            leader,
            secret,
            previous_secret_file,
            durability,
            once,
            adopt,
            io_engine,
            http,
        } => {
            // Before any thread starts, so that every thread inherits the mask.
            let signals = signals::block_signals()?;
            let source = SecretSource {
                secret,
                previous_file: previous_secret_file,
            };
            let secrets = SharedSecrets::new(source.read()?);
            let status = std::sync::Arc::new(std::sync::Mutex::new(ferry::status::FollowerSelf {
                leader: leader.clone(),
                durability: durability.name().to_string(),
                ..Default::default()
            }));
            let _http = match http {
                Some(addr) => {
                    let engine_name = match io_engine {
                        Some(e) => e.name().to_string(),
                        None if ferry::engine::uring_unavailable().is_none() => "uring".into(),
                        None => "fallback".into(),
                    };
                    let status = status.clone();
                    let server = ferry::http::HttpServer::start(
                        addr,
                        std::sync::Arc::new(move || ferry::status::Status::Follower {
                            engine: engine_name.clone(),
                            me: status.lock().map(|s| s.clone()).unwrap_or_default(),
                        }),
                    )?;
                    tracing::info!("metrics on http://{}/metrics", server.local_addr());
                    Some(server)
                }
                None => None,
            };
            spawn_follower_notifier(status.clone());
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped_by = stop_on_signal(signals, stop.clone(), (source, secrets.clone()))?;
            let config = ferry::follower::FollowConfig {
                data_dir,
                leader,
                secret: secrets,
                durability,
                once,
                engine: io_engine,
                status,
                stop,
                node_id: None,
                adopt,
            };
            let report = ferry::follower::run(config)?;
            if let Some(signal) = stopped_by.get() {
                if once {
                    bail!("stopped by signal {signal} before the copy matched the leader's index");
                }
                return Ok(ExitCode::SUCCESS);
            }
            if once {
                println!(
                    "in sync: {} files in the leader's index, {} payload bytes received in {:.3} s",
                    report.index_files,
                    report.payload_bytes,
                    report.sync_elapsed.unwrap_or_default().as_secs_f64()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Checksum { dir } => {
            let lines = ferry::index::checksum_dir(&dir)
                .with_context(|| format!("cannot checksum {}", dir.display()))?;
            let mut out = String::new();
            for line in lines {
                out.push_str(&line);
                out.push('\n');
            }
            use std::io::Write;
            std::io::stdout().write_all(out.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node {
            data_dir,
            cluster: EtcdArgs { etcd, prefix },
            listen,
            advertise,
            lease_ttl,
            secret,
            previous_secret_file,
            io_engine,
            on_leader_elected,
            on_leader_lost,
            http,
            secret_from_etcd,
            tcp_congestion,
            record_interval_ms,
            adopt,
            empty_wait,
            leave_handoff_timeout,
        } => {
            let (secrets, reload) = if secret_from_etcd {
                (ferry::cluster_secret::read_at_start(&etcd, &prefix)?, None)
            } else {
                let source = SecretSource {
                    secret,
                    previous_file: previous_secret_file,
                };
                let secrets = source.read()?;
                let reload: ferry::cluster::SecretReload = Box::new(move || source.reread());
                (secrets, Some(reload))
            };
            let config = ferry::cluster::NodeConfig {
                data_dir,
                etcd,
                listen,
                advertise,
                prefix,
                lease_ttl_s: lease_ttl,
                secret: secrets.current,
                previous_secret: secrets.previous,
                secret_from_etcd,
                engine: io_engine,
                tcp_congestion,
                record_interval: std::time::Duration::from_millis(record_interval_ms),
                on_leader_elected,
                on_leader_lost,
                http,
                adopt,
                empty_wait: std::time::Duration::from_secs(empty_wait),
                leave_handoff_timeout: std::time::Duration::from_secs(leave_handoff_timeout),
            };
            ferry::cluster::run(config, reload)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Handoff {
            cluster: EtcdArgs { etcd, prefix },
            to,
            timeout,
        } => {
            let report = ferry::cluster::request_handoff(
                &etcd,
                &prefix,
                to.as_deref(),
                std::time::Duration::from_secs(timeout),
            )?;
            println!(
                "leadership moved from {} to {}: writer paused {} ms for the final drain; {} \
                 serving {} ms after the request",
                report.from, report.to, report.pause_ms, report.to, report.serving_after_ms
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster {
            cluster: EtcdArgs { etcd, prefix },
            action,
        } => {
            match action {
                ClusterAction::Status { json } => {
                    let view = ferry::cluster_admin::inspect(&etcd, &prefix)?;
                    print!("{}", if json { view.json() } else { view.table() });
                }
                ClusterAction::RotateSecret {
                    finish,
                    timeout,
                    secret_file,
                } => {
                    let timeout = std::time::Duration::from_secs(timeout);
                    let said = if finish {
                        ferry::cluster_secret::finish(&etcd, &prefix, timeout)?
                    } else {
                        let chosen = secret_file
                            .as_deref()
                            .map(|f| read_secret_file(f).and_then(secret_of))
                            .transpose()?;
                        ferry::cluster_secret::rotate(&etcd, &prefix, chosen, timeout)?
                    };
                    println!("{said}");
                }
                ClusterAction::Reset => {
                    let report = ferry::cluster_admin::reset(&etcd, &prefix)?;
                    for (key, value) in &report.deleted {
                        println!("deleted {key} (was {value:?})");
                    }
                    if report.deleted.is_empty() {
                        println!("cluster {prefix}: nothing to reset");
                    } else {
                        println!(
                            "The first node to campaign now leads whatever its data dir holds: \
                             start the node with the data first, the others after it."
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { url, json, watch } => {
            status_cli::run(&url, json, watch)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { seconds, io_engine } => demo::run(seconds, io_engine),
    }
}
