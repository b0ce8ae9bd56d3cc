//! `ferry node`: one of several nodes that elect a leader through etcd (a real etcd cluster,
//! never a home-made one). The leader runs `ferry lead`'s engine; the others follow it.
//!
//! Each node holds an etcd lease it keeps alive, and campaigns on `PREFIX/leader` with its
//! advertised address as the value. While it waits it follows whoever holds the election. Once
//! elected it stops following and leads. If its lease lapses (keepalive failures, cut off from
//! etcd) it is fenced: it stops leading at once, runs the on-leader-lost hook, and campaigns
//! again as a follower.
//!
//! Only members of the in-sync replica set (kept by the leader at `PREFIX/isr`) campaign, and a
//! node whose data dir holds no files waits `NodeConfig::empty_wait` first, so that one that
//! holds data is elected before it (a cluster set up on the node that has the broker's data).
//! `ferry handoff` moves leadership with zero loss (see `handoff`), as does a leader that leaves
//! (SIGTERM, `Node::leave`) when a follower can take over in time; `Node` runs the same
//! election inside an embedding broker, telling it its role through `RoleEvent`s.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use etcd_client::Client;

use crate::auth::{Secret, Secrets, SharedSecrets};
use crate::cluster_secret::SecretPoll;
use crate::engine::EngineKind;
use crate::fork_chain::ForkChain;
use crate::frame::Durability;
use crate::index::hex;
use crate::leader::{Leader, LeaderConfig, NodeAck, Settle};
use crate::log_repeats::Repeats;
use crate::status::FollowerSelf;

mod handoff;

use handoff::*;
pub use handoff::{request_handoff, HandoffReport};

/// Lease time-to-live by default: a dead leader is replaced within about this long.
pub const LEASE_TTL_S_DEFAULT: i64 = 2;

/// How long a node whose data dir holds no files waits before it campaigns, by default.
pub const EMPTY_WAIT_S_DEFAULT: u64 = 5;

/// How long a leaving leader's handoff waits for its target, each of its two waits, by
/// default (`NodeConfig::leave_handoff_timeout`). A handoff asked for waits `HANDOFF_TIMEOUTS`.
pub const LEAVE_HANDOFF_TIMEOUT_S_DEFAULT: u64 = 10;

#[derive(Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub etcd: Vec<String>,
    pub listen: SocketAddr,
    /// host:port the other nodes reach this one's replication port at.
    pub advertise: String,
    pub prefix: String,
    pub lease_ttl_s: i64,
    pub secret: Secret,
    /// While leading, also accept followers with this secret (`LeaderConfig::previous_secret`).
    pub previous_secret: Option<Secret>,
    /// The secrets are kept in etcd (`--secret-from-etcd`): `secret` and `previous_secret` are
    /// what it read at start, and it takes their changes while it runs (`cluster_secret`).
    pub secret_from_etcd: bool,
    pub engine: Option<EngineKind>,
    /// The TCP congestion control to lead with (`LeaderConfig::tcp_congestion`).
    pub tcp_congestion: Option<String>,
    /// How often to rewrite the leader's record while leading (`LeaderConfig::record_interval`).
    pub record_interval: std::time::Duration,
    pub on_leader_elected: Option<String>,
    pub on_leader_lost: Option<String>,
    /// Serve /metrics and /status here (the role they report follows the election).
    pub http: Option<SocketAddr>,
    /// Follow into a data dir that holds files but was never ferry's (`FollowConfig::adopt`).
    pub adopt: bool,
    /// While the data dir holds no files, wait this long after joining the election before
    /// campaigning (following any leader meanwhile), so that a node that holds data is elected
    /// first: an empty leader would leave that data on a node that cannot follow it.
    pub empty_wait: Duration,
    /// How long the handoff of a leader leaving (SIGTERM, `Node::leave`) waits for its target,
    /// each of its two waits: to catch up with the writer running, then to sync the final
    /// drain. Past either it leaves without a handoff; zero leaves without one at once.
    pub leave_handoff_timeout: Duration,
}

/// What the node is doing now, for its `--http` endpoints.
#[derive(Clone)]
enum Role {
    Candidate,
    Following(Arc<Mutex<FollowerSelf>>),
    Leading(Arc<Leader>),
}

type SharedRole = Arc<Mutex<Role>>;

fn set_role(shared: &SharedRole, role: Role) {
    if let Ok(mut r) = shared.lock() {
        *r = role;
    }
}

fn node_status(shared: &SharedRole, engine: &str) -> crate::status::Status {
    let role = shared.lock().map(|r| r.clone()).unwrap_or(Role::Candidate);
    match role {
        Role::Leading(leader) => leader.status(),
        Role::Following(me) => crate::status::Status::Follower {
            engine: engine.to_string(),
            me: me.lock().map(|m| m.clone()).unwrap_or_default(),
        },
        Role::Candidate => crate::status::Status::Follower {
            engine: engine.to_string(),
            me: FollowerSelf::default(),
        },
    }
}

/// A follower running on its own thread, stoppable.
struct FollowerRun {
    leader: String,
    status: Arc<Mutex<FollowerSelf>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    started: std::time::Instant,
}

/// How soon a follower that gave up (refused: wrong secret or version, not ferry at that
/// address) is started again while the same leader holds the election.
const FOLLOWER_RESTART_INTERVAL: Duration = Duration::from_secs(2);

impl FollowerRun {
    fn start(
        config: &NodeConfig,
        secrets: &SharedSecrets,
        leader: String,
        refusals: Arc<Mutex<Repeats>>,
    ) -> FollowerRun {
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(FollowerSelf {
            leader: leader.clone(),
            durability: Durability::Synced.name().to_string(),
            ..Default::default()
        }));
        let follow = crate::follower::FollowConfig {
            data_dir: config.data_dir.clone(),
            leader: leader.clone(),
            secret: secrets.clone(),
            durability: Durability::Synced,
            once: false,
            engine: config.engine,
            status: status.clone(),
            stop: stop.clone(),
            node_id: Some(config.advertise.clone()),
            adopt: config.adopt,
        };
        let thread = std::thread::spawn(move || {
            if let Err(e) = crate::follower::run(follow) {
                let message = format!("following stopped: {e}");
                let mut refusals = refusals.lock().unwrap_or_else(|p| p.into_inner());
                match refusals.report(&message, std::time::Instant::now()) {
                    Some(line) => tracing::error!(
                        "{line}; retrying every {} s",
                        FOLLOWER_RESTART_INTERVAL.as_secs()
                    ),
                    None => tracing::debug!("{message}"),
                }
            }
        });
        FollowerRun {
            leader,
            status,
            stop,
            thread,
            started: std::time::Instant::now(),
        }
    }

    /// It gave up on its own (the follower returns only on a refusal it cannot retry) and may
    /// be started again.
    fn gave_up(&self) -> bool {
        self.thread.is_finished() && self.started.elapsed() >= FOLLOWER_RESTART_INTERVAL
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn run_hook(hook: &Option<String>, what: &str) {
    if let Some(cmd) = hook {
        tracing::info!("running the {what} hook: {cmd}");
        match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
            Ok(s) if s.success() => tracing::info!("{what} hook ran: {cmd}"),
            Ok(s) => tracing::warn!("{what} hook {cmd:?} exited with {s}"),
            Err(e) => tracing::warn!("{what} hook {cmd:?} could not run: {e}"),
        }
    }
}

