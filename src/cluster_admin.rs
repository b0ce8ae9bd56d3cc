//! What an operator asks of a `ferry node` cluster from outside, through etcd alone:
//! `ferry cluster status`, who leads, who may lead and who runs (`inspect`), and `ferry cluster
//! reset`, which forgets what decides who may lead, only while no node runs (`reset`).
//!
//! Both read the keys `cluster` keeps (`cluster::Keys`) in one transaction, so what they see is
//! one revision of etcd, never half of a change.

use std::fmt::Write as _;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
};

use crate::cluster::{command_client, command_runtime, data_marked_by, etcd_unreachable, Keys};
use crate::status::json_str;

/// A cluster as etcd holds it.
pub struct ClusterView {
    pub prefix: String,
    /// The node holding the election (its `--advertise` address), if any.
    pub leader: Option<String>,
    /// `PREFIX/isr`, the nodes that may campaign; `None` when never written (a new cluster, or
    /// one reset): then any node may.
    pub isr: Option<Vec<String>>,
    /// The node that set `PREFIX/data` (its data dir held files): from then on a node whose data
    /// dir holds none does not campaign.
    pub held_data_set_by: Option<String>,
    /// A pending `ferry handoff` request: the target's id, or `*` (the most caught-up one).
    pub handoff: Option<String>,
    /// `PREFIX/handoff-instance`: an instance a handoff passed on, which its target has not
    /// taken yet (it takes it when elected and goes on with it).
    pub passed_instance: Option<PassedInstance>,
    /// `PREFIX/handoff-fork`, where it names the instance passed on: the fork that instance
    /// is, which its target goes on with too.
    pub passed_fork: Option<PassedFork>,
    /// `PREFIX/lineage`, the lineage of the cluster's data (hex), set by its first leader.
    pub lineage: Option<String>,
    /// The shared secret is kept in etcd (`PREFIX/secret`, `ferry node --secret-from-etcd`).
    pub secret_in_etcd: bool,
    /// A rotation of it is in progress (`PREFIX/secret-previous` is set: still accepted).
    pub secret_rotating: bool,
    /// Every node running, in the set, or campaigning, sorted by id.
    pub nodes: Vec<NodeView>,
}

/// What a leader that handed off passed on (`PREFIX/handoff-instance`, `TARGET INSTANCE
/// POSITION`): its target goes on with `instance` from `position + 1` once elected.
pub struct PassedInstance {
    pub to: String,
    /// The instance, in hex.
    pub instance: String,
    pub position: u64,
}

/// The key's value, as `parse` reads it.
impl std::fmt::Display for PassedInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.to, self.instance, self.position)
    }
}

impl PassedInstance {
    /// The key's value as `Display` writes it; `None` if it is not that.
    pub(crate) fn parse(value: &str) -> Option<PassedInstance> {
        let (to, instance, position) = three_fields(value)?;
        Some(PassedInstance {
            to: to.to_string(),
            instance: instance.to_string(),
            position: position.parse().ok()?,
        })
    }
}

/// What a leader that handed off a forked instance passed on besides (`PREFIX/handoff-fork`,
/// `INSTANCE FROM POSITION`, then `G Q` per later link of the fork's chain): `instance` goes on
/// from instance `from` up to a MARK at `position`, and from each of `earlier` up to its
/// position (`docs/PROTOCOL.md`, *Across a handoff*, *After failovers in a row*).
pub struct PassedFork {
    /// The instance, in hex.
    pub instance: String,
    /// The instance it goes on from, in hex.
    pub from: String,
    pub position: u64,
    /// The later links of the fork's chain: each an instance, in hex, and a position.
    pub earlier: Vec<(String, u64)>,
}

/// The key's value, as `parse` reads it.
impl std::fmt::Display for PassedFork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.instance, self.from, self.position)?;
        for (from, position) in &self.earlier {
            write!(f, " {from} {position}")?;
        }
        Ok(())
    }
}

impl PassedFork {
    /// The key's value as `Display` writes it; `None` if it is not that.
    pub(crate) fn parse(value: &str) -> Option<PassedFork> {
        let mut words = value.split(' ');
        let instance = words.next()?.to_string();
        let mut links = Vec::new();
        while let Some(from) = words.next() {
            links.push((from.to_string(), words.next()?.parse().ok()?));
        }
        let mut links = links.into_iter();
        let (from, position) = links.next()?;
        Some(PassedFork {
            instance,
            from,
            position,
            earlier: links.collect(),
        })
    }

