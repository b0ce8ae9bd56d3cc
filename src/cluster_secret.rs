//! The shared secret of a cluster that keeps it in etcd (`ferry node --secret-from-etcd`): how
//! a node reads it (`read_at_start`) and follows its changes (`SecretPoll`), and how `ferry
//! cluster rotate-secret` replaces it with no node restarted (`rotate`, `finish`).
//!
//! Keys, beside the others `cluster::Keys` names: `PREFIX/secret`, the current secret;
//! `PREFIX/secret-previous`, the one being rotated out, while a rotation is in progress; and
//! `PREFIX/secret-taken/ID`, under each running node's lease, the mod revision of
//! `PREFIX/secret` that node holds. A rotation puts the new secret and moves the old one in one
//! transaction; every node reads both every `SECRET_POLL_INTERVAL`, follows with the current one
//! from its next connection, and accepts either while it leads. Finishing deletes the previous
//! one once every running node holds the current one; leaders then close the connections that
//! authenticated with it (`Leader::set_secrets`).

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp};

use crate::auth::{Secret, Secrets};
use crate::cluster::{command_client, command_runtime, etcd_unreachable, Keys};
use crate::cluster_admin::{id_under, kvs_of};

/// How often a node reads the secret's keys.
pub const SECRET_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How long `ferry cluster rotate-secret` waits, by default, for every running node to hold the
/// new secret.
pub const ROTATION_WAIT_S_DEFAULT: u64 = 30;

/// A fresh random secret, as etcd keeps it: 32 random bytes in hex (the secret is those 64
/// characters, as a secret file holding them would be).
fn fresh_secret() -> anyhow::Result<String> {
    let nonce = crate::auth::random_nonce()?;
    Ok(nonce.iter().map(|b| format!("{b:02x}")).collect())
}

fn secret_of(kv: &KeyValue) -> anyhow::Result<Secret> {
    Secret::new(kv.value().to_vec())
        .map_err(|e| anyhow::anyhow!("the secret at {}: {e}", String::from_utf8_lossy(kv.key())))
}

/// The secrets in `PREFIX/secret` and, during a rotation, `PREFIX/secret-previous`.
fn secrets_of(current: &KeyValue, previous: Option<&KeyValue>) -> anyhow::Result<Secrets> {
    Ok(Secrets {
        current: secret_of(current)?,
        previous: previous.map(secret_of).transpose()?,
    })
}

/// The first key-value of the `i`th response of a transaction of gets.
fn kv_of(responses: &[etcd_client::TxnOpResponse], i: usize) -> Option<KeyValue> {
    kvs_of(responses, i).into_iter().next()
}

/// `PREFIX/secret` and `PREFIX/secret-previous`, read in one transaction.
async fn read(
    client: &mut Client,
    keys: &Keys,
) -> Result<(Option<KeyValue>, Option<KeyValue>), etcd_client::Error> {
    let txn = Txn::new().and_then([
        TxnOp::get(keys.secret.clone(), None),
        TxnOp::get(keys.secret_previous.clone(), None),
    ]);
    let resp = client.txn(txn).await?;
    let responses = resp.op_responses();
    Ok((kv_of(&responses, 0), kv_of(&responses, 1)))
}

