//! Moving leadership with zero loss: `ferry handoff` (`request_handoff`) asks the leader, which
//! waits until its target holds everything synced, stops its writer, drains, and resigns to it
//! (`handoff`); the target then goes on with the leader's instance, passed on through etcd
//! (`pass_on_instance`, `take_passed_instance`), so that no follower hashes what it holds
//! (`docs/PROTOCOL.md`, *Across a handoff*).

use super::*;

/// Reads and deletes a pending handoff request (`PREFIX/handoff`): the target's node id, or
/// `*` for the most caught-up in-sync follower, and the key its requester puts if it gives up
/// (`Keys::handoff_cancel`).
pub(super) async fn take_handoff_request(
    client: &mut Client,
    keys: &Keys,
) -> Option<(String, String)> {
    let resp = client.get(keys.handoff.clone(), None).await.ok()?;
    let kv = resp.kvs().first()?;
    let value = kv.value_str().ok()?.to_string();
    let cancel = keys.handoff_cancel(kv.mod_revision());
    let _ = client.delete(keys.handoff.clone(), None).await;
    Some((value, cancel))
}

/// How long a handoff waits for its target to catch up: first while the writer runs, then
/// during the final drain with the writer stopped.
#[derive(Clone, Copy)]
pub(super) struct HandoffTimeouts {
    pub(super) catch_up: Duration,
    pub(super) drain: Duration,
}

/// A handoff asked for (`ferry handoff`).
pub(super) const HANDOFF_TIMEOUTS: HandoffTimeouts = HandoffTimeouts {
    catch_up: Duration::from_secs(30),
    drain: Duration::from_secs(30),
};

pub(super) struct HandoffCtx<'a> {
    client: &'a mut Client,
    keys: &'a Keys,
    leader_key: &'a [u8],
    me: &'a str,
    on_role: &'a Arc<Mutex<RoleCallback>>,
    lease_lost: &'a Arc<AtomicBool>,
    /// Set once the writer was told to stop (`RoleEvent::Draining`).
    pub(super) writer_stopped: bool,
    /// For a handoff asked for: the key whose existence says its requester gave up
    /// (`Keys::handoff_cancel`).
    pub(super) cancel_key: Option<String>,
    /// For a handoff asked for: the node's stop flag, and how long a leave's handoff may wait
    /// (`NodeConfig::leave_handoff_timeout`). Once told to stop, the handoff waits no longer
    /// than that from then on.
    pub(super) stop: Option<(Arc<AtomicBool>, Duration)>,
}

impl<'a> HandoffCtx<'a> {
    pub(super) fn new(
        client: &'a mut Client,
        keys: &'a Keys,
        leader_key: &'a [u8],
        me: &'a str,
        on_role: &'a Arc<Mutex<RoleCallback>>,
        lease_lost: &'a Arc<AtomicBool>,
    ) -> HandoffCtx<'a> {
        HandoffCtx {
            client,
            keys,
            leader_key,
            me,
            on_role,
            lease_lost,
            writer_stopped: false,
            cancel_key: None,
            stop: None,
        }
    }

    /// Whether the requester of this handoff gave up (`ferry handoff --timeout`), deleting
    /// the mark it left if so: the handoff must then not happen.
    async fn requester_gave_up(&mut self) -> anyhow::Result<bool> {
        let Some(key) = self.cancel_key.clone() else {
            return Ok(false);
        };
        let found = self.client.get(key.clone(), None).await?.count() > 0;
        if found {
            let _ = self.client.delete(key, None).await;
        }
        Ok(found)
    }
}

/// What a leader leaving with no handoff says, and what it costs.
pub(super) fn leaving_without_handoff(why: impl std::fmt::Display) {
    tracing::warn!(
        "leaving without a handoff: {why}; what was written here since the followers' last acks \
         is on this node only"
    );
}

/// Why an asked handoff stops when the node is told to stop meanwhile.
pub(super) const TOLD_TO_STOP: &str = "told to stop during the handoff";

/// Why a handoff whose requester gave up stops.
pub(super) const REQUESTER_GAVE_UP: &str = "its requester gave up (its --timeout passed)";