    /// ` (a fork of instance FROM at position P, itself a fork of ...)`: for the status.
    fn describe(&self) -> String {
        let first = std::iter::once((&self.from, self.position));
        let earlier = self.earlier.iter().map(|(from, at)| (from, *at));
        format!(
            " ({})",
            crate::fork_chain::describe_links(first.chain(earlier))
        )
    }
}

/// The three fields of a value of the form `A B C` (one space between each); `None` if it has
/// another number of them.
fn three_fields(value: &str) -> Option<(&str, &str, &str)> {
    let mut f = value.split(' ');
    match (f.next(), f.next(), f.next(), f.next()) {
        (Some(a), Some(b), Some(c), None) => Some((a, b, c)),
        _ => None,
    }
}

/// One node as etcd knows it.
pub struct NodeView {
    pub id: String,
    /// It holds `PREFIX/nodes/ID` under its lease: it runs (or was killed less than its lease
    /// TTL ago).
    pub running: bool,
    /// `pid N on HOST`, as the node wrote it when it joined.
    pub process: Option<String>,
    pub leads: bool,
    pub in_isr: bool,
    /// It has a key in the election: it leads or is queued to.
    pub campaigning: bool,
}

/// A key-value's value as text (invalid UTF-8 replaced).
pub(crate) fn text(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.value()).into_owned()
}

fn key_text(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

/// The part of `kv`'s key after `prefix` (a node id under `PREFIX/nodes/`), or the whole key.
pub(crate) fn id_under(kv: &KeyValue, prefix: &str) -> String {
    let key = key_text(kv);
    match key.strip_prefix(prefix) {
        Some(id) => id.to_string(),
        None => key,
    }
}

/// The key-values of the `i`th response of a transaction of gets.
pub(crate) fn kvs_of(responses: &[TxnOpResponse], i: usize) -> Vec<KeyValue> {
    match responses.get(i) {
        Some(TxnOpResponse::Get(get)) => get.kvs().to_vec(),
        _ => Vec::new(),
    }
}

/// The election's candidates, first the one that holds it (the lowest create revision: how the
/// etcd election API decides).
fn election_options() -> GetOptions {
    GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    )
}

