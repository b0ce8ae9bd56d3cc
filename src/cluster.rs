//! `ferry node`: one of several nodes that elect a leader through etcd (a real etcd cluster,
//! never a home-made one). The leader runs `ferry lead`'s engine; the others follow it.
//!
//! Each node holds an etcd lease it keeps alive, and campaigns on `PREFIX/leader` with its
//! advertised address as the value. While it waits it follows whoever holds the election. Once
//! elected it stops following and leads. If its lease lapses (keepalive failures, cut off from
//! etcd) it is fenced: it stops leading at once, runs the on-leader-lost hook, and campaigns
//! again as a follower.
//!
//! Not yet here (issue 4 stays open): only in-sync followers campaigning (the ISR kept in etcd),
//! the shared secret stored in etcd, handoff, and the embedding API for role callbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use etcd_client::Client;

use crate::auth::Secret;
use crate::engine::EngineKind;
use crate::frame::Durability;
use crate::leader::{Leader, LeaderConfig, WatchedLeader};
use crate::status::FollowerSelf;

/// Lease time-to-live by default: a dead leader is replaced within about this long.
pub const LEASE_TTL_S_DEFAULT: i64 = 2;

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
    pub engine: Option<EngineKind>,
    pub on_leader_elected: Option<String>,
    pub on_leader_lost: Option<String>,
    /// Serve /metrics and /status here (the role they report follows the election).
    pub http: Option<SocketAddr>,
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
}

impl FollowerRun {
    fn start(config: &NodeConfig, leader: String) -> FollowerRun {
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(FollowerSelf {
            leader: leader.clone(),
            durability: Durability::Synced.name().to_string(),
            ..Default::default()
        }));
        let follow = crate::follower::FollowConfig {
            data_dir: config.data_dir.clone(),
            leader: leader.clone(),
            secret: config.secret.clone(),
            durability: Durability::Synced,
            once: false,
            engine: config.engine,
            status: status.clone(),
            stop: stop.clone(),
            node_id: Some(config.advertise.clone()),
        };
        let thread = std::thread::spawn(move || {
            if let Err(e) = crate::follower::run(follow) {
                tracing::error!("following stopped: {e}");
            }
        });
        FollowerRun {
            leader,
            status,
            stop,
            thread,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn run_hook(hook: &Option<String>, what: &str) {
    if let Some(cmd) = hook {
        match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
            Ok(s) if s.success() => tracing::info!("{what} hook ran: {cmd}"),
            Ok(s) => tracing::warn!("{what} hook {cmd:?} exited with {s}"),
            Err(e) => tracing::warn!("{what} hook {cmd:?} could not run: {e}"),
        }
    }
}

/// The cluster's shared secret, kept in etcd at `PREFIX/secret`: created at random, atomically,
/// by whichever node comes first (a transaction that puts it only if the key does not exist),
/// then read by every node. Anyone who can read that key can join the cluster: protect etcd.
pub fn secret_from_etcd(etcd: &[String], prefix: &str) -> anyhow::Result<Secret> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = Client::connect(etcd, None)
            .await
            .with_context(|| format!("cannot reach etcd at {}", etcd.join(",")))?;
        let key = format!("{prefix}/secret");
        let nonce = crate::auth::random_nonce()?;
        let fresh: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), fresh, None)]);
        let created = client.txn(txn).await?.succeeded();
        let got = client.get(key.clone(), None).await?;
        let value = got
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .ok_or_else(|| anyhow::anyhow!("{key} vanished from etcd right after being set"))?;
        tracing::info!(
            "shared secret {} etcd at {key}",
            if created { "created in" } else { "read from" }
        );
        Secret::new(value).map_err(|e| anyhow::anyhow!("the secret at {key}: {e}"))
    })
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

/// Writes the ISR in a transaction guarded by our election key still holding our address, so a
/// deposed leader (its key gone with its lease) cannot write it. Ok(false): the guard failed.
async fn write_isr(
    client: &mut Client,
    leader_key: &[u8],
    me: &str,
    isr_key: &str,
    isr: &[String],
) -> Result<bool, etcd_client::Error> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let txn = Txn::new()
        .when([Compare::value(leader_key.to_vec(), CompareOp::Equal, me)])
        .and_then([TxnOp::put(isr_key, isr.join(","), None)]);
    Ok(client.txn(txn).await?.succeeded())
}

/// Runs the node until the process is killed.
pub fn run(config: NodeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(node_loop(config))
}