/// Hands leadership to `request` (a node id or `*`): waits until the target holds everything
/// synced while the writer runs, asks the writer to stop (`RoleEvent::Draining`), ships and
/// waits for the rest (the final drain), then names the target alone as the ISR and records
/// the outcome, in one transaction guarded by our election key. The caller then resigns.
/// On error, nothing was resigned; if the writer was stopped (`ctx.writer_stopped`), the
/// caller resumes it, unless it is leaving anyway.
pub(super) async fn handoff(
    ctx: &mut HandoffCtx<'_>,
    leading: &mut Leading,
    request: &str,
    timeouts: HandoffTimeouts,
) -> anyhow::Result<HandedOff> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let leader = leading.leader.clone();
    let followers = leader.followers();
    // Any connected follower will do, streaming or lagging: the handoff waits below until it
    // holds everything synced, which is what makes it safe.
    let in_sync: Vec<(String, u64)> = followers
        .iter()
        .filter(|f| f.lag.state != crate::lag::FollowerState::Disconnected)
        .filter_map(|f| Some((f.node_id.clone()?, f.lag.acked[Durability::Synced.index()])))
        .collect();
    let target = if request == "*" {
        in_sync
            .iter()
            .max_by_key(|(_, acked)| *acked)
            .map(|(id, _)| id.clone())
    } else {
        in_sync
            .iter()
            .find(|(id, _)| id == request)
            .map(|(id, _)| id.clone())
    };
    let Some(target) = target else {
        let states: Vec<String> = followers
            .iter()
            .map(|f| {
                let id = f.node_id.clone().unwrap_or_else(|| f.peer.to_string());
                format!("{id} {}", f.lag.state.name())
            })
            .collect();
        let states = if states.is_empty() {
            "none".to_string()
        } else {
            states.join(", ")
        };
        if request == "*" {
            anyhow::bail!("no connected follower to hand off to (followers: {states})");
        }
        anyhow::bail!("no connected follower named {request} (followers: {states})");
    };
    tracing::info!("handoff to {target}: waiting for it to catch up");
    // Waits in short slices so that a lease lost, or the target gone (stopped, killed, its
    // connection dropped), stops the handoff at once rather than at its timeout.
    // When the node was first seen told to stop (an asked handoff only).
    let stop_seen = Arc::new(std::sync::OnceLock::new());
    let (lease_lost, stop) = (ctx.lease_lost.clone(), ctx.stop.clone());
    let wait = |position: u64, timeout: Duration| {
        let (leader, target) = (leader.clone(), target.clone());
        let lease_lost = lease_lost.clone();
        let (stop, stop_seen) = (stop.clone(), stop_seen.clone());
        async move {
            let deadline = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < deadline {
                if lease_lost.load(Ordering::SeqCst) {
                    return Err(anyhow::anyhow!("the lease was lost"));
                }
                if let Some((flag, leave_timeout)) = &stop {
                    if flag.load(Ordering::SeqCst) {
                        let seen: &std::time::Instant =
                            stop_seen.get_or_init(std::time::Instant::now);
                        if seen.elapsed() >= *leave_timeout {
                            let within = seconds(*leave_timeout);
                            return Err(anyhow::anyhow!(
                                "{TOLD_TO_STOP}, and {target} was not ready within {within} \
                                 (--leave-handoff-timeout)"
                            ));
                        }
                    }
                }
                let (leader, id) = (leader.clone(), target.clone());
                let acked = tokio::task::spawn_blocking(move || {
                    let slice = Duration::from_millis(100);
                    leader.wait_node_acked(&id, position, Durability::Synced, slice)
                })
                .await?;
                match acked {
                    NodeAck::Acked => return Ok(true),
                    NodeAck::Behind => {}
                    NodeAck::Gone => return Err(anyhow::anyhow!("{target} disconnected")),
                }
            }
            Ok(false)
        }
    };
    if !wait(leader.position(), timeouts.catch_up).await? {
        let within = seconds(timeouts.catch_up);
        anyhow::bail!("{target} did not catch up within {within}");
    }
    if ctx.requester_gave_up().await? {
        anyhow::bail!("{REQUESTER_GAVE_UP}");
    }
    let paused_at = std::time::Instant::now();
    tracing::info!("handoff to {target}: stopping the writer for the final drain");
    tell(ctx.on_role, RoleEvent::Draining { to: target.clone() }).await;
    ctx.writer_stopped = true;
    let before = leader.position();
    leading.flush_watcher().await?;
    // Every change made so far is reported: a file changed after this is not the catalog's.
    let reported_ns = crate::index::now_ns();
    let position = leader.position();
    tracing::info!(
        "handoff to {target}: every write so far reported; waiting for it to sync the final \
         drain (position {position})"
    );
    if !wait(position, timeouts.drain).await? {
        let within = seconds(timeouts.drain);
        anyhow::bail!("{target} did not sync the final drain within {within}");
    }
    let pause_ms = paused_at.elapsed().as_millis();
    let outcome = format!(
        "ok from={} to={target} position={position} drain_bytes={} pause_ms={pause_ms}",
        ctx.me,
        position.saturating_sub(before)
    );
    // Guarded by our election key, and for a handoff asked for, by its requester not having
    // given up: one that did told its operator that the leader keeps leading.
    let mut guards = vec![while_leading(ctx.leader_key, ctx.me)];
    if let Some(cancel) = &ctx.cancel_key {
        guards.push(Compare::version(cancel.clone(), CompareOp::Equal, 0));
    }
    let txn = Txn::new().when(guards).and_then([
        TxnOp::put(ctx.keys.isr.clone(), target.clone(), None),
        TxnOp::put(ctx.keys.handoff_result.clone(), outcome.clone(), None),
    ]);
    if !ctx.client.txn(txn).await?.succeeded() {
        if ctx.requester_gave_up().await? {
            anyhow::bail!("{REQUESTER_GAVE_UP}");
        }
        anyhow::bail!("{NOT_LEADING}");
    }
    tracing::info!(
        "handoff to {target}: writer paused {pause_ms} ms for the final drain (position \
         {position}); resigning"
    );
    Ok(HandedOff {
        target,
        position,
        reported_ns,
    })
}