/// A node's secrets as it starts: `PREFIX/secret`, created at random, atomically, by whichever
/// node comes first (a transaction that puts it only if the key does not exist), and
/// `PREFIX/secret-previous` if a rotation is in progress. Anyone who can read that key can
/// join the cluster: protect etcd.
pub fn read_at_start(etcd: &[String], prefix: &str) -> anyhow::Result<Secrets> {
    command_runtime()?.block_on(async {
        let keys = Keys::new(prefix);
        let mut client = command_client(etcd).await?;
        let txn = Txn::new()
            .when([Compare::version(keys.secret.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(keys.secret.clone(), fresh_secret()?, None)]);
        let created = client
            .txn(txn)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?
            .succeeded();
        let (current, previous) = read(&mut client, &keys)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        let current = current.ok_or_else(|| {
            anyhow::anyhow!("{} vanished from etcd right after being set", keys.secret)
        })?;
        tracing::info!(
            "shared secret {} etcd at {}{}",
            if created { "created in" } else { "read from" },
            keys.secret,
            if previous.is_some() {
                ", with the previous one: a rotation is in progress"
            } else {
                ""
            }
        );
        secrets_of(&current, previous.as_ref())
    })
}

/// A running node's look at the secret's keys, every `SECRET_POLL_INTERVAL`.
pub(crate) struct SecretPoll {
    /// What the node's follower takes at each connection, and its leader is given.
    secrets: crate::auth::SharedSecrets,
    looked_at: Option<Instant>,
    /// The mod revision of `PREFIX/secret` reported at `PREFIX/secret-taken/ID`, and the lease
    /// it was put under (a new lease, after the node rejoined, needs it put again).
    reported: Option<(i64, i64)>,
    /// Why the last look found nothing to use, said once until it changes.
    unusable_logged: Option<String>,
}

impl SecretPoll {
    pub(crate) fn new(secrets: crate::auth::SharedSecrets) -> SecretPoll {
        SecretPoll {
            secrets,
            looked_at: None,
            reported: None,
            unusable_logged: None,
        }
    }

    /// Reads the keys if `SECRET_POLL_INTERVAL` has passed; takes what changed into `secrets`
    /// (a leading node gives them to its leader), and reports the revision held under `lease`.
    /// etcd errors wait for the next look: the node's loop notices etcd going.
    pub(crate) async fn look(&mut self, client: &mut Client, keys: &Keys, me: &str, lease: i64) {
        let now = Instant::now();
        if self
            .looked_at
            .is_some_and(|at| now.duration_since(at) < SECRET_POLL_INTERVAL)
        {
            return;
        }
        self.looked_at = Some(now);
        let (current, previous) = match read(client, keys).await {
            Ok(kvs) => kvs,
            Err(e) => {
                tracing::debug!("cannot read the shared secret's keys: {e}");
                return;
            }
        };
        let read = match &current {
            None => Err(format!(
                "{} is gone from etcd: keeping the secret held until one is there again (a \
                 node that starts now puts a new one there, which every node then takes)",
                keys.secret
            )),
            Some(current) => secrets_of(current, previous.as_ref())
                .map_err(|e| format!("{e:#}: keeping the secrets held")),
        };
        let secrets = match read {
            Ok(secrets) => secrets,
            Err(why) => {
                if self.unusable_logged.as_ref() != Some(&why) {
                    tracing::error!("{why}");
                    self.unusable_logged = Some(why);
                }
                return;
            }
        };
        self.unusable_logged = None;
        let before = self.secrets.get();
        let changed = self.secrets.set(secrets.clone());
        let revision = current.as_ref().map_or(0, KeyValue::mod_revision);
        if before.current != secrets.current {
            tracing::info!(
                "shared secret rotated: {} is new (revision {revision}); this node's \
                 connections use it from now on, and while it leads it accepts {}",
                keys.secret,
                if secrets.previous.is_some() {
                    "the previous one too until the rotation ends"
                } else {
                    "only it"
                }
            );
        } else if changed && secrets.previous.is_none() {
            tracing::info!(
                "shared secret rotation finished: the previous secret is no longer accepted"
            );
        }
        if self.reported != Some((revision, lease)) {
            let put = client
                .put(
                    keys.secret_taken(me),
                    revision.to_string(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await;
            match put {
                Ok(_) => self.reported = Some((revision, lease)),
                Err(e) => tracing::debug!("cannot report the secret held: {e}"),
            }
        }
    }
}

/// Where the running nodes stand in taking the current secret.
struct Taken {
    /// The mod revision of `PREFIX/secret`.
    revision: i64,
    running: usize,
    /// Running nodes that do not report holding it.
    lagging: Vec<String>,
}

async fn taken(client: &mut Client, keys: &Keys) -> Result<Taken, etcd_client::Error> {
    let prefix = || Some(GetOptions::new().with_prefix());
    let txn = Txn::new().and_then([
        TxnOp::get(keys.secret.clone(), None),
        TxnOp::get(keys.nodes.clone(), prefix()),
        TxnOp::get(keys.secret_taken(""), prefix()),
    ]);
    let resp = client.txn(txn).await?;
    let responses = resp.op_responses();
    let revision = kv_of(&responses, 0).map_or(0, |kv| kv.mod_revision());
    let holding: Vec<String> = kvs_of(&responses, 2)
        .iter()
        .filter(|kv| {
            std::str::from_utf8(kv.value())
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|r| r >= revision)
        })
        .map(|kv| id_under(kv, &keys.secret_taken("")))
        .collect();
    let running: Vec<String> = kvs_of(&responses, 1)
        .iter()
        .map(|kv| id_under(kv, &keys.nodes))
        .collect();
    let lagging = running
        .iter()
        .filter(|id| !holding.contains(id))
        .cloned()
        .collect();
    Ok(Taken {
        revision,
        running: running.len(),
        lagging,
    })
}

/// Waits up to `timeout` for every running node to hold the current secret.
async fn wait_taken(
    client: &mut Client,
    etcd: &[String],
    keys: &Keys,
    timeout: Duration,
) -> anyhow::Result<Taken> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = taken(client, keys)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        if now.lagging.is_empty() {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{} of {} running nodes do not hold the secret at {} (revision {}) after {} s: \
                 {}. Does each run with --secret-from-etcd, and reach etcd? The previous \
                 secret is still accepted; run this again once they do, or stop them",
                now.lagging.len(),
                now.running,
                keys.secret,
                now.revision,
                timeout.as_secs(),
                now.lagging.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `txn`, guarded by the secret read before it: an error if the guard failed (the secret
/// changed meanwhile, `doing` what).
async fn guarded(
    client: &mut Client,
    etcd: &[String],
    keys: &Keys,
    txn: Txn,
    doing: &str,
) -> anyhow::Result<()> {
    let resp = client
        .txn(txn)
        .await
        .map_err(|e| etcd_unreachable(etcd, e))?;
    anyhow::ensure!(
        resp.succeeded(),
        "{} changed while {doing} (another rotation?): nothing done; look with `ferry cluster \
         status` and run this again",
        keys.secret
    );
    Ok(())
}

/// `ferry cluster rotate-secret`: a new secret at `PREFIX/secret` (`chosen`, or else drawn at
/// random), the old one moved to `PREFIX/secret-previous`, in one transaction; then waits up to
/// `timeout` for every running node to hold it. Returns what to tell the operator.
pub fn rotate(
    etcd: &[String],
    prefix: &str,
    chosen: Option<Secret>,
    timeout: Duration,
) -> anyhow::Result<String> {
    command_runtime()?.block_on(async {
        let keys = Keys::new(prefix);
        let mut client = command_client(etcd).await?;
        let (current, previous) = read(&mut client, &keys)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        let Some(current) = current else {
            anyhow::bail!(
                "no secret at {}: this cluster's nodes do not keep theirs in etcd \
                 (--secret-from-etcd); rotate a secret file as in the README (Troubleshooting)",
                keys.secret
            );
        };
        if previous.is_some() {
            anyhow::bail!(
                "a rotation is in progress ({} is set): finish it first with `ferry cluster \
                 rotate-secret --finish`",
                keys.secret_previous
            );
        }
        let new = match chosen {
            Some(secret) => secret.bytes().to_vec(),
            None => fresh_secret()?.into_bytes(),
        };
        anyhow::ensure!(
            new != current.value(),
            "the new secret is the one at {} already: nothing to rotate",
            keys.secret
        );
        // Guarded by the secret read and the absence of a previous one: two rotations at once
        // would otherwise drop the first's old secret while a node may still hold it.
        let txn = Txn::new()
            .when([
                Compare::mod_revision(
                    keys.secret.clone(),
                    CompareOp::Equal,
                    current.mod_revision(),
                ),
                Compare::version(keys.secret_previous.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(keys.secret_previous.clone(), current.value().to_vec(), None),
                TxnOp::put(keys.secret.clone(), new, None),
            ]);
        guarded(&mut client, etcd, &keys, txn, "rotating it").await?;
        let nodes = wait_taken(&mut client, etcd, &keys, timeout).await?.running;
        Ok(format!(
            "a new secret is at {}; the old one, at {}, is still accepted. {nodes} of {nodes} \
             running nodes hold it. Give it to any follower outside the cluster \
             (--secret-file), then run `ferry cluster rotate-secret --finish`",
            keys.secret, keys.secret_previous
        ))
    })
}

/// `ferry cluster rotate-secret --finish`: once every running node holds the current secret
/// (waiting up to `timeout`), deletes `PREFIX/secret-previous`. Returns what to tell the
/// operator (whether a rotation was in progress).
pub fn finish(etcd: &[String], prefix: &str, timeout: Duration) -> anyhow::Result<String> {
    command_runtime()?.block_on(async {
        let keys = Keys::new(prefix);
        let mut client = command_client(etcd).await?;
        let (_, previous) = read(&mut client, &keys)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        if previous.is_none() {
            return Ok(format!(
                "no rotation in progress ({} is not set)",
                keys.secret_previous
            ));
        }
        let taken = wait_taken(&mut client, etcd, &keys, timeout).await?;
        // Guarded by the secret the nodes were seen to hold: a rotation begun meanwhile has a
        // previous secret that some node may still need.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                keys.secret.clone(),
                CompareOp::Equal,
                taken.revision,
            )])
            .and_then([TxnOp::delete(keys.secret_previous.clone(), None)]);
        guarded(&mut client, etcd, &keys, txn, "finishing the rotation").await?;
        Ok(format!(
            "deleted {}: the rotation is finished. Leaders accept only the secret at {} now, and \
             close the connections made with the old one",
            keys.secret_previous, keys.secret
        ))
    })
}