async fn node_loop(config: NodeConfig) -> anyhow::Result<()> {
    let election = format!("{}/leader", config.prefix);
    let isr_key = format!("{}/isr", config.prefix);
    let mut following: Option<FollowerRun> = None;
    let role: SharedRole = Arc::new(Mutex::new(Role::Candidate));
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
    loop {
        let mut client = Client::connect(&config.etcd, None)
            .await
            .with_context(|| format!("cannot reach etcd at {}", config.etcd.join(",")))?;
        let lease = client.lease_grant(config.lease_ttl_s, None).await?.id();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let lease_lost = Arc::new(AtomicBool::new(false));
        let keepalive = {
            let lost = lease_lost.clone();
            let every = Duration::from_millis((config.lease_ttl_s as u64 * 1000 / 3).max(100));
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
        tracing::info!(
            "node {} joined the election {election} (lease ttl {} s)",
            config.advertise,
            config.lease_ttl_s
        );

        // Follow whoever leads; campaign only while this node is in the in-sync replica set
        // (or no ISR was ever written: a new cluster), since only those hold every acked byte.
        let mut campaign: Option<
            tokio::task::JoinHandle<Result<etcd_client::CampaignResponse, etcd_client::Error>>,
        > = None;
        let mut leader_key: Option<Vec<u8>> = None;
        let mut isr_excluded_logged = false;
        let elected = loop {
            if lease_lost.load(Ordering::SeqCst) {
                break false;
            }
            let isr = read_isr(&mut client, &isr_key).await;
            let eligible = may_campaign(&isr, &config.advertise);
            match (&campaign, eligible) {
                (None, true) => {
                    let mut c = client.clone();
                    let (name, value) = (election.clone(), config.advertise.clone());
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
                    // Queued as a candidate but no longer in sync: withdraw (revoking the lease
                    // removes the candidacy) and join again.
                    tracing::info!(
                        "dropped from the in-sync replica set: withdrawing from the election"
                    );
                    break false;
                }
                _ => {}
            }
            if let Some(task) = campaign.as_mut() {
                tokio::select! {
                    r = task => match r {
                        Ok(Ok(resp)) => {
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
            let current = match client.leader(election.clone()).await {
                Ok(r) => r
                    .kv()
                    .and_then(|kv| kv.value_str().ok())
                    .map(str::to_string),
                Err(_) => None,
            };
            if let Some(current) = current.filter(|c| *c != config.advertise) {
                if following.as_ref().map(|f| &f.leader) != Some(&current) {
                    if let Some(f) = following.take() {
                        tokio::task::spawn_blocking(move || f.stop()).await.ok();
                    }
                    tracing::info!("following the leader at {current}");
                    let run = FollowerRun::start(&config, current);
                    set_role(&role, Role::Following(run.status.clone()));
                    following = Some(run);
                }
            }
        };
        if !elected {
            if let Some(task) = campaign {
                task.abort();
            }
            keepalive.abort();
            let _ = client.lease_revoke(lease).await;
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
        let leading = {
            let c = config.clone();
            tokio::task::spawn_blocking(move || {
                let mut lc = LeaderConfig::new(&c.data_dir, c.listen, c.secret.clone());
                lc.engine = c.engine;
                WatchedLeader::start(lc)
            })
            .await??
        };
        set_role(&role, Role::Leading(leading.leader.clone()));
        run_hook(&config.on_leader_elected, "on-leader-elected");
        // Lead until the lease lapses: then stop at once (fenced) and start over as a follower.
        // Meanwhile keep the ISR in etcd, written only while our election key stands.
        let mut isr_written: Option<Vec<String>> = None;
        let mut isr_at = tokio::time::Instant::now();
        while !lease_lost.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if isr_at.elapsed() < ISR_INTERVAL {
                continue;
            }
            isr_at = tokio::time::Instant::now();
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
            let Some(key) = leader_key.clone() else { break };
            match write_isr(&mut client, &key, &config.advertise, &isr_key, &isr).await {
                Ok(true) => {
                    tracing::info!("in-sync replica set: {}", isr.join(","));
                    isr_written = Some(isr);
                }
                Ok(false) => {
                    tracing::warn!("the election key is gone: not the leader any more");
                    break;
                }
                Err(e) => tracing::warn!("cannot write the in-sync replica set: {e}"),
            }
        }
        tracing::warn!("lease lost: fenced, no longer leading");
        tokio::task::spawn_blocking(move || leading.stop())
            .await
            .ok();
        run_hook(&config.on_leader_lost, "on-leader-lost");
        keepalive.abort();
    }
}
