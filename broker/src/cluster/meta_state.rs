//! The metadata group's state machine: the cluster's durable definitions (vhosts, users,
//! permissions, exchanges, queues, bindings, policies, limits, the cluster name), changed
//! only by committed [`Command`]s, applied in log order on every node.
//!
//! Each log entry carries a batch of commands (a declaration is one; a definitions import is
//! many, committed together). Applying is `store::command::apply`, deterministic and
//! idempotent, so every node that applies the same log holds the same definitions. The
//! snapshot is the definitions themselves as a RabbitMQ definitions document (which RabbitMQ's
//! tools read), with the last applied entry and the membership under `warren_metadata`,
//! written atomically to `meta-snapshot.json` in the group's directory so that a node can
//! restart after its log was compacted; a node that falls behind is sent it whole.

use crate::store::command::{Command, apply};
use crate::store::definitions::Definitions;
use crate::store::document;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

openraft::declare_raft_types!(
    /// The metadata group: entries carry batches of commands; nothing comes back but the
    /// fact that they were applied.
    pub MetaConfig: D = Proposal, R = ()
);

/// One entry's commands, with the process that proposed them: that process has already
/// made the change to its live objects, the others make it as they apply the entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The proposing process (a random number of each start; 0: none in particular).
    pub origin: u64,
    /// The proposal's number in that process.
    pub id: u64,
    pub commands: Vec<Command>,
}

impl From<Vec<Command>> for Proposal {
    fn from(commands: Vec<Command>) -> Self {
        Self {
            origin: 0,
            id: 0,
            commands,
        }
    }
}

/// Told of every entry applied after it was installed, in log order: its index and proposal.
pub type ApplyHook = Box<dyn Fn(u64, Proposal) + Send + Sync>;

/// The snapshot file in the group's directory.
const SNAPSHOT_FILE: &str = "meta-snapshot.json";

/// What the state machine holds, and its snapshot's content.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Applied {
    last: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    definitions: Definitions,
}

#[derive(Default)]
struct Inner {
    applied: Applied,
    /// The last snapshot: its meta and bytes (as written to the file).
    snapshot: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    snapshots_built: u64,
    hook: Option<ApplyHook>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("last", &self.applied.last)
            .field("snapshots_built", &self.snapshots_built)
            .finish_non_exhaustive()
    }
}

/// The metadata state machine of one node. Clones share it.
#[derive(Debug, Clone)]
pub struct MetaState {
    inner: Arc<Mutex<Inner>>,
    dir: Option<PathBuf>,
    /// The index of the last entry applied, for those waiting for a change to be visible.
    applied_index: Arc<watch::Sender<u64>>,
}

impl MetaState {
    /// The state of the group whose files are in `dir` (None: nothing on disk), from its
    /// last snapshot if there is one; the log replays what came after.
    pub fn open(dir: Option<&Path>) -> std::io::Result<Self> {
        let mut inner = Inner::default();
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)?;
            match std::fs::read(dir.join(SNAPSHOT_FILE)) {
                Ok(bytes) => {
                    let (meta, applied) = decode(&bytes).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{}: {e}", dir.join(SNAPSHOT_FILE).display()),
                        )
                    })?;
                    inner.applied = applied;
                    inner.snapshot = Some((meta, bytes));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let index = inner.applied.last.map_or(0, |l| l.index);
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
            dir: dir.map(Path::to_path_buf),
            applied_index: Arc::new(watch::channel(index).0),
        })
    }

    /// The definitions as of the last applied command.
    pub fn definitions(&self) -> Definitions {
        self.inner.lock().applied.definitions.clone()
    }

    /// Reads the definitions as of the last applied command, without copying them.
    pub fn with_definitions<R>(&self, f: impl FnOnce(&Definitions) -> R) -> R {
        f(&self.inner.lock().applied.definitions)
    }

    /// Follows the index of the last applied entry.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied_index.subscribe()
    }

    /// The index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        *self.applied_index.borrow()
    }

    /// Whether the group has a membership (it was initialized, here or by another node).
    pub fn has_membership(&self) -> bool {
        self.inner
            .lock()
            .applied
            .membership
            .membership()
            .nodes()
            .next()
            .is_some()
    }

    /// Calls `f` with the definitions and the index they are at, then `hook` with every
    /// entry applied after, in order: nothing is missed or seen twice between the two.
    pub fn follow<R>(&self, f: impl FnOnce(&Definitions, u64) -> R, hook: ApplyHook) -> R {
        let mut inner = self.inner.lock();
        let index = inner.applied.last.map_or(0, |l| l.index);
        let r = f(&inner.applied.definitions, index);
        inner.hook = Some(hook);
        r
    }

    fn write_snapshot(&self, bytes: &[u8]) -> std::io::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let path = dir.join(SNAPSHOT_FILE);
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The key of the snapshot document under which the group's own state is.
const GROUP_KEY: &str = document::SNAPSHOT_GROUP_KEY;