/// What went wrong in a call to etcd, in one line: the innermost error (a refused connection,
/// not the layers of the gRPC client around it), or the message etcd itself answered with.
pub(crate) fn etcd_cause(e: &etcd_client::Error) -> String {
    let mut inner: &dyn std::error::Error = match e {
        etcd_client::Error::GRpcStatus(status) => match std::error::Error::source(status) {
            Some(source) => source,
            None => return format!("etcd answered: {}", status.message()),
        },
        other => other,
    };
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

/// "cannot reach etcd at URLS: CAUSE" (`etcd_cause`), for the commands that give up on it.
pub(crate) fn etcd_unreachable(etcd: &[String], e: etcd_client::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach etcd at {}: {}",
        etcd.join(","),
        etcd_cause(&e)
    )
}

/// How long a one-shot command (`ferry handoff`, `ferry cluster`, reading the secret from etcd)
/// waits for etcd to answer before it says it cannot reach it.
const COMMAND_ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// The runtime a one-shot command runs its etcd calls on.
pub(crate) fn command_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A client for a one-shot command: no endpoints is an error saying how to give them, and
/// etcd that does not answer within `COMMAND_ETCD_TIMEOUT` is unreachable (`etcd_unreachable`).
pub(crate) async fn command_client(etcd: &[String]) -> anyhow::Result<Client> {
    anyhow::ensure!(
        !etcd.is_empty(),
        "no etcd endpoints: pass --etcd URL[,URL...] (or set FERRY_ETCD)"
    );
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(COMMAND_ETCD_TIMEOUT)
        .with_timeout(COMMAND_ETCD_TIMEOUT);
    Client::connect(etcd, Some(options))
        .await
        .map_err(|e| etcd_unreachable(etcd, e))
}

/// How often a leader refreshes the in-sync replica set in etcd (when it changed).
const ISR_INTERVAL: Duration = Duration::from_millis(300);

/// Whether `me` may campaign: no ISR written yet (a new cluster: anyone may lead), or in it.
fn may_campaign(isr: &Option<Vec<String>>, me: &str) -> bool {
    match isr {
        None => true,
        Some(members) => members.iter().any(|m| m == me),
    }
}

/// The ISR as stored at `key` (comma-separated node ids); `None` if never written or unreadable.
async fn read_isr(client: &mut Client, key: &str) -> Option<Vec<String>> {
    let resp = client.get(key, None).await.ok()?;
    let kv = resp.kvs().first()?;
    let value = kv.value_str().ok()?;
    Some(
        value
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// The guard of a leader's writes to etcd: our election key still holds our address, so a
/// deposed leader (its key gone with its lease) cannot write.
fn while_leading(leader_key: &[u8], me: &str) -> etcd_client::Compare {
    use etcd_client::{Compare, CompareOp};
    Compare::value(leader_key.to_vec(), CompareOp::Equal, me)
}

/// Why a write guarded by `while_leading` did not happen.
const NOT_LEADING: &str = "the election key is gone: not the leader any more";

/// Puts `key` = `value`, guarded by `while_leading`. Ok(false): the guard failed.
async fn put_while_leading(
    client: &mut Client,
    who: (&[u8], &str),
    key: String,
    value: String,
) -> Result<bool, etcd_client::Error> {
    puts_while_leading(client, who, vec![(key, value)]).await
}

/// Puts each key with its value in one transaction, guarded by our election key
/// (`while_leading`). Ok(false): the guard failed, and none was put.
async fn puts_while_leading(
    client: &mut Client,
    (leader_key, me): (&[u8], &str),
    puts: Vec<(String, String)>,
) -> Result<bool, etcd_client::Error> {
    use etcd_client::{Txn, TxnOp};
    let puts: Vec<TxnOp> = puts
        .into_iter()
        .map(|(key, value)| TxnOp::put(key, value, None))
        .collect();
    let txn = Txn::new()
        .when([while_leading(leader_key, me)])
        .and_then(puts);
    Ok(client.txn(txn).await?.succeeded())
}

/// Writes the ISR, guarded by our election key (`while_leading`). Ok(false): the guard failed.
async fn write_isr(
    client: &mut Client,
    leader_key: &[u8],
    me: &str,
    isr_key: &str,
    isr: &[String],
) -> Result<bool, etcd_client::Error> {
    put_while_leading(client, (leader_key, me), isr_key.into(), isr.join(",")).await
}

/// What `mark_data` says after the node id in `PREFIX/data`'s value.
const DATA_MARK_REASON: &str = ", whose data dir held files";

/// The node that set `PREFIX/data`, from the key's value (`mark_data`).
pub(crate) fn data_marked_by(value: &str) -> &str {
    value.strip_suffix(DATA_MARK_REASON).unwrap_or(value)
}

/// Sets `PREFIX/data` (`cluster_held_data`), guarded as `write_isr` is by our election key.
async fn mark_data(
    client: &mut Client,
    leader_key: &[u8],
    me: &str,
    keys: &Keys,
) -> Result<bool, etcd_client::Error> {
    let value = format!("{me}{DATA_MARK_REASON}");
    put_while_leading(client, (leader_key, me), keys.data.clone(), value).await
}

/// What a node tells its embedder (or `ferry node`'s hooks) about its role. Called on a
/// blocking thread, never on the node's own: a slow callback delays the role change it answers,
/// not the lease keepalives.
pub enum RoleEvent {
    /// Elected and serving followers. With `Feed::Library` the embedder now writes and reports
    /// its writes to this leader (`append`, `replace_file`, ...).
    Elected(Arc<Leader>),
    /// A handoff to node `to` starts its final drain (asked for with `ferry handoff`, or this
    /// node leaving): stop writing before returning. What was written until then reaches `to`
    /// before this node resigns.
    Draining { to: String },
    /// No longer leading: fenced, handed off, or leaving. The `Arc<Leader>` given at election
    /// no longer serves anyone, and refuses changes (`ChangeError::Stopped`) from its stop,
    /// which comes just before this. From its return the data dir is a follower's: after a
    /// handoff, a file preallocated beyond what was reported is cut to the reported length
    /// (`docs/PROTOCOL.md`, *Across a handoff*), and the next leader's changes are applied to
    /// the files; a mapping of one must not be touched past what was reported.
    Lost,
    /// Following the leader whose replication address is `leader`.
    Following { leader: String },
}

pub type RoleCallback = Box<dyn FnMut(RoleEvent) + Send>;

/// How the leader learns of writes while this node leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// inotify on the data dir (`ferry node` beside an unmodified application).
    Watch,
    /// The embedder calls the `Leader` it receives with `RoleEvent::Elected`.
    Library,
}

/// A node running on its own thread, for embedders: `leave` stops it (if it leads, handing off
/// first when it can, then resigning at once, so another node takes over without waiting for
/// the lease to lapse).
pub struct Node {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    secrets: SharedSecrets,
}

impl Node {
    pub fn start(config: NodeConfig, feed: Feed, on_role: RoleCallback) -> io::Result<Node> {
        check_settings(&config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let secrets = initial_secrets(&config);
        let thread = {
            let (stop, secrets) = (stop.clone(), secrets.clone());
            std::thread::Builder::new()
                .name("ferry-node".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let role = Arc::new(Mutex::new(Role::Candidate));
                    runtime.block_on(node_loop(config, feed, on_role, stop, (role, secrets)))
                })?
        };
        Ok(Node {
            stop,
            thread: Some(thread),
            secrets,
        })
    }

    /// Replaces the secrets this node authenticates with when it follows (from its next
    /// connection) and accepts when it leads (within 50 ms; `Leader::set_secrets`): a rotation
    /// with no restart. With `NodeConfig::secret_from_etcd`, etcd's replace them at its next
    /// look. Whether they changed.
    pub fn set_secrets(&self, secrets: Secrets) -> bool {
        self.secrets.set(secrets)
    }

    /// Leaves the cluster: stops following, or hands off (`RoleEvent::Draining`, within
    /// `NodeConfig::leave_handoff_timeout`, else without) and stops leading; then revokes the
    /// lease. Returns the error that stopped the node early, if one did.
    pub fn leave(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow::anyhow!("the node's thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a node can check before it joins: leading may come hours later, and a congestion
/// control this kernel cannot use is refused now rather than then.
fn check_settings(config: &NodeConfig) -> io::Result<()> {
    match &config.tcp_congestion {
        Some(name) => crate::engine::check_congestion(name),
        None => Ok(()),
    }
}

/// Reads a node's secrets again (from its files): `run`'s answer to SIGHUP.
pub type SecretReload = Box<dyn Fn() -> anyhow::Result<Secrets> + Send>;

/// SIGHUP: the secrets read again (`None`: they are kept in etcd) and shared with the node's
/// follower and leader. A read that fails keeps the secrets held.
fn reload_secrets(reload: Option<&SecretReload>, secrets: &SharedSecrets) {
    let Some(reload) = reload else {
        tracing::warn!(
            "SIGHUP: this node's secret is kept in etcd (--secret-from-etcd), which it reads \
             every second: rotate it with `ferry cluster rotate-secret`"
        );
        return;
    };
    match reload() {
        Ok(read) => {
            let changed = secrets.set(read.clone());
            tracing::info!("SIGHUP: {}", read.reloaded(changed));
        }
        Err(e) => tracing::error!("SIGHUP: cannot read the secrets again: {e:#}; keeping them"),
    }
}

/// `ferry node`: runs until SIGTERM or SIGINT (then leaves the cluster as `Node::leave` does),
/// running the configured hooks on role changes, and telling systemd what it does when it runs
/// the node (`notify_systemd`). The lost hook runs when a handoff (asked for, or on leaving)
/// starts its final drain (the application must stop writing) and when leadership is lost
/// otherwise. SIGHUP reads the secrets again with `reload` (a rotation with no restart).
pub fn run(config: NodeConfig, reload: Option<SecretReload>) -> anyhow::Result<()> {
    check_settings(&config)?;
    let (elected, lost) = (
        config.on_leader_elected.clone(),
        config.on_leader_lost.clone(),
    );
    let mut drained = false;
    let on_role: RoleCallback = Box::new(move |event| match event {
        RoleEvent::Elected(_) => {
            drained = false;
            run_hook(&elected, "on-leader-elected");
        }
        RoleEvent::Draining { .. } => {
            drained = true;
            run_hook(&lost, "on-leader-lost");
        }
        RoleEvent::Lost if !drained => run_hook(&lost, "on-leader-lost"),
        RoleEvent::Lost | RoleEvent::Following { .. } => {}
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let secrets = initial_secrets(&config);
    runtime.block_on(async {
        let signals = {
            let (stop, secrets) = (stop.clone(), secrets.clone());
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::hangup()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = term.recv() => break,
                        _ = int.recv() => break,
                        _ = hup.recv() => reload_secrets(reload.as_ref(), &secrets),
                    }
                }
                tracing::info!("signal received: leaving the cluster");
                stop.store(true, Ordering::SeqCst);
            })
        };
        let role: SharedRole = Arc::new(Mutex::new(Role::Candidate));
        let systemd = tokio::spawn(notify_systemd(role.clone(), stop.clone()));
        let result = node_loop(config, Feed::Watch, on_role, stop, (role, secrets)).await;
        signals.abort();
        systemd.abort();
        result
    })
}

/// Tells systemd, when it runs the node as a `Type=notify` service, that the node is ready once
/// it serves as the leader or holds the files of the leader it follows (its first sync
/// applied), and what it does (`STATUS=`). It feeds the watchdog from the node's own runtime,
/// so a runtime that stops turning stops feeding it. Not for an embedded `Node`: the broker
/// around it speaks to systemd for itself.
async fn notify_systemd(role: SharedRole, stop: Arc<AtomicBool>) {
    let notifier = crate::notify::Notifier::from_env();
    let tick = notifier.tick();
    let mut ready = false;
    loop {
        let now = role.lock().map(|r| r.clone()).unwrap_or(Role::Candidate);
        let (status, serving) = match now {
            Role::Leading(leader) => (
                format!(
                    "leading on {}: {}",
                    leader.local_addr(),
                    crate::notify::followers_status(&leader)
                ),
                true,
            ),
            Role::Following(me) => {
                let me = me.lock().map(|m| m.clone()).unwrap_or_default();
                if me.sync_done {
                    (format!("following {}, in sync", me.leader), true)
                } else {
                    (format!("following {}: syncing", me.leader), false)
                }
            }
            Role::Candidate => ("no leader to follow yet".to_string(), false),
        };
        if stop.load(Ordering::SeqCst) {
            notifier.status("leaving the cluster");
        } else if serving && !ready {
            ready = true;
            notifier.ready(&status);
        } else {
            notifier.status(&status);
        }
        notifier.watchdog();
        tokio::time::sleep(tick).await;
    }
}

/// Runs the role callback on a blocking thread and waits for it.
async fn tell(on_role: &Arc<Mutex<RoleCallback>>, event: RoleEvent) {
    let on_role = on_role.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(mut f) = on_role.lock() {
            f(event);
        }
    })
    .await;
}