/// The cluster sharing `prefix` in the etcd at `etcd`, read in one transaction.
pub fn inspect(etcd: &[String], prefix: &str) -> anyhow::Result<ClusterView> {
    command_runtime()?.block_on(async {
        let keys = Keys::new(prefix);
        let mut client = command_client(etcd).await?;
        let txn = Txn::new().and_then([
            TxnOp::get(keys.candidates(), Some(election_options())),
            TxnOp::get(keys.isr.clone(), None),
            TxnOp::get(keys.data.clone(), None),
            TxnOp::get(keys.handoff.clone(), None),
            TxnOp::get(keys.nodes.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(keys.lineage.clone(), None),
            // Whether the secret's keys exist: never their values.
            TxnOp::get(
                keys.secret.clone(),
                Some(GetOptions::new().with_keys_only()),
            ),
            TxnOp::get(
                keys.secret_previous.clone(),
                Some(GetOptions::new().with_keys_only()),
            ),
            TxnOp::get(keys.handoff_instance.clone(), None),
            TxnOp::get(keys.handoff_fork.clone(), None),
        ]);
        let resp = client
            .txn(txn)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        let responses = resp.op_responses();
        let lineage = kvs_of(&responses, 5).first().map(text);
        let secret_in_etcd = !kvs_of(&responses, 6).is_empty();
        let secret_rotating = !kvs_of(&responses, 7).is_empty();
        let passed_instance = kvs_of(&responses, 8).first().map(text).and_then(|value| {
            let parsed = PassedInstance::parse(&value);
            if parsed.is_none() {
                tracing::warn!(
                    "{} holds {value:?}, not TARGET INSTANCE POSITION: not shown",
                    keys.handoff_instance
                );
            }
            parsed
        });
        // Left from an earlier handoff where it names another instance: not shown.
        let passed_fork = kvs_of(&responses, 9)
            .first()
            .and_then(|kv| PassedFork::parse(&text(kv)))
            .filter(|f| {
                passed_instance
                    .as_ref()
                    .is_some_and(|p| p.instance == f.instance)
            });
        let candidates: Vec<String> = kvs_of(&responses, 0).iter().map(text).collect();
        let isr = kvs_of(&responses, 1).first().map(|kv| {
            text(kv)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        });
        let held_data_set_by = kvs_of(&responses, 2)
            .first()
            .map(|kv| data_marked_by(&text(kv)).to_string());
        let handoff = kvs_of(&responses, 3).first().map(text);
        let running: Vec<(String, String)> = kvs_of(&responses, 4)
            .iter()
            .map(|kv| (id_under(kv, &keys.nodes), text(kv)))
            .collect();
        let leader = candidates.first().cloned();
        let mut ids: Vec<String> = running.iter().map(|(id, _)| id.clone()).collect();
        ids.extend(isr.iter().flatten().cloned());
        ids.extend(candidates.iter().cloned());
        ids.sort();
        ids.dedup();
        let nodes = ids
            .into_iter()
            .map(|id| {
                let process = running
                    .iter()
                    .find(|(r, _)| *r == id)
                    .map(|(_, p)| p.clone());
                NodeView {
                    running: process.is_some(),
                    process,
                    leads: leader.as_deref() == Some(id.as_str()),
                    in_isr: isr.iter().flatten().any(|m| *m == id),
                    campaigning: candidates.contains(&id),
                    id,
                }
            })
            .collect();
        Ok(ClusterView {
            prefix: prefix.to_string(),
            leader,
            isr,
            held_data_set_by,
            handoff,
            passed_instance,
            passed_fork,
            lineage,
            secret_in_etcd,
            secret_rotating,
            nodes,
        })
    })
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl ClusterView {
    /// What `ferry cluster status` prints: the cluster's facts, a row per node, and a note
    /// where they explain why no node leads.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "cluster: {}", self.prefix);
        let _ = writeln!(out, "leader: {}", self.leader.as_deref().unwrap_or("none"));
        let isr = match &self.isr {
            None => "not written (a new or reset cluster: any node may lead)".to_string(),
            Some(members) if members.is_empty() => "none".to_string(),
            Some(members) => members.join(","),
        };
        let _ = writeln!(out, "in sync: {isr}");
        let held = match &self.held_data_set_by {
            Some(by) => format!("yes (set by {by}): a node with an empty data dir does not lead"),
            None => "no".to_string(),
        };
        let _ = writeln!(out, "held data: {held}");
        let lineage = self
            .lineage
            .as_deref()
            .unwrap_or("none yet (set by the first leader)");
        let _ = writeln!(out, "lineage: {lineage}");
        let secret = match (self.secret_in_etcd, self.secret_rotating) {
            (false, _) => "not in etcd (the nodes are given theirs)",
            (true, false) => "in etcd",
            (true, true) => {
                "in etcd, a rotation in progress: the previous one is accepted until `ferry \
                 cluster rotate-secret --finish`"
            }
        };
        let _ = writeln!(out, "secret: {secret}");
        if let Some(to) = &self.handoff {
            let to = if to == "*" {
                "the most caught-up follower"
            } else {
                to
            };
            let _ = writeln!(out, "handoff: requested, to {to}");
        }
        if let Some(p) = &self.passed_instance {
            let fork = self
                .passed_fork
                .as_ref()
                .map_or(String::new(), PassedFork::describe);
            let _ = writeln!(
                out,
                "handoff: instance {}{fork} passed on to {} at position {}, for it to go on with \
                 once elected",
                p.instance, p.to, p.position
            );
        }
        let width = self
            .nodes
            .iter()
            .map(|n| n.id.len())
            .max()
            .unwrap_or(0)
            .max(4);
        let _ = writeln!(
            out,
            "\n{:width$}  LEADS  IN-SYNC  CAMPAIGNING  PROCESS",
            "NODE"
        );
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "{:width$}  {:5}  {:7}  {:11}  {}",
                n.id,
                yes_no(n.leads),
                yes_no(n.in_isr),
                yes_no(n.campaigning),
                n.process.as_deref().unwrap_or("(not running)")
            );
        }
        if let Some(note) = self.note() {
            let _ = writeln!(out, "\n{note}");
        }
        out
    }

    /// Why no node leads, where the facts say.
    fn note(&self) -> Option<String> {
        if self.leader.is_some() {
            return None;
        }
        let running = self.nodes.iter().filter(|n| n.running).count();
        if running == 0 {
            return Some("No node runs.".into());
        }
        if let Some(isr) = &self.isr {
            if !self.nodes.iter().any(|n| n.running && n.in_isr) {
                return Some(format!(
                    "No node of the in-sync set ({}) runs, and only those campaign: start \
                     one. If none of them will come back, stop every node, run `ferry cluster \
                     reset`, and start the node with the newest data first.",
                    isr.join(",")
                ));
            }
        }
        if !self.nodes.iter().any(|n| n.campaigning) {
            return Some(
                "No running node campaigns: one outside the in-sync set does not, nor one whose \
                 data dir holds no files in a cluster that has held data, and an empty one \
                 waits --empty-wait first. Their logs say which."
                    .into(),
            );
        }
        None
    }

    /// `ferry cluster status --json`.
    pub fn json(&self) -> String {
        let opt = |v: &Option<String>| v.as_deref().map_or("null".to_string(), json_str);
        let isr = match &self.isr {
            None => "null".to_string(),
            Some(m) => format!(
                "[{}]",
                m.iter().map(|s| json_str(s)).collect::<Vec<_>>().join(",")
            ),
        };
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{{\"id\":{},\"running\":{},\"process\":{},\"leads\":{},\"in_isr\":{},\
                     \"campaigning\":{}}}",
                    json_str(&n.id),
                    n.running,
                    opt(&n.process),
                    n.leads,
                    n.in_isr,
                    n.campaigning
                )
            })
            .collect();
        let passed = self
            .passed_instance
            .as_ref()
            .map_or("null".to_string(), |p| {
                let fork = self.passed_fork.as_ref().map_or("null".to_string(), |f| {
                    let earlier: Vec<String> = f
                        .earlier
                        .iter()
                        .map(|(from, at)| {
                            format!("{{\"from\":{},\"position\":{at}}}", json_str(from))
                        })
                        .collect();
                    format!(
                        "{{\"from\":{},\"position\":{},\"earlier\":[{}]}}",
                        json_str(&f.from),
                        f.position,
                        earlier.join(",")
                    )
                });
                format!(
                    "{{\"to\":{},\"instance\":{},\"position\":{},\"fork\":{fork}}}",
                    json_str(&p.to),
                    json_str(&p.instance),
                    p.position
                )
            });
        format!(
            "{{\"prefix\":{},\"leader\":{},\"isr\":{isr},\"held_data_set_by\":{},\"handoff\":{},\
             \"passed_instance\":{passed},\"lineage\":{},\"secret_in_etcd\":{},\
             \"secret_rotating\":{},\"nodes\":[{}]}}\n",
            json_str(&self.prefix),
            opt(&self.leader),
            opt(&self.held_data_set_by),
            opt(&self.handoff),
            opt(&self.lineage),
            self.secret_in_etcd,
            self.secret_rotating,
            nodes.join(",")
        )
    }
}