/// After a handoff to `handed.target` went through and `leader` stopped serving: if it
/// recorded no change after the final drain, the instance goes on at the target
/// (`docs/PROTOCOL.md`, *Across a handoff*), so every follower's held record stays good. No
/// session then sent a frame of a later change or a MARK above the drain's position. This
/// node deletes its own record (the instance must not resume here too) and puts
/// `PREFIX/handoff-instance`, guarded by its election key, before it resigns; what it returns
/// records its own files as held at that position (`OwnFiles::record`, after resigning: the
/// look at every file need not keep the cluster without a leader).
pub(super) async fn pass_on_instance(
    client: &mut Client,
    keys: &Keys,
    (leader_key, me): (&[u8], &str),
    leader: &Arc<Leader>,
    handed: &HandedOff,
) -> anyhow::Result<OwnFiles> {
    let (instance, position) = (leader.instance(), handed.position);
    let (catalog, now) = leader.catalog_snapshot();
    if now != position {
        anyhow::bail!(
            "changes were recorded after the final drain (position {position}, now {now})"
        );
    }
    let root = leader.data_dir().root().to_path_buf();
    let files = catalog.len();
    let removing = root.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let dir = crate::paths::DataDir::open(&removing)?;
        Ok(crate::leader_record::remove(&dir)?)
    })
    .await??;
    let value = crate::cluster_admin::PassedInstance {
        to: handed.target.clone(),
        instance: hex(&instance),
        position,
    }
    .to_string();
    let mut puts = vec![(keys.handoff_instance.clone(), value)];
    let forks = leader.forks().clone();
    if let Some(fork) = forks.first() {
        let value = crate::cluster_admin::PassedFork {
            instance: hex(&instance),
            from: hex(&fork.from),
            position: fork.position,
            earlier: forks.links()[1..]
                .iter()
                .map(|l| (hex(&l.from), l.position))
                .collect(),
        };
        puts.push((keys.handoff_fork.clone(), value.to_string()));
    }
    if !puts_while_leading(client, (leader_key, me), puts).await? {
        anyhow::bail!("{NOT_LEADING}");
    }
    tracing::info!(
        "passed instance {}{} on to {} at position {position}: its followers (this node too, \
         {files} files) keep what their held records vouch for",
        hex(&instance),
        fork_text(&forks),
        handed.target
    );
    Ok(OwnFiles {
        root,
        at: (instance, position),
        catalog,
        reported_ns: handed.reported_ns,
    })
}

/// The files of a leader that passed its instance on, to record in its own held record as held
/// at the final drain's position: it follows the target next, and its inventory then vouches
/// for them.
pub(super) struct OwnFiles {
    root: std::path::PathBuf,
    at: (crate::frame::InstanceId, u64),
    catalog: Vec<(crate::paths::RelPath, crate::catalog::CatalogEntry)>,
    /// When every change made up to the final drain had been reported (`HandedOff`).
    reported_ns: i64,
}