/// This node's leader while it leads: the server, and the watcher feeding it (Feed::Watch).
struct Leading {
    leader: Arc<Leader>,
    watching: Watching,
}

/// Whether ferry's watcher feeds a leading node's leader the changes to its data dir.
enum Watching {
    /// No: the embedder does (`Feed::Library`), or a watcher could not be started again.
    No,
    /// Yes.
    Yes(crate::watch::Watcher),
    /// No longer: a handoff's final drain stopped it, and the handoff goes on. If it fails,
    /// the next watcher takes up from what this one reported (`rewatch`).
    Drained(crate::watch::Stopped),
}

impl Watching {
    fn take(&mut self) -> Watching {
        std::mem::replace(self, Watching::No)
    }

    /// The watcher, while it runs.
    fn watcher(self) -> Option<crate::watch::Watcher> {
        match self {
            Watching::Yes(watcher) => Some(watcher),
            Watching::No | Watching::Drained(_) => None,
        }
    }
}

impl Leading {
    async fn start(config: &NodeConfig, feed: Feed, secrets: Secrets) -> anyhow::Result<Leading> {
        let c = config.clone();
        let started = tokio::task::spawn_blocking(move || -> std::io::Result<Leading> {
            let mut lc = LeaderConfig::new(&c.data_dir, c.listen, secrets.current);
            lc.previous_secret = secrets.previous;
            lc.engine = c.engine;
            lc.tcp_congestion = c.tcp_congestion.clone();
            lc.record_interval = c.record_interval;
            lc.role = format!("ferry node {}, leading", c.advertise);
            let (leader, watching) = match feed {
                Feed::Watch => {
                    let (leader, watcher) = crate::leader::start_watched(lc)?;
                    (leader, Watching::Yes(watcher))
                }
                Feed::Library => (crate::leader::start_scanned(lc)?, Watching::No),
            };
            Ok(Leading { leader, watching })
        })
        .await??;
        Ok(started)
    }

    /// Reports every write made so far to the leader and stops watching (the writer has
    /// stopped: a handoff's final drain); an error when the watcher could not.
    async fn flush_watcher(&mut self) -> anyhow::Result<()> {
        let watcher = match self.watching.take() {
            Watching::Yes(watcher) => watcher,
            not => {
                self.watching = not;
                return Ok(());
            }
        };
        let stopped = tokio::task::spawn_blocking(move || watcher.flush_and_stop()).await?;
        let failure = stopped.failure().map(str::to_string);
        self.watching = Watching::Drained(stopped);
        if let Some(why) = failure {
            anyhow::bail!("{why}");
        }
        Ok(())
    }