/// The group's own state in the snapshot document.
#[derive(Serialize, Deserialize)]
struct GroupState {
    snapshot: SnapshotMeta<u64, BasicNode>,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
}

/// The snapshot file as earlier versions wrote it: the definitions in their serde form.
#[derive(Deserialize)]
struct EarlierSnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    applied: Applied,
}

/// A snapshot's content: the definitions as a RabbitMQ definitions document, the group's
/// state beside them.
fn encode(meta: &SnapshotMeta<u64, BasicNode>, applied: &Applied) -> serde_json::Result<Vec<u8>> {
    let mut doc = document::to_document(&applied.definitions);
    let group = GroupState {
        snapshot: meta.clone(),
        last_applied: applied.last,
        membership: applied.membership.clone(),
    };
    doc.insert(GROUP_KEY.into(), serde_json::to_value(group)?);
    serde_json::to_vec_pretty(&serde_json::Value::Object(doc))
}

/// Reads what [`encode`] wrote (or an earlier version's snapshot).
fn decode(bytes: &[u8]) -> Result<(SnapshotMeta<u64, BasicNode>, Applied), String> {
    let mut doc: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let Some(group) = doc.remove(GROUP_KEY) else {
        let earlier: EarlierSnapshotFile = serde_json::from_value(doc.into())
            .map_err(|e| format!("not a metadata snapshot: {e}"))?;
        return Ok((earlier.meta, earlier.applied));
    };
    let group: GroupState =
        serde_json::from_value(group).map_err(|e| format!("{GROUP_KEY}: {e}"))?;
    let definitions = document::from_document(&doc)?;
    Ok((
        group.snapshot,
        Applied {
            last: group.last_applied,
            membership: group.membership,
            definitions,
        },
    ))
}

fn snapshot_of(meta: &SnapshotMeta<u64, BasicNode>, bytes: &[u8]) -> Snapshot<MetaConfig> {
    Snapshot {
        meta: meta.clone(),
        snapshot: Box::new(Cursor::new(bytes.to_vec())),
    }
}