impl OwnFiles {
    /// Records them, each as it is now unless shorter than the catalog says or changed since
    /// every change was reported (`HeldRecord::record_own`). Before this node follows anyone.
    pub(super) async fn record(self) {
        let recorded = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let dir = crate::paths::DataDir::open(&self.root)?;
            let own = self
                .catalog
                .into_iter()
                .map(|(p, e)| (p, e.len_bytes, e.born_at));
            let mut held = crate::follower::held::HeldRecord::load(&dir);
            held.record_own(&dir, self.at, own, self.reported_ns);
            held.save_or_warn(&dir);
            Ok(())
        })
        .await;
        if let Err(e) = recorded.map_err(anyhow::Error::from).and_then(|r| r) {
            tracing::warn!(
                "cannot record this node's files as held: {e:#}; following the new leader, it \
                 hashes what changed since its last inventory"
            );
        }
    }
}

/// On being elected: takes (reads and deletes, guarded by our election key) what a leader
/// that handed off to this node passed on (`pass_on_instance`), and turns this node's held
/// record of that instance into a leader's record, which the start then resumes from: the
/// files hold the old leader's as of `POSITION` (this node synced the final drain, and no
/// change came after), each born at or before what the held record says (`POSITION` where it
/// says nothing). Nothing when there is none, or it names another node.
pub(super) async fn take_passed_instance(
    client: &mut Client,
    keys: &Keys,
    (leader_key, me): (&[u8], &str),
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use etcd_client::{Txn, TxnOp};
    let read = Txn::new().and_then([
        TxnOp::get(keys.handoff_instance.clone(), None),
        TxnOp::get(keys.handoff_fork.clone(), None),
    ]);
    let responses = client.txn(read).await?.op_responses();
    let value_of = |i| {
        let kvs = crate::cluster_admin::kvs_of(&responses, i);
        kvs.first().map(crate::cluster_admin::text)
    };
    let (Some(value), fork_value) = (value_of(0), value_of(1)) else {
        return Ok(());
    };
    let txn = Txn::new().when([while_leading(leader_key, me)]).and_then([
        TxnOp::delete(keys.handoff_instance.clone(), None),
        TxnOp::delete(keys.handoff_fork.clone(), None),
    ]);
    if !client.txn(txn).await?.succeeded() {
        anyhow::bail!("{NOT_LEADING}");
    }
    let Some(passed) = crate::cluster_admin::PassedInstance::parse(&value) else {
        anyhow::bail!(
            "{} holds {value:?}, not TARGET INSTANCE POSITION",
            keys.handoff_instance
        );
    };
    if passed.to != me {
        return Ok(()); // left from a handoff to another node, which never led after it
    }
    let (instance, position) = (passed.instance.as_str(), passed.position);
    let instance: crate::frame::InstanceId = crate::index::from_hex(instance)
        .ok_or_else(|| anyhow::anyhow!("{}: bad instance {instance:?}", keys.handoff_instance))?;
    let forks = fork_value.map_or_else(ForkChain::none, |value| {
        let forks = passed_fork(&value, (&instance, position));
        if let Err(why) = &forks {
            tracing::warn!(
                "{} holds {value:?}: {why}; going on with the instance without it (followers \
                 hash the files they recorded under the instances it went on from)",
                keys.handoff_fork
            );
        }
        forks.unwrap_or_default()
    });
    let root = data_dir.to_path_buf();
    let record_forks = forks.clone();
    let (held, total) = tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, usize)> {
        let dir = crate::paths::DataDir::open(&root)?;
        let record = crate::follower::held::HeldRecord::load(&dir);
        Ok(crate::promote::record_from_held(
            &dir,
            &record,
            (instance, &record_forks),
            (&instance, position),
            crate::leader_record::settled_by_now_ns(),
        )?)
    })
    .await??;
    tracing::info!(
        "going on with instance {}{} passed on by the handoff, from position {}: {held} of \
         {total} files held",
        hex(&instance),
        fork_text(&forks),
        position.saturating_add(1)
    );
    Ok(())
}