    /// Watches again after an aborted handoff, if its final drain stopped the watcher: every
    /// change made since (the writer was told to stop, not made to) is reported first.
    async fn rewatch(&mut self) -> std::io::Result<()> {
        let stopped = match self.watching.take() {
            Watching::Drained(stopped) => stopped,
            not => {
                self.watching = not;
                return Ok(());
            }
        };
        let leader = self.leader.clone();
        let watcher =
            tokio::task::spawn_blocking(move || crate::leader::watch_again(&leader, stopped))
                .await
                .map_err(std::io::Error::other)??;
        self.watching = Watching::Yes(watcher);
        Ok(())
    }

    /// Stops serving; a watcher still running reports what it has not yet once the files are
    /// looked at for the leader's record. Without waiting for files just written to settle:
    /// the lost hook and the lease's revocation, which let the next leader in, come after.
    /// After a handoff at `handed_off_at`, no record if nothing changed since
    /// (`Settle::HandedOffAt`).
    async fn stop(self, handed_off_at: Option<u64>) {
        let watcher = self.watching.watcher();
        let leader = self.leader;
        let report_pending =
            move || watcher.map_or(true, |w| w.flush_and_stop().failure().is_none());
        let settle = handed_off_at.map_or(Settle::DoNotWait, Settle::HandedOffAt);
        let stopped = move || leader.stop_serving_with(report_pending, settle);
        let _ = tokio::task::spawn_blocking(stopped).await;
    }
}

/// The etcd keys of one cluster.
pub(crate) struct Keys {
    pub(crate) election: String,
    pub(crate) isr: String,
    pub(crate) handoff: String,
    pub(crate) handoff_result: String,
    /// `PREFIX/handoff-cancel/`: under it, the revision of a request whose requester gave up
    /// (`handoff_cancel`).
    pub(crate) handoff_cancel: String,
    /// `PREFIX/handoff-instance`: `TARGET INSTANCE POSITION`, put by a leader that handed off
    /// and recorded no change after the final drain; the target, elected, takes it and goes on
    /// with that instance (`pass_on_instance`, `take_passed_instance`).
    pub(crate) handoff_instance: String,
    /// `PREFIX/handoff-fork`: `INSTANCE FROM POSITION`, put with `handoff_instance` when the
    /// instance passed on is a fork; the target goes on with the fork too.
    pub(crate) handoff_fork: String,
    /// `PREFIX/nodes/`: each running node's id, claimed under its lease (`claim_node_id`).
    pub(crate) nodes: String,
    /// `PREFIX/data`: set by a leader whose data dir held files; from then on a node whose own
    /// holds none does not campaign (`cluster_held_data`).
    pub(crate) data: String,
    /// `PREFIX/lineage`: the lineage of the cluster's data, set by its first leader; every
    /// later leader serves it (`take_cluster_lineage`).
    pub(crate) lineage: String,
    /// `PREFIX/secret`, the shared secret with `--secret-from-etcd` (`cluster_secret`).
    pub(crate) secret: String,
    /// `PREFIX/secret-previous`: the secret being rotated out, while a rotation is in progress.
    pub(crate) secret_previous: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys {
            election: format!("{prefix}/leader"),
            isr: format!("{prefix}/isr"),
            handoff: format!("{prefix}/handoff"),
            handoff_result: format!("{prefix}/handoff-result"),
            handoff_cancel: format!("{prefix}/handoff-cancel/"),
            handoff_instance: format!("{prefix}/handoff-instance"),
            handoff_fork: format!("{prefix}/handoff-fork"),
            nodes: format!("{prefix}/nodes/"),
            data: format!("{prefix}/data"),
            lineage: format!("{prefix}/lineage"),
            secret: format!("{prefix}/secret"),
            secret_previous: format!("{prefix}/secret-previous"),
        }
    }

    /// `PREFIX/secret-taken/ID`: the revision of `PREFIX/secret` node ID holds, under its lease
    /// (with an empty `id`, the prefix of them all).
    pub(crate) fn secret_taken(&self, id: &str) -> String {
        format!("{}-taken/{id}", self.secret)
    }

    /// `PREFIX/handoff-cancel/REVISION`: put by a `ferry handoff` whose `--timeout` passed, for
    /// its request (the revision at which it put `PREFIX/handoff`); while it exists, the
    /// leader's handoff for that request cannot commit.
    pub(crate) fn handoff_cancel(&self, request_revision: i64) -> String {
        format!("{}{request_revision}", self.handoff_cancel)
    }

    /// The prefix of the election's keys, one per candidate (`PREFIX/leader/`).
    pub(crate) fn candidates(&self) -> String {
        format!("{}/", self.election)
    }

    /// The election's key of the candidate campaigning with `lease`: the etcd election API
    /// names it `PREFIX/leader/LEASE` (the lease in lowercase hex).
    fn candidate(&self, lease: i64) -> Vec<u8> {
        format!("{}{lease:x}", self.candidates()).into_bytes()
    }
}

/// Who set `PREFIX/data` (a leader whose data dir held files), if anyone did: then this
/// cluster has held data, and a node whose data dir holds none has lost its copy (a replaced
/// or unmounted disk). Were it elected, the others would decline to follow its empty dir
/// until its application wrote anew, and then delete what they hold. "unknown" when etcd does
/// not answer: not campaigning is the safe side then.
async fn cluster_held_data(client: &mut Client, keys: &Keys) -> Option<String> {
    match client.get(keys.data.clone(), None).await {
        Ok(resp) => resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        Err(_) => Some("unknown (etcd did not answer)".into()),
    }
}

/// The lineage of the cluster's data (`PREFIX/lineage`, set by its first leader), if set.
async fn cluster_lineage(
    client: &mut Client,
    keys: &Keys,
) -> anyhow::Result<Option<crate::frame::LineageId>> {
    let resp = client
        .get(keys.lineage.clone(), None)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read {}: {}", keys.lineage, etcd_cause(&e)))?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(kv.value()).into_owned();
    crate::lineage::parse(&text)
        .map(Some)
        .ok_or_else(|| anyhow::anyhow!("{} holds {text:?}, not a lineage id", keys.lineage))
}

/// Before this node leads: the lineage it will serve must be the cluster's (`cluster_lineage`),
/// the one its followers' copies carry. A data dir with none recorded (a copy made by a build
/// before lineages, as in a rolling upgrade) takes the cluster's: served under a new one, its
/// followers would decline it, and so does one that holds no file. One that holds files of
/// another lineage is not the cluster's data (another cluster's copy, a prefix two clusters
/// share): an error, and the node does not lead.
fn take_cluster_lineage(
    data_dir: &std::path::Path,
    cluster: &crate::frame::LineageId,
    key: &str,
) -> anyhow::Result<()> {
    let dir = crate::paths::DataDir::open(data_dir)?;
    let theirs = crate::index::hex(cluster);
    // Looked at only when the lineage differs: a dir that holds no file is a copy of nothing
    // yet, whatever it recorded.
    let holds_files = || !matches!(crate::paths::first_file(data_dir), Ok(None));
    match crate::lineage::read(&dir)? {
        Some(ours) if ours == *cluster => {}
        Some(_) if !holds_files() => crate::lineage::write(&dir, cluster)?,
        None => {
            crate::lineage::write(&dir, cluster)?;
            tracing::info!(
                "{} had no lineage recorded: took the cluster's, {theirs} ({key})",
                data_dir.display()
            );
        }
        Some(ours) => anyhow::bail!(
            "{} holds a copy of another data dir (lineage {}) than this cluster's (lineage \
             {theirs}, {key}): its followers would decline it. Is --data-dir or --prefix wrong? \
             If this dir's data is to be the cluster's, stop every node and run `ferry cluster \
             reset`",
            data_dir.display(),
            crate::index::hex(&ours)
        ),
    }
    Ok(())
}