fn io_error(e: &(impl std::error::Error + 'static)) -> StorageError<u64> {
    StorageIOError::write_snapshot(None, AnyError::new(e)).into()
}

impl RaftSnapshotBuilder<MetaConfig> for MetaState {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaConfig>, StorageError<u64>> {
        let (meta, bytes) = {
            let mut inner = self.inner.lock();
            inner.snapshots_built += 1;
            let meta = SnapshotMeta {
                last_log_id: inner.applied.last,
                last_membership: inner.applied.membership.clone(),
                snapshot_id: format!(
                    "{}-{}",
                    inner.applied.last.map_or(0, |l| l.index),
                    inner.snapshots_built
                ),
            };
            let bytes = encode(&meta, &inner.applied).map_err(|e| io_error(&e))?;
            (meta, bytes)
        };
        self.write_snapshot(&bytes).map_err(|e| io_error(&e))?;
        self.inner.lock().snapshot = Some((meta.clone(), bytes.clone()));
        Ok(snapshot_of(&meta, &bytes))
    }
}

impl RaftStateMachine<MetaConfig> for MetaState {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let inner = self.inner.lock();
        Ok((inner.applied.last, inner.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<MetaConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let mut last = None;
        {
            let mut inner = self.inner.lock();
            for e in entries {
                inner.applied.last = Some(e.log_id);
                last = Some(e.log_id.index);
                match e.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(proposal) => {
                        for c in &proposal.commands {
                            apply(&mut inner.applied.definitions, c);
                        }
                        if let Some(hook) = &inner.hook {
                            hook(e.log_id.index, proposal);
                        }
                    }
                    EntryPayload::Membership(m) => {
                        inner.applied.membership = StoredMembership::new(Some(e.log_id), m);
                    }
                }
                replies.push(());
            }
        }
        if let Some(index) = last {
            self.applied_index.send_replace(index);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let (_, applied) = decode(&bytes).map_err(|e| {
            StorageIOError::read_snapshot(None, AnyError::error(format!("metadata snapshot: {e}")))
        })?;
        self.write_snapshot(&bytes).map_err(|e| io_error(&e))?;
        let index = {
            let mut inner = self.inner.lock();
            inner.applied = applied;
            inner.snapshot = Some((meta.clone(), bytes));
            inner.applied.last.map_or(0, |l| l.index)
        };
        self.applied_index.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<MetaConfig>>, StorageError<u64>> {
        let inner = self.inner.lock();
        Ok(inner
            .snapshot
            .as_ref()
            .map(|(meta, bytes)| snapshot_of(meta, bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::cluster::log_store::{LogStore, METADATA_GROUP, RaftLog, RaftLogOptions};
    use crate::cluster::raft_network::{Groups, Network, node, node_id};
    use crate::config::Config;
    use amq_protocol::types::FieldTable;
    use openraft::Raft;
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};
    use tokio::net::TcpListener;

    fn raft_config() -> Arc<openraft::Config> {
        Arc::new(
            openraft::Config {
                heartbeat_interval: 100,
                election_timeout_min: 300,
                election_timeout_max: 600,
                ..openraft::Config::default()
            }
            .validate()
            .unwrap(),
        )
    }

    fn declare(name: &str) -> Command {
        Command::DeclareQueue {
            vhost: "/".into(),
            name: name.into(),
            auto_delete: false,
            arguments: FieldTable::default(),
            node: None,
        }
    }

    fn queues(defs: &Definitions) -> Vec<String> {
        defs.vhosts
            .get("/")
            .map(|v| v.queues.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn start(
        dir: &Path,
        name: &str,
        network: Network<MetaConfig>,
    ) -> (Raft<MetaConfig>, MetaState, RaftLog) {
        let log = RaftLog::open(&dir.join("raft"), RaftLogOptions::default()).unwrap();
        let store = LogStore::open(&log, METADATA_GROUP).await.unwrap();
        let state = MetaState::open(Some(&dir.join("meta"))).unwrap();
        let raft = Raft::new(node_id(name), raft_config(), network, store, state.clone())
            .await
            .unwrap();
        (raft, state, log)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_commands_reach_every_nodes_definitions() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["warren@a", "warren@b", "warren@c"];
        let mut listeners = Vec::new();
        for _ in names {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let mut nodes = Vec::new();
        let mut stops = Vec::new();
        for (name, listener) in names.iter().zip(listeners) {
            let config = Config {
                data_dir: dir.path().join(name),
                node_name: (*name).into(),
                cluster_secret: Some("s".into()),
                peers: peers.clone(),
                ..Config::default()
            };
            let cluster = Cluster::new(&config).unwrap();
            let (stop, stopped) = watch::channel(false);
            cluster.start(listener, stopped);
            stops.push(stop);
            let groups = Groups::<MetaConfig>::serve(&cluster);
            let (raft, state, log) = start(
                &dir.path().join(name),
                name,
                Network::new(cluster.clone(), METADATA_GROUP),
            )
            .await;
            groups.insert(METADATA_GROUP, raft.clone());
            nodes.push((raft, state, log));
        }
        let members: BTreeMap<u64, BasicNode> =
            names.iter().map(|n| (node_id(n), node(n))).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while nodes[0].0.initialize(members.clone()).await.is_err() {
            assert!(Instant::now() < deadline, "cannot initialize");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let leader = loop {
            if let Some(l) = nodes[0].0.metrics().borrow().current_leader {
                break l;
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let on_leader = &nodes
            .iter()
            .zip(names)
            .find(|(_, n)| node_id(n) == leader)
            .unwrap()
            .0
            .0;
        // One declaration, then an import-sized batch in one entry.
        on_leader
            .client_write(Proposal::from(vec![declare("q0")]))
            .await
            .unwrap();
        let batch: Vec<Command> = (1..=50).map(|i| declare(&format!("q{i}"))).collect();
        let written = on_leader.client_write(Proposal::from(batch)).await.unwrap();
        let expected: Vec<String> = {
            let mut v: Vec<String> = (0..=50).map(|i| format!("q{i}")).collect();
            v.sort();
            v
        };
        for (_, state, _) in &nodes {
            let mut applied = state.applied();
            tokio::time::timeout(
                Duration::from_secs(10),
                applied.wait_for(|i| *i >= written.log_id.index),
            )
            .await
            .expect("applied in time")
            .unwrap();
            assert_eq!(queues(&state.definitions()), expected);
        }
        for (raft, _, _) in &nodes {
            raft.shutdown().await.unwrap();
        }
        for s in stops {
            let _ = s.send(true);
        }
    }

    /// A network to no one, for a group of one.
    fn alone(dir: &Path) -> Network<MetaConfig> {
        let config = Config {
            data_dir: dir.to_path_buf(),
            cluster_secret: Some("s".into()),
            ..Config::default()
        };
        Network::new(Cluster::new(&config).unwrap(), METADATA_GROUP)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_definitions_survive_a_restart_after_the_log_was_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let name = "warren@solo";
        let timeout = Some(Duration::from_secs(10));
        {
            let (raft, state, _log) = start(dir.path(), name, alone(dir.path())).await;
            raft.initialize(BTreeMap::from([(node_id(name), node(name))]))
                .await
                .unwrap();
            raft.wait(timeout)
                .current_leader(node_id(name), "leader")
                .await
                .unwrap();
            let mut last = 0;
            for i in 0..5 {
                last = raft
                    .client_write(Proposal::from(vec![declare(&format!("q{i}"))]))
                    .await
                    .unwrap()
                    .log_id
                    .index;
            }
            raft.trigger().snapshot().await.unwrap();
            raft.wait(timeout)
                .snapshot(
                    openraft::testing::log_id(1, node_id(name), last),
                    "snapshot built",
                )
                .await
                .unwrap();
            raft.trigger().purge_log(last).await.unwrap();
            raft.wait(timeout)
                .purged(
                    Some(openraft::testing::log_id(1, node_id(name), last)),
                    "purged",
                )
                .await
                .unwrap();
            // One more after the snapshot: it comes back from the log.
            raft.client_write(Proposal::from(vec![Command::DeleteQueue {
                vhost: "/".into(),
                name: "q0".into(),
            }]))
            .await
            .unwrap();
            assert_eq!(queues(&state.definitions()), ["q1", "q2", "q3", "q4"]);
            raft.shutdown().await.unwrap();
        }
        // The snapshot on disk is a RabbitMQ definitions document, the group's state beside.
        let file = std::fs::read(dir.path().join("meta").join(SNAPSHOT_FILE)).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&file).unwrap();
        let names: Vec<&str> = doc["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["q0", "q1", "q2", "q3", "q4"]);
        assert_eq!(doc["queues"][0]["vhost"], "/");
        assert_eq!(doc["rabbit_version"], document::RABBITMQ_VERSION);
        assert!(doc[GROUP_KEY]["last_applied"]["index"].is_u64());
        let (raft, state, _log) = start(dir.path(), name, alone(dir.path())).await;
        raft.wait(timeout)
            .current_leader(node_id(name), "leader again")
            .await
            .unwrap();
        let mut applied = state.applied();
        let want = raft.metrics().borrow().last_log_index.unwrap_or(0);
        tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|i| *i >= want))
            .await
            .expect("replayed")
            .unwrap();
        assert_eq!(queues(&state.definitions()), ["q1", "q2", "q3", "q4"]);
        raft.shutdown().await.unwrap();
    }

    #[test]
    fn a_snapshot_of_an_earlier_version_is_read() {
        let mut applied = Applied::default();
        apply(&mut applied.definitions, &declare("kept"));
        applied.last = Some(openraft::testing::log_id(2, 1, 40));
        let meta = SnapshotMeta {
            last_log_id: applied.last,
            last_membership: applied.membership.clone(),
            snapshot_id: "40-1".into(),
        };
        let earlier =
            serde_json::to_vec(&serde_json::json!({"meta": meta, "applied": applied})).unwrap();
        let (read_meta, read) = decode(&earlier).unwrap();
        assert_eq!(read_meta, meta);
        assert_eq!(read.last, applied.last);
        assert_eq!(read.definitions, applied.definitions);
        // And the current format reads back the same.
        let (again_meta, again) = decode(&encode(&meta, &applied).unwrap()).unwrap();
        assert_eq!((again_meta, again.definitions), (meta, applied.definitions));
        assert!(decode(b"{\"queues\": []}").is_err());
    }
}