/// The fork chain of `instance`, passed on at `position`, that `PREFIX/handoff-fork`'s `value`
/// names (`docs/PROTOCOL.md`, *Across a handoff*, *After failovers in a row*): no links when it
/// names another instance (left from an earlier handoff), `Err` why it cannot be taken.
pub(super) fn passed_fork(
    value: &str,
    (instance, position): (&crate::frame::InstanceId, u64),
) -> Result<ForkChain, String> {
    const FORM: &str = "INSTANCE FROM POSITION, then FROM POSITION per earlier link";
    let Some(passed) = crate::cluster_admin::PassedFork::parse(value) else {
        return Err(format!("not {FORM}"));
    };
    let Some(of) = crate::index::from_hex(&passed.instance) else {
        return Err(format!("not {FORM}, each instance in hex"));
    };
    if of != *instance {
        return Ok(ForkChain::none());
    }
    if passed.position > position {
        return Err(format!(
            "a fork at position {} above the instance's own, {position}",
            passed.position
        ));
    }
    // The words after the instance: the links, which `PassedFork::parse` found in pairs.
    ForkChain::from_words(value.split(' ').skip(1))
        .map_err(|why| format!("not a fork chain: {why}"))
}

/// ` (a fork of instance FROM at position P, ...)`, or nothing: for log lines naming an
/// instance.
pub(super) fn fork_text(forks: &ForkChain) -> String {
    match forks.is_fork() {
        true => format!(" ({})", forks.describe()),
        false => String::new(),
    }
}

/// A handoff that went through: to whom, and the final drain's position.
pub(super) struct HandedOff {
    pub(super) target: String,
    pub(super) position: u64,
    /// When every change made up to the final drain had been reported (wall clock, ns).
    reported_ns: i64,
}

/// `d` as a log line says it: whole seconds (what the flags take) or milliseconds.
pub(super) fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// What `ferry handoff` reports.
pub struct HandoffReport {
    pub from: String,
    pub to: String,
    /// The old leader's own figure: from stopping the writer to the target holding everything.
    pub pause_ms: u64,
    /// From the request until the target held the election and accepted replication
    /// connections, as seen by the requester.
    pub serving_after_ms: u64,
}