/// What `reset` deleted: each key with the value it had.
pub struct ResetReport {
    pub deleted: Vec<(String, String)>,
}

/// Deletes what decides who may lead: the in-sync replica set (`PREFIX/isr`), the mark that
/// the cluster has held data (`PREFIX/data`), the lineage of its data (`PREFIX/lineage`), a
/// pending handoff request, and an instance a handoff passed on (`PREFIX/handoff-instance`).
/// Then the first node to campaign leads whatever its data dir holds, so this is refused while
/// any node runs or campaigns: the check and the deletes are one transaction, so a node that
/// joins a moment later sees the cluster either before or after it, never between.
pub fn reset(etcd: &[String], prefix: &str) -> anyhow::Result<ResetReport> {
    command_runtime()?.block_on(async {
        let keys = Keys::new(prefix);
        let mut client = command_client(etcd).await?;
        let prev = || Some(DeleteOptions::new().with_prev_key());
        let txn = Txn::new()
            .when([
                Compare::create_revision(keys.nodes.clone(), CompareOp::Equal, 0).with_prefix(),
                Compare::create_revision(keys.candidates(), CompareOp::Equal, 0).with_prefix(),
            ])
            .and_then([
                TxnOp::delete(keys.isr.clone(), prev()),
                TxnOp::delete(keys.data.clone(), prev()),
                TxnOp::delete(keys.lineage.clone(), prev()),
                TxnOp::delete(keys.handoff.clone(), prev()),
                TxnOp::delete(keys.handoff_result.clone(), prev()),
                TxnOp::delete(keys.handoff_instance.clone(), prev()),
                TxnOp::delete(keys.handoff_fork.clone(), prev()),
            ])
            .or_else([
                TxnOp::get(keys.nodes.clone(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(keys.candidates(), Some(election_options())),
            ]);
        let resp = client
            .txn(txn)
            .await
            .map_err(|e| etcd_unreachable(etcd, e))?;
        let responses = resp.op_responses();
        if !resp.succeeded() {
            let mut running: Vec<String> = kvs_of(&responses, 0)
                .iter()
                .map(|kv| format!("{} ({})", id_under(kv, &keys.nodes), text(kv)))
                .collect();
            for candidate in kvs_of(&responses, 1).iter().map(text) {
                if !running
                    .iter()
                    .any(|r| r.starts_with(&format!("{candidate} (")))
                {
                    running.push(candidate);
                }
            }
            anyhow::bail!(
                "refusing to reset cluster {prefix} while {} node(s) run: {}. After a reset the \
                 first node to campaign leads whatever its data dir holds, so stop every node \
                 first (a node killed a moment ago keeps its key until its lease TTL lapses)",
                running.len(),
                running.join(", ")
            );
        }
        let deleted = responses
            .iter()
            .filter_map(|r| match r {
                TxnOpResponse::Delete(d) => d.prev_kvs().first().map(|kv| (key_text(kv), text(kv))),
                _ => None,
            })
            .collect();
        Ok(ResetReport { deleted })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, running: bool, in_isr: bool, campaigning: bool) -> NodeView {
        NodeView {
            id: id.into(),
            running,
            process: running.then(|| format!("pid 1 on {id}")),
            leads: false,
            in_isr,
            campaigning,
        }
    }

    fn view(isr: Option<&[&str]>, nodes: Vec<NodeView>) -> ClusterView {
        ClusterView {
            prefix: "ferry".into(),
            leader: None,
            isr: isr.map(|m| m.iter().map(|s| s.to_string()).collect()),
            held_data_set_by: None,
            handoff: None,
            passed_instance: None,
            passed_fork: None,
            lineage: None,
            secret_in_etcd: false,
            secret_rotating: false,
            nodes,
        }
    }

    #[test]
    fn the_note_says_why_no_node_leads() {
        let v = view(
            Some(&["a"]),
            vec![node("a", false, true, false), node("b", true, false, false)],
        );
        let note = v.note().unwrap();
        assert!(
            note.contains("No node of the in-sync set (a) runs"),
            "{note}"
        );
        let v = view(
            Some(&["a", "b"]),
            vec![node("a", true, true, false), node("b", true, true, false)],
        );
        assert!(v.note().unwrap().contains("No running node campaigns"));
        let v = view(None, vec![node("a", true, false, true)]);
        assert_eq!(v.note(), None);
        let v = view(None, vec![]);
        assert_eq!(v.note().as_deref(), Some("No node runs."));
    }

    #[test]
    fn a_passed_instance_reads_back_as_written() {
        let passed = PassedInstance {
            to: "10.0.0.2:7070".into(),
            instance: "00112233445566778899aabbccddeeff".into(),
            position: 1300011,
        };
        let value = passed.to_string();
        assert_eq!(
            value,
            "10.0.0.2:7070 00112233445566778899aabbccddeeff 1300011"
        );
        let back = PassedInstance::parse(&value).unwrap();
        assert_eq!(
            (back.to, back.instance, back.position),
            (passed.to, passed.instance, passed.position)
        );
        assert!(PassedInstance::parse("10.0.0.2:7070 00112233 12 extra").is_none());
    }

    #[test]
    fn a_passed_fork_reads_back_as_written() {
        let mut passed = PassedFork {
            instance: "00112233445566778899aabbccddeeff".into(),
            from: "ffeeddccbbaa99887766554433221100".into(),
            position: 900,
            earlier: Vec::new(),
        };
        let value = passed.to_string();
        assert_eq!(
            value,
            "00112233445566778899aabbccddeeff ffeeddccbbaa99887766554433221100 900"
        );
        let fields = |p: &PassedFork| {
            let (i, f) = (p.instance.clone(), p.from.clone());
            (i, f, p.position, p.earlier.clone())
        };
        assert_eq!(
            PassedFork::parse(&value).as_ref().map(fields),
            Some(fields(&passed))
        );
        passed.earlier = vec![("aa".repeat(16), 700)];
        let value = passed.to_string();
        assert!(
            value.ends_with(&format!(" 900 {} 700", "aa".repeat(16))),
            "{value}"
        );
        assert_eq!(
            PassedFork::parse(&value).as_ref().map(fields),
            Some(fields(&passed))
        );
        assert!(PassedFork::parse("00 11 12 extra").is_none());
        assert!(PassedFork::parse("00 11 twelve").is_none());
        assert!(PassedFork::parse("00").is_none());
    }

    #[test]
    fn json_is_one_object_with_every_node() {
        let mut v = view(None, vec![node("a:1", true, false, true)]);
        v.held_data_set_by = Some("a:1".into());
        assert_eq!(
            v.json(),
            "{\"prefix\":\"ferry\",\"leader\":null,\"isr\":null,\"held_data_set_by\":\"a:1\",\
             \"handoff\":null,\"passed_instance\":null,\"lineage\":null,\"secret_in_etcd\":false,\
             \"secret_rotating\":false,\
             \"nodes\":[{\"id\":\"a:1\",\"running\":true,\"process\":\"pid 1 \
             on a:1\",\"leads\":false,\"in_isr\":false,\"campaigning\":true}]}\n"
        );
    }
}