/// Sets `PREFIX/lineage` to the lineage this leader serves if no leader has yet, guarded as
/// `write_isr` is by our election key. Ok(()) once etcd answered either way.
async fn mark_lineage(
    client: &mut Client,
    leader_key: &[u8],
    me: &str,
    keys: &Keys,
    lineage: &crate::frame::LineageId,
) -> Result<(), etcd_client::Error> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let txn = Txn::new()
        .when([
            while_leading(leader_key, me),
            Compare::create_revision(keys.lineage.clone(), CompareOp::Equal, 0),
        ])
        .and_then([TxnOp::put(
            keys.lineage.clone(),
            crate::index::hex(lineage),
            None,
        )]);
    client.txn(txn).await.map(|_| ())
}

/// Claims `PREFIX/nodes/ID` under this node's lease, so that no two running nodes share an id
/// (two started with one `--advertise`, a config copied from host to host): the leader would
/// take either for the other, and the in-sync replica set, which names nodes by id, would vouch
/// for one that never synced. The key of an earlier run of this node (killed, its lease not
/// yet lapsed) goes within the lease TTL, so a claim waits that long before it fails.
/// Ok(Err(why)) when another node holds the id; Err when etcd does not answer.
async fn claim_node_id(
    client: &mut Client,
    keys: &Keys,
    config: &NodeConfig,
    lease: i64,
) -> Result<Result<(), String>, etcd_client::Error> {
    use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
    let key = format!("{}{}", keys.nodes, config.advertise);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let me = format!("pid {} on {}", std::process::id(), hostname.trim());
    let lapse = Duration::from_secs(u64::try_from(config.lease_ttl_s).unwrap_or(0) * 2 + 1);
    let deadline = tokio::time::Instant::now() + lapse;
    let mut waiting_logged = false;
    loop {
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                me.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            return Ok(Ok(()));
        }
        let holder = resp
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "a node".into());
        if tokio::time::Instant::now() >= deadline {
            return Ok(Err(format!(
                "node id {} is in use by another node ({holder}; etcd key {key}): each node of \
                 a cluster needs its own --advertise, the address the others reach it at. Is \
                 this node's configuration a copy of another's?",
                config.advertise
            )));
        }
        if !waiting_logged {
            waiting_logged = true;
            tracing::info!(
                "node id {} is held by {holder}: waiting up to {} ms for it to go (an earlier \
                 run of this node whose lease has not lapsed yet)",
                config.advertise,
                lapse.as_millis()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a lease and a task that keeps it alive; the flag is set once a keepalive fails or
/// goes unanswered (then the lease may lapse at any moment: whoever leads on it is fenced).
async fn keep_lease(
    client: &mut Client,
    ttl_s: i64,
) -> anyhow::Result<(i64, Arc<AtomicBool>, tokio::task::JoinHandle<()>)> {
    let lease = client.lease_grant(ttl_s, None).await?.id();
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
    let lost = Arc::new(AtomicBool::new(false));
    let task = {
        let lost = lost.clone();
        let every = ttl_third(ttl_s);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // A keepalive that fails or does not answer in time fences us: better to stop
                // leading early than to lead on a lease that may have lapsed.
                let answer = tokio::time::timeout(every, async {
                    keeper.keep_alive().await?;
                    responses.message().await
                })
                .await;
                let alive = matches!(answer, Ok(Ok(Some(r))) if r.ttl() > 0);
                if !alive {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        })
    };
    Ok((lease, lost, task))
}

/// The secrets a node starts with (`NodeConfig::secret`, `previous_secret`), shared with
/// whatever changes them while it runs: its etcd poll, or SIGHUP (`run`).
fn initial_secrets(config: &NodeConfig) -> SharedSecrets {
    SharedSecrets::new(Secrets {
        current: config.secret.clone(),
        previous: config.previous_secret.clone(),
    })
}

async fn node_loop(
    config: NodeConfig,
    feed: Feed,
    on_role: RoleCallback,
    stop: Arc<AtomicBool>,
    (role, secrets): (SharedRole, SharedSecrets),
) -> anyhow::Result<()> {
    let keys = Keys::new(&config.prefix);
    let mut secret_poll = config
        .secret_from_etcd
        .then(|| SecretPoll::new(secrets.clone()));
    let on_role = Arc::new(Mutex::new(on_role));
    let mut following: Option<FollowerRun> = None;
    // Why the node's followers gave up: said once, then once a minute (`log_repeats`).
    let refusals = Arc::new(Mutex::new(Repeats::default()));
    // Why an elected node could not lead: the same, once a minute.
    let mut cannot_lead = Repeats::default();
    let _http = match config.http {
        Some(addr) => {
            let role = role.clone();
            let engine = match config.engine {
                Some(e) => e.name().to_string(),
                None if crate::engine::uring_unavailable().is_none() => "uring".into(),
                None => "fallback".into(),
            };
            let server = crate::http::HttpServer::start(
                addr,
                Arc::new(move || node_status(&role, &engine)),
            )?;
            tracing::info!("metrics on http://{}/metrics", server.local_addr());
            Some(server)
        }
        None => None,
    };
    let stopping = || stop.load(Ordering::SeqCst);
    let mut etcd_backoff = ETCD_RETRY_MIN;
    // Set when this node could not lead: no campaign before then.
    let mut campaign_after: Option<tokio::time::Instant> = None;
    // Why the node stops on its own, if it does.
    let mut failed: Option<anyhow::Error> = None;
    while !stopping() {
        // etcd unreachable (not started yet, partitioned): keep following whoever we followed,
        // and retry. Without etcd no node can be elected, so none may lead.
        let joined = async {
            let mut client = Client::connect(&config.etcd, None).await?;
            let (lease, lost, task) = keep_lease(&mut client, config.lease_ttl_s).await?;
            anyhow::Ok((client, lease, lost, task))
        };
        let (mut client, lease, lease_lost, keepalive) = match joined.await {
            Ok(joined) => {
                etcd_backoff = ETCD_RETRY_MIN;
                joined
            }
            Err(e) => {
                tracing::warn!(
                    "cannot reach etcd at {}: {}; retrying in {} ms",
                    config.etcd.join(","),
                    e.downcast_ref::<etcd_client::Error>()
                        .map_or_else(|| e.root_cause().to_string(), etcd_cause),
                    etcd_backoff.as_millis()
                );
                crate::follower::sleep_unless_stopped(etcd_backoff, &stop).await;
                etcd_backoff = (etcd_backoff * 2).min(ETCD_RETRY_MAX);
                continue;
            }
        };
        match claim_node_id(&mut client, &keys, &config, lease).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                keepalive.abort();
                revoke(&mut client, lease, config.lease_ttl_s).await;
                failed = Some(anyhow::anyhow!(why));
                break;
            }
            Err(e) => {
                tracing::warn!("cannot claim this node's id in etcd: {e}; retrying");
                keepalive.abort();
                revoke(&mut client, lease, config.lease_ttl_s).await;
                crate::follower::sleep_unless_stopped(etcd_backoff, &stop).await;
                continue;
            }
        }
        tracing::info!(
            "node {} joined the election {} (lease ttl {} s)",
            config.advertise,
            keys.election,
            config.lease_ttl_s
        );

        // Follow whoever leads; campaign only while this node is in the in-sync replica set
        // (or no ISR was ever written: a new cluster), since only those hold every acked byte.
        let mut campaign: Option<
            tokio::task::JoinHandle<Result<etcd_client::CampaignResponse, etcd_client::Error>>,
        > = None;
        let mut leader_key: Option<Vec<u8>> = None;
        let mut isr_excluded_logged = false;
        let mut empty_wait = EmptyWait::new(config.empty_wait);
        let mut lost_data_logged = false;
        let elected = loop {
            if lease_lost.load(Ordering::SeqCst) || stopping() {
                break false;
            }
            let isr = read_isr(&mut client, &keys.isr).await;
            let eligible = may_campaign(&isr, &config.advertise);
            // Looked at once a turn, and only when it decides something: a data dir it cannot
            // list counts as holding files (leading it will say what is wrong).
            let empty = campaign.is_none()
                && (eligible || empty_wait.waiting())
                && matches!(crate::paths::first_file(&config.data_dir), Ok(None));
            let lost_data = if empty && eligible {
                cluster_held_data(&mut client, &keys).await
            } else {
                None
            };
            if let (Some(by), false) = (&lost_data, lost_data_logged) {
                lost_data_logged = true;
                tracing::warn!(
                    "{} holds no files, but this cluster has held data ({} set by {by}): not \
                     campaigning, since leading would replace the cluster's data with nothing \
                     (a replaced or unmounted disk?); following whoever leads. If the data is \
                     gone on purpose, stop every node and run `ferry cluster reset`",
                    config.data_dir.display(),
                    keys.data
                );
            }
            let held_back = campaign_after.is_some_and(|t| tokio::time::Instant::now() < t)
                || lost_data.is_some()
                || (campaign.is_none() && empty_wait.holds_back(empty, &config.data_dir));
            match (&campaign, eligible) {
                (None, true) if held_back => {}
                (None, true) => {
                    let mut c = client.clone();
                    let (name, value) = (keys.election.clone(), config.advertise.clone());
                    campaign = Some(tokio::spawn(
                        async move { c.campaign(name, value, lease).await },
                    ));
                    isr_excluded_logged = false;
                }
                (None, false) if !isr_excluded_logged => {
                    tracing::info!(
                        "not in the in-sync replica set {isr:?}: following, not campaigning"
                    );
                    isr_excluded_logged = true;
                }
                (Some(_), false) => {
                    // Queued as a candidate but no longer in sync: withdraw, keeping the lease
                    // (and with it the node id).
                    tracing::info!(
                        "dropped from the in-sync replica set: withdrawing from the election"
                    );
                    if let Some(task) = campaign.take() {
                        task.abort();
                    }
                    let key = keys.candidate(lease);
                    if !withdraw(&mut client, &lease_lost, config.lease_ttl_s, key).await {
                        break false;
                    }
                    continue;
                }
                _ => {}
            }
            if let Some(task) = campaign.as_mut() {
                tokio::select! {
                    r = task => match r {
                        Ok(Ok(resp)) => {
                            // The ISR may have changed while we were queued (a handoff names its
                            // target alone): winning outside it must not lead to serving.
                            let isr = read_isr(&mut client, &keys.isr).await;
                            if !may_campaign(&isr, &config.advertise) {
                                tracing::info!(
                                    "won the election outside the in-sync replica set {isr:?}: \
                                     resigning"
                                );
                                campaign = None;
                                let key = resp.leader().map(|l| l.key().to_vec());
                                let resigned = match key {
                                    Some(key) => {
                                        withdraw(&mut client, &lease_lost, config.lease_ttl_s, key)
                                            .await
                                    }
                                    None => false,
                                };
                                if !resigned {
                                    break false;
                                }
                                continue;
                            }
                            leader_key = resp.leader().map(|l| l.key().to_vec());
                            break true;
                        }
                        Ok(Err(e)) => { tracing::warn!("campaign failed: {e}"); break false; }
                        Err(e) => { tracing::warn!("campaign task failed: {e}"); break false; }
                    },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Some(poll) = secret_poll.as_mut() {
                poll.look(&mut client, &keys, &config.advertise, lease)
                    .await;
            }
            let current = current_leader(&mut client, &keys).await;
            if let Some(current) = current.filter(|c| *c != config.advertise) {
                let same = following.as_ref().map(|f| &f.leader) == Some(&current);
                // Following the same leader again after a refusal: the address may answer
                // differently later (a proxy or another service there for a while, a secret
                // being rotated), and the node must not stay idle until the leader changes.
                let retry = same && following.as_ref().is_some_and(FollowerRun::gave_up);
                if !same || retry {
                    if let Some(f) = following.take() {
                        tokio::task::spawn_blocking(move || f.stop()).await.ok();
                    }
                    let quiet = {
                        let mut refusals = refusals.lock().unwrap_or_else(|p| p.into_inner());
                        if !same {
                            refusals.forget();
                        }
                        refusals.quiet()
                    };
                    match (retry, quiet) {
                        (true, true) => tracing::debug!(
                            "following {current} again after it refused us (as before)"
                        ),
                        (true, false) => {
                            tracing::warn!("following {current} again after it refused us")
                        }
                        _ => {}
                    }
                    if quiet {
                        tracing::debug!("following the leader at {current}");
                    } else {
                        tracing::info!("following the leader at {current}");
                    }
                    let run =
                        FollowerRun::start(&config, &secrets, current.clone(), refusals.clone());
                    set_role(&role, Role::Following(run.status.clone()));
                    following = Some(run);
                    tell(&on_role, RoleEvent::Following { leader: current }).await;
                }
            }
        };
        if !elected {
            if let Some(task) = campaign {
                task.abort();
            }
            keepalive.abort();
            revoke(&mut client, lease, config.lease_ttl_s).await;
            if stopping() {
                break;
            }
            tracing::info!("joining the election again");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if let Some(f) = following.take() {
            tokio::task::spawn_blocking(move || f.stop()).await.ok();
        }
        set_role(&role, Role::Candidate);

        tracing::info!(
            "elected leader: serving on {} as {}",
            config.listen,
            config.advertise
        );
        let lineage = bounded(
            &lease_lost,
            ttl_third(config.lease_ttl_s),
            cluster_lineage(&mut client, &keys),
        )
        .await
        .unwrap_or_else(|| {
            Err(anyhow::anyhow!(
                "{} unread: etcd did not answer, or the lease was lost",
                keys.lineage
            ))
        });
        if let Some(key) = &leader_key {
            let me = &config.advertise;
            let take = take_passed_instance(&mut client, &keys, (key, me), &config.data_dir);
            if let Err(e) = bounded(&lease_lost, ttl_third(config.lease_ttl_s), take)
                .await
                .unwrap_or_else(|| Err(anyhow::anyhow!("etcd did not answer")))
            {
                tracing::warn!(
                    "not going on with the instance the handoff passed on: {e:#}; a new one, and \
                     followers hash what changed since their last inventory"
                );
            }
        }
        let root = config.data_dir.clone();
        match tokio::task::spawn_blocking(move || fork_after_failover(&root)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                "cannot go on from the instance this node followed: {e:#}; a new one, and \
                 followers hash what changed since their last inventory"
            ),
            Err(e) => tracing::warn!("cannot go on from the instance this node followed: {e}"),
        }
        let started = match lineage {
            Ok(Some(cluster)) => {
                let (root, key) = (config.data_dir.clone(), keys.lineage.clone());
                match tokio::task::spawn_blocking(move || {
                    take_cluster_lineage(&root, &cluster, &key)
                })
                .await
                {
                    Ok(Ok(())) => Leading::start(&config, feed, secrets.get()).await,
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                }
            }
            Ok(None) => Leading::start(&config, feed, secrets.get()).await,
            Err(e) => Err(e),
        };
        let mut leading = match started {
            Ok(leading) => leading,
            Err(e) => {
                // Exiting would leave our election key in place until the lease lapsed, and
                // nobody would lead meanwhile.
                let why = format!("{e:#}");
                match cannot_lead.report(&why, std::time::Instant::now()) {
                    Some(why) => tracing::error!(
                        "elected, but cannot lead: {why}; resigning so that another node can \
                         lead, and not campaigning again for {} s",
                        CANNOT_LEAD_BACKOFF.as_secs()
                    ),
                    None => tracing::debug!("elected, but cannot lead: {why}; resigning"),
                }
                keepalive.abort();
                revoke(&mut client, lease, config.lease_ttl_s).await;
                campaign_after = Some(tokio::time::Instant::now() + CANNOT_LEAD_BACKOFF);
                continue;
            }
        };
        set_role(&role, Role::Leading(leading.leader.clone()));
        tell(&on_role, RoleEvent::Elected(leading.leader.clone())).await;
        // Lead until the lease lapses: then stop at once (fenced) and start over as a follower.
        // Meanwhile keep the ISR in etcd, written only while our election key stands, and
        // answer handoff requests.
        let mut isr_written: Option<Vec<String>> = None;
        // Whether `PREFIX/data` is known set (`cluster_held_data`).
        let mut data_marked = false;
        // Whether `PREFIX/lineage` is known set (`mark_lineage`).
        let mut lineage_marked = false;
        // Every etcd call in this loop goes through `bounded` (see there), for at most as long
        // as a keepalive may take.
        let etcd_call_timeout = ttl_third(config.lease_ttl_s);
        let mut isr_at = tokio::time::Instant::now();
        let why = loop {
            if lease_lost.load(Ordering::SeqCst) {
                break Stepped::Fenced;
            }
            if stopping() {
                // A controlled stop: hand off to the most caught-up follower first, so that
                // what the application wrote before it was told to stop is not lost.
                let Some(key) = leader_key.clone() else {
                    break Stepped::Leaving;
                };
                let wait = config.leave_handoff_timeout;
                if wait.is_zero() {
                    leaving_without_handoff("turned off (--leave-handoff-timeout 0)");
                    break Stepped::Leaving;
                }
                tracing::info!("leaving: handing off to the most caught-up follower first");
                let me = &config.advertise;
                let mut ctx = HandoffCtx::new(&mut client, &keys, &key, me, &on_role, &lease_lost);
                let timeouts = HandoffTimeouts {
                    catch_up: wait,
                    drain: wait,
                };
                match handoff(&mut ctx, &mut leading, "*", timeouts).await {
                    Ok(handed) => break Stepped::HandedOff(handed),
                    Err(e) => {
                        leaving_without_handoff(e);
                        break Stepped::Leaving;
                    }
                }
            }
            let failure = match &leading.watching {
                Watching::Yes(watcher) => watcher.failure(),
                Watching::No | Watching::Drained(_) => None,
            }
            .or_else(|| leading.leader.failure());
            if let Some(why) = failure {
                break Stepped::CannotWatch(why);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(poll) = secret_poll.as_mut() {
                let look = poll.look(&mut client, &keys, &config.advertise, lease);
                bounded(&lease_lost, etcd_call_timeout, look).await;
            }
            // What the poll or a SIGHUP changed (a no-op when nothing did).
            let _ = leading.leader.set_secrets(secrets.get());
            if isr_at.elapsed() < ISR_INTERVAL {
                continue;
            }
            isr_at = tokio::time::Instant::now();
            let Some(key) = leader_key.clone() else {
                break Stepped::Fenced;
            };
            let request = bounded(
                &lease_lost,
                etcd_call_timeout,
                take_handoff_request(&mut client, &keys),
            )
            .await
            .flatten();
            if let Some((request, cancel_key)) = request {
                let me = &config.advertise;
                let mut ctx = HandoffCtx::new(&mut client, &keys, &key, me, &on_role, &lease_lost);
                ctx.cancel_key = Some(cancel_key);
                ctx.stop = Some((stop.clone(), config.leave_handoff_timeout));
                let outcome = handoff(&mut ctx, &mut leading, &request, HANDOFF_TIMEOUTS).await;
                let writer_stopped = ctx.writer_stopped;
                match outcome {
                    Ok(handed) => break Stepped::HandedOff(handed),
                    Err(e) => {
                        let _ = client
                            .put(keys.handoff_result.clone(), format!("error {e}"), None)
                            .await;
                        if stopping() {
                            // Told to stop meanwhile: this was the leave's handoff too.
                            leaving_without_handoff(e);
                            break Stepped::Leaving;
                        }
                        tracing::warn!("handoff failed, still leading: {e}");
                        if lease_lost.load(Ordering::SeqCst) {
                            break Stepped::Fenced;
                        }
                        if let Err(e) = leading.rewatch().await {
                            tracing::error!("cannot watch the data dir again: {e}");
                            break Stepped::Leaving;
                        }
                        if writer_stopped {
                            // The writer was told to stop for the drain: it may write again.
                            tell(&on_role, RoleEvent::Elected(leading.leader.clone())).await;
                        }
                        isr_written = None;
                        continue;
                    }
                }
            }
            if !lineage_marked {
                let lineage = leading.leader.lineage();
                let mark = mark_lineage(&mut client, &key, &config.advertise, &keys, &lineage);
                lineage_marked = matches!(
                    bounded(&lease_lost, etcd_call_timeout, mark).await,
                    Some(Ok(()))
                );
            }
            if !data_marked
                && matches!(
                    crate::paths::first_file(leading.leader.data_dir().root()),
                    Ok(Some(_))
                )
            {
                let mark = mark_data(&mut client, &key, &config.advertise, &keys);
                if let Some(Ok(true)) = bounded(&lease_lost, etcd_call_timeout, mark).await {
                    data_marked = true;
                }
            }
            let mut isr: Vec<String> = leading
                .leader
                .followers()
                .into_iter()
                .filter(|f| f.lag.state == crate::lag::FollowerState::Streaming)
                .filter_map(|f| f.node_id)
                .collect();
            isr.push(config.advertise.clone());
            isr.sort();
            isr.dedup();
            if isr_written.as_ref() == Some(&isr) {
                continue;
            }
            // (An abandoned write that reaches etcd later fails its guard: our key is gone.)
            let write = write_isr(&mut client, &key, &config.advertise, &keys.isr, &isr);
            match bounded(&lease_lost, etcd_call_timeout, write).await {
                Some(Ok(true)) => {
                    tracing::info!("in-sync replica set: {}", isr.join(","));
                    isr_written = Some(isr);
                }
                Some(Ok(false)) => {
                    tracing::warn!("{NOT_LEADING}");
                    break Stepped::Fenced;
                }
                Some(Err(e)) => tracing::warn!("cannot write the in-sync replica set: {e}"),
                None => tracing::warn!(
                    "cannot write the in-sync replica set: etcd did not answer within {} ms",
                    etcd_call_timeout.as_millis()
                ),
            }
        };
        match &why {
            Stepped::Fenced => tracing::warn!("lease lost: fenced, no longer leading"),
            Stepped::HandedOff(_) => tracing::info!("handed off: no longer leading"),
            Stepped::Leaving => tracing::info!("leaving: no longer leading"),
            Stepped::CannotWatch(why) => {
                // As for a node elected that cannot lead: another node may see the whole dir.
                tracing::error!(
                    "cannot lead on: {why}; resigning so that another node can lead, and not \
                     campaigning again for {} s",
                    CANNOT_LEAD_BACKOFF.as_secs()
                );
                campaign_after = Some(tokio::time::Instant::now() + CANNOT_LEAD_BACKOFF);
            }
        }
        set_role(&role, Role::Candidate);
        let leader = leading.leader.clone();
        let handed_off_at = match &why {
            Stepped::HandedOff(handed) => Some(handed.position),
            _ => None,
        };
        leading.stop(handed_off_at).await;
        let mut own_files = None;
        if let (Stepped::HandedOff(handed), Some(key)) = (&why, &leader_key) {
            let me = &config.advertise;
            match pass_on_instance(&mut client, &keys, (key, me), &leader, handed).await {
                Ok(own) => own_files = Some(own),
                Err(e) => tracing::warn!(
                    "not passing instance {} on to {}: {e:#}; it starts a new one, and followers \
                     hash what changed since their last inventory",
                    hex(&leader.instance()),
                    handed.target
                ),
            }
        }
        tell(&on_role, RoleEvent::Lost).await;
        keepalive.abort();
        // Revoking the lease deletes our election key at once: the next candidate need not wait
        // for it to lapse. (A fenced node's lease may be gone already; the error is moot.)
        revoke(&mut client, lease, config.lease_ttl_s).await;
        if let Some(own) = own_files {
            own.record().await;
        }
    }
    if let Some(f) = following.take() {
        tokio::task::spawn_blocking(move || f.stop()).await.ok();
    }
    match failed {
        Some(e) => Err(e),
        None => {
            tracing::info!("left the cluster");
            Ok(())
        }
    }
}

/// A node's wait, on joining the election, while its data dir holds no files: without it, a
/// cluster set up on the node that has the broker's data elects whichever node campaigns first,
/// and an empty one leaves that data on a node that cannot follow it (`--adopt` aside, which
/// would delete it). A node that holds files does not wait; one that gets files meanwhile (by
/// following a leader) stops waiting.
struct EmptyWait {
    until: tokio::time::Instant,
    wait: Duration,
    logged: bool,
}

impl EmptyWait {
    fn new(wait: Duration) -> EmptyWait {
        EmptyWait {
            until: tokio::time::Instant::now() + wait,
            wait,
            logged: false,
        }
    }

    /// Whether the wait is still on (it ends early once the data dir holds files).
    fn waiting(&self) -> bool {
        tokio::time::Instant::now() < self.until
    }

    /// Whether the node should not campaign yet, its data dir (`data_dir`, named in the log)
    /// holding no files or not (`empty`).
    fn holds_back(&mut self, empty: bool, data_dir: &std::path::Path) -> bool {
        if !self.waiting() {
            return false;
        }
        if !empty {
            self.until = tokio::time::Instant::now();
            return false;
        }
        if !self.logged {
            self.logged = true;
            tracing::info!(
                "{} holds no files: waiting {} ms before campaigning, so that a node that holds \
                 data is elected first (following any leader meanwhile; --empty-wait)",
                data_dir.display(),
                self.wait.as_millis()
            );
        }
        true
    }
}

/// Runs a leader's etcd call for at most `limit`, and not past the moment its lease is lost
/// (`None` then). Cut off from etcd, a call never returns; awaiting it would keep the leading
/// loop from seeing the lease lapse, and a partitioned leader would never be fenced.
async fn bounded<T>(
    lease_lost: &AtomicBool,
    limit: Duration,
    call: impl std::future::Future<Output = T>,
) -> Option<T> {
    let lapsed = async {
        while !lease_lost.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        r = call => Some(r),
        () = lapsed => None,
        () = tokio::time::sleep(limit) => None,
    }
}

/// Withdraws this node's candidacy, or resigns the election it won: deletes its key in the
/// election (`PREFIX/leader/LEASE`), keeping the lease, and with it the node id claimed under
/// it (`claim_node_id`), so that no other node can take the id meanwhile and `ferry cluster
/// status` goes on listing the node. `false` when etcd did not answer in time: then the caller
/// revokes the lease, which removes the key too.
async fn withdraw(
    client: &mut Client,
    lease_lost: &AtomicBool,
    lease_ttl_s: i64,
    key: Vec<u8>,
) -> bool {
    let delete = client.delete(key, None);
    matches!(
        bounded(lease_lost, ttl_third(lease_ttl_s), delete).await,
        Some(Ok(_))
    )
}

/// A third of a lease's TTL (at least 100 ms): how often the lease is kept alive, and so how
/// long any one etcd call of a node may take before the lease could lapse behind it.
fn ttl_third(ttl_s: i64) -> Duration {
    Duration::from_millis((ttl_s.max(0) as u64 * 1000 / 3).max(100))
}

/// Revokes our lease, giving up after a third of its TTL. A node cut off from etcd (the usual
/// reason it was fenced) would otherwise wait on the call for as long as the dead connection
/// lasts before it rejoins; an unrevoked lease lapses by itself within its TTL anyway.
async fn revoke(client: &mut Client, lease: i64, ttl_s: i64) {
    let limit = ttl_third(ttl_s);
    match tokio::time::timeout(limit, client.lease_revoke(lease)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!("revoking lease {lease:x}: {e}"),
        Err(_) => tracing::info!(
            "etcd did not answer the revoke of lease {lease:x} within {} ms; it lapses by itself",
            limit.as_millis()
        ),
    }
}

/// Backoff between attempts to reach etcd.
/// How long a node that was elected but could not lead (its --listen address taken, its data
/// dir unreadable) stays out of the election after resigning, following whoever leads.
const CANNOT_LEAD_BACKOFF: Duration = Duration::from_secs(5);
const ETCD_RETRY_MIN: Duration = Duration::from_millis(250);
const ETCD_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why a node stopped leading.
enum Stepped {
    Fenced,
    HandedOff(HandedOff),
    Leaving,
    /// The watcher stopped: it no longer sees every change (`Watcher::failure`); or, fed by
    /// the embedder, the leader found its data dir's path no longer names it (`Leader::failure`).
    CannotWatch(String),
}

/// On being elected with no instance passed on (a failover, or a cluster's first start): when
/// this node followed since it last led, its instance goes on from the one it followed
/// (`promote::fork_if_followed`), every file it holds counting as settled: its application is
/// told it leads only once the leader started. Nothing when it led since, or holds nothing.
fn fork_after_failover(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let dir = crate::paths::DataDir::open(data_dir)?;
    let Some(forked) = crate::promote::fork_if_followed(&dir, crate::promote::Settled::ByNow)?
    else {
        return Ok(());
    };
    forked.log("this node synced (elected with no instance passed on: a failover)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_takes_the_clusters_lineage_into_a_dir_without_one_and_refuses_another() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::paths::DataDir::open(tmp.path()).unwrap();
        let (cluster, other) = ([1u8; 16], [2u8; 16]);
        take_cluster_lineage(tmp.path(), &cluster, "ferry/lineage").unwrap();
        assert_eq!(crate::lineage::read(&dir).unwrap(), Some(cluster));
        take_cluster_lineage(tmp.path(), &cluster, "ferry/lineage").unwrap();
        crate::lineage::write(&dir, &other).unwrap();
        take_cluster_lineage(tmp.path(), &cluster, "ferry/lineage").unwrap();
        assert_eq!(
            crate::lineage::read(&dir).unwrap(),
            Some(cluster),
            "an empty dir"
        );
        std::fs::write(tmp.path().join("seg"), b"data").unwrap();
        crate::lineage::write(&dir, &other).unwrap();
        let e = take_cluster_lineage(tmp.path(), &cluster, "ferry/lineage").unwrap_err();
        assert!(
            format!("{e}").contains("holds a copy of another data dir"),
            "{e}"
        );
        assert_eq!(
            crate::lineage::read(&dir).unwrap(),
            Some(other),
            "left as it was"
        );
    }
}