/// Asks the current leader to hand over to `to` (or the most caught-up in-sync follower) and
/// waits until the target is elected and serving. Errors name the cause (no leader, refused,
/// timed out).
pub fn request_handoff(
    etcd: &[String],
    prefix: &str,
    to: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<HandoffReport> {
    command_runtime()?.block_on(async {
        let keys = Keys::new(prefix);
        let mut client = command_client(etcd).await?;
        let Some(current) = current_leader(&mut client, &keys).await else {
            // Tell "etcd unreachable" from "no leader".
            if let Err(e) = client.get(keys.election.clone(), None).await {
                return Err(etcd_unreachable(etcd, e));
            }
            anyhow::bail!("no leader at {}: nothing to hand off", keys.election);
        };
        if to == Some(current.as_str()) {
            anyhow::bail!("{current} already leads");
        }
        let started = std::time::Instant::now();
        client
            .delete(keys.handoff_result.clone(), None)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        let put = client
            .put(keys.handoff.clone(), to.unwrap_or("*"), None)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        let request_revision = put.header().map_or(0, |h| h.revision());
        let mut deadline = started + timeout;
        let mut gave_up = false;
        let mut outcome: Option<String> = None;
        loop {
            if std::time::Instant::now() > deadline {
                if gave_up {
                    anyhow::bail!(
                        "leadership is moving to {}, which did not serve within {} s more",
                        outcome.as_deref().map_or("?", |o| field(o, "to")),
                        SERVING_GRACE.as_secs()
                    );
                }
                // A leader that took the request may still be waiting for its target: the
                // mark below stops it from committing, so the leader keeps leading, as this
                // says; unless it committed already, which the result then tells.
                let untaken = client
                    .delete(keys.handoff.clone(), None)
                    .await
                    .is_ok_and(|r| r.deleted() > 0);
                // Under a lease, so that it does not stay behind: the leader's handoff can
                // only commit while its own lease of a few seconds lives.
                let lease = client
                    .lease_grant(HANDOFF_CANCEL_TTL_S, None)
                    .await
                    .map_err(|e| etcd_unreachable(etcd, e))?
                    .id();
                let cancel = keys.handoff_cancel(request_revision);
                let under_lease = etcd_client::PutOptions::new().with_lease(lease);
                client
                    .put(cancel, "gave up", Some(under_lease))
                    .await
                    .map_err(|e| etcd_unreachable(etcd, e))?;
                outcome = handoff_result(&mut client, &keys)
                    .await
                    .map_err(|e| etcd_unreachable(etcd, e))?;
                if !outcome.as_deref().is_some_and(|o| o.starts_with("ok ")) {
                    anyhow::bail!(
                        "no handoff within {} s ({}); {current} keeps leading",
                        timeout.as_secs(),
                        match &outcome {
                            Some(o) => format!("the leader reported: {o}"),
                            None if untaken => format!("{current} did not take the request"),
                            None => format!("{current} was still waiting for the target"),
                        }
                    );
                }
                // It committed before the mark: leadership moves; wait for the target.
                gave_up = true;
                deadline = std::time::Instant::now() + SERVING_GRACE;
            }
            if outcome.is_none() {
                outcome = handoff_result(&mut client, &keys)
                    .await
                    .map_err(|e| etcd_unreachable(etcd, e))?;
                if let Some(err) = outcome.as_deref().and_then(|o| o.strip_prefix("error ")) {
                    anyhow::bail!("{current} refused the handoff: {err}");
                }
            }
            if let Some(o) = &outcome {
                let target = field(o, "to").to_string();
                // Done once the target holds the election and accepts replication connections
                // (a node listens only while it leads).
                if current_leader(&mut client, &keys).await.as_deref() == Some(target.as_str())
                    && tokio::net::TcpStream::connect(target.as_str())
                        .await
                        .is_ok()
                {
                    return Ok(HandoffReport {
                        from: field(o, "from").to_string(),
                        to: target,
                        pause_ms: field(o, "pause_ms").parse().unwrap_or(0),
                        serving_after_ms: started.elapsed().as_millis() as u64,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// How long the mark of a `ferry handoff` that gave up lives (`Keys::handoff_cancel`): more
/// than a leader's handoff can take after it took the request (`HANDOFF_TIMEOUTS`).
pub(super) const HANDOFF_CANCEL_TTL_S: i64 = 600;

/// How long `ferry handoff` waits for the target to serve when the leader committed the
/// handoff just as the requester's `--timeout` passed.
pub(super) const SERVING_GRACE: Duration = Duration::from_secs(10);

/// `PREFIX/handoff-result`, if set: `ok from=.. to=.. ...` or `error WHY`.
pub(super) async fn handoff_result(
    client: &mut Client,
    keys: &Keys,
) -> Result<Option<String>, etcd_client::Error> {
    let resp = client.get(keys.handoff_result.clone(), None).await?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| kv.value_str().ok())
        .map(str::to_string))
}

/// The value of `name=` in a handoff result (empty if absent).
pub(super) fn field<'a>(result: &'a str, name: &str) -> &'a str {
    result
        .split(' ')
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or("")
}

pub(super) async fn current_leader(client: &mut Client, keys: &Keys) -> Option<String> {
    let resp = client.leader(keys.election.clone()).await.ok()?;
    resp.kv()?.value_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target takes the fork chain passed on with its instance, and only with it: one naming
    /// another instance is left from an earlier handoff; one above the instance's position,
    /// with a later link above the one before, or not of the key's form, is refused, and the
    /// instance goes on without a fork.
    #[test]
    fn a_target_takes_the_fork_passed_on_only_with_its_own_instance() {
        use crate::frame::Fork;
        let (ours, from, older) = ([0x11; 16], [0x22; 16], [0x44; 16]);
        let value = |of: &[u8; 16], q: u64| format!("{} {} {q}", hex(of), hex(&from));
        let link = |from, position| Fork { from, position };
        assert_eq!(
            passed_fork(&value(&ours, 900), (&ours, 1000)),
            Ok(ForkChain::of([link(from, 900)]).unwrap())
        );
        let chained = format!("{} {} 800", value(&ours, 900), hex(&older));
        assert_eq!(
            passed_fork(&chained, (&ours, 1000)),
            Ok(ForkChain::of([link(from, 900), link(older, 800)]).unwrap())
        );
        let rising = format!("{} {} 901", value(&ours, 900), hex(&older));
        let err = passed_fork(&rising, (&ours, 1000)).unwrap_err();
        assert!(err.contains("above the one before"), "{err}");
        assert_eq!(
            passed_fork(&value(&ours, 1000), (&ours, 1000)).map(|f| f.first().map(|f| f.position)),
            Ok(Some(1000))
        );
        assert_eq!(
            passed_fork(&value(&[0x33; 16], 900), (&ours, 1000)),
            Ok(ForkChain::none())
        );
        let above = passed_fork(&value(&ours, 1001), (&ours, 1000)).unwrap_err();
        assert!(above.contains("above the instance's own, 1000"), "{above}");
        let odd = format!("{} {}", value(&ours, 900), hex(&older));
        for bad in ["", "11 22 3", &format!("{} 900", hex(&ours)), &odd] {
            assert!(passed_fork(bad, (&ours, 1000)).is_err(), "{bad:?}");
        }
    }
}
