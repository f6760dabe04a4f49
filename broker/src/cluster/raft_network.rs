//! Raft's messages between nodes (openraft's `RaftNetwork`), carried as cluster requests.
//!
//! A node's Raft id is derived from its node name, and its Raft address is that name: the
//! links already know every node by name. Each request names its group, so every group of a
//! node (the metadata group, and later one per quorum queue) shares the node's links and the
//! three services registered here. The receiving node hands the request to its Raft for that
//! group and sends back Raft's own answer, or its error, as JSON.

use super::Cluster;
use super::log_store::GroupId;
use super::rpc::{self, RpcError, Service};
use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft, RaftTypeConfig};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

/// The services Raft's messages use.
pub const APPEND_ENTRIES: Service = 10;
pub const VOTE: Service = 11;
pub const INSTALL_SNAPSHOT: Service = 12;

/// The Raft id of the node named `name`: the same on every node, from the name alone.
pub fn node_id(name: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("eight bytes"))
}

/// The Raft node of the node named `name`.
pub fn node(name: &str) -> BasicNode {
    BasicNode::new(name)
}

/// The Raft groups this node takes part in, by group id, for the requests that reach it.
pub struct Groups<C: RaftTypeConfig> {
    rafts: RwLock<HashMap<GroupId, Raft<C>>>,
}

impl<C: RaftTypeConfig> std::fmt::Debug for Groups<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<GroupId> = self.rafts.read().keys().copied().collect();
        f.debug_struct("Groups").field("groups", &groups).finish()
    }
}

/// A request for one group.
#[derive(Serialize, serde::Deserialize)]
struct ForGroup<T> {
    group: GroupId,
    rpc: T,
}

impl<C> Groups<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, SnapshotData = std::io::Cursor<Vec<u8>>>,
{
    /// Serves Raft's requests for this node's groups, arriving over `cluster`.
    pub fn serve(cluster: &Cluster) -> Arc<Self> {
        let groups = Arc::new(Self {
            rafts: RwLock::new(HashMap::new()),
        });
        let g = groups.clone();
        cluster.handle(
            APPEND_ENTRIES,
            handler(move |req: ForGroup<AppendEntriesRequest<C>>| {
                let raft = g.raft(req.group);
                async move { Ok(raft?.append_entries(req.rpc).await) }
            }),
        );
        let g = groups.clone();
        cluster.handle(
            VOTE,
            handler(move |req: ForGroup<VoteRequest<u64>>| {
                let raft = g.raft(req.group);
                async move { Ok(raft?.vote(req.rpc).await) }
            }),
        );
        let g = groups.clone();
        cluster.handle(
            INSTALL_SNAPSHOT,
            handler(move |req: ForGroup<InstallSnapshotRequest<C>>| {
                let raft = g.raft(req.group);
                async move { Ok(raft?.install_snapshot(req.rpc).await) }
            }),
        );
        groups
    }

    /// Makes `raft` the one that answers for `group` here.
    pub fn insert(&self, group: GroupId, raft: Raft<C>) {
        self.rafts.write().insert(group, raft);
    }

    pub fn remove(&self, group: GroupId) -> Option<Raft<C>> {
        self.rafts.write().remove(&group)
    }

    fn raft(&self, group: GroupId) -> Result<Raft<C>, String> {
        self.rafts
            .read()
            .get(&group)
            .cloned()
            .ok_or_else(|| format!("no Raft group {group} on this node"))
    }
}

/// A request handler from a function of the decoded request to the answer to encode.
pub(crate) fn handler<Req, Resp, F, Fut>(f: F) -> rpc::Handler
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Resp, String>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |_from: String, body: Bytes| {
        let f = f.clone();
        Box::pin(async move {
            let req: Req =
                serde_json::from_slice(&body).map_err(|e| format!("malformed request: {e}"))?;
            let resp = f(req).await?;
            serde_json::to_vec(&resp)
                .map(Bytes::from)
                .map_err(|e| format!("cannot encode the answer: {e}"))
        })
    })
}

/// Raft's messages for one group, sent over `cluster`.
#[derive(Debug)]
pub struct Network<C> {
    cluster: Arc<Cluster>,
    group: GroupId,
    _config: PhantomData<fn() -> C>,
}

impl<C> Network<C> {
    pub fn new(cluster: Arc<Cluster>, group: GroupId) -> Self {
        Self {
            cluster,
            group,
            _config: PhantomData,
        }
    }
}

impl<C> RaftNetworkFactory<C> for Network<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, SnapshotData = std::io::Cursor<Vec<u8>>>,
{
    type Network = Peer<C>;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer<C> {
        Peer {
            cluster: self.cluster.clone(),
            group: self.group,
            target,
            node: node.clone(),
            _config: PhantomData,
        }
    }
}

/// Raft's messages to one node.
#[derive(Debug)]
pub struct Peer<C> {
    cluster: Arc<Cluster>,
    group: GroupId,
    target: u64,
    node: BasicNode,
    _config: PhantomData<fn() -> C>,
}

impl<C> Peer<C> {
    /// Sends `rpc` for `service` and decodes Raft's answer; the other node's Raft error comes
    /// back as a remote error, a missing or failed link as unreachable.
    /// `entries`: how many log entries `rpc` carries; a request too large for a link is
    /// then answered with a hint to send half as many.
    async fn send<Req, Resp, E>(
        &self,
        service: Service,
        rpc: Req,
        entries: u64,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(&ForGroup {
            group: self.group,
            rpc,
        })
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = self
            .cluster
            .call(&self.node.addr, service, &body, option.hard_ttl())
            .await
            .map_err(|e| rpc_error(e, entries))?;
        let result: Result<Resp, E> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

/// What openraft is told of a request that got no answer: an unreachable node is backed off
/// from before the next try; a slow answer (a follower's sync) or a refusal is tried again at
/// once; a request of `entries` log entries too large for a link is sent again with half as
/// many.
fn rpc_error<E: std::error::Error>(e: RpcError, entries: u64) -> RPCError<u64, BasicNode, E> {
    match e {
        RpcError::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&e)),
        RpcError::TooLarge(_) if entries > 1 => RPCError::PayloadTooLarge(
            openraft::error::PayloadTooLarge::new_entries_hint(entries / 2),
        ),
        RpcError::TimedOut(_) | RpcError::Failed { .. } | RpcError::TooLarge(_) => {
            RPCError::Network(NetworkError::new(&e))
        }
    }
}

impl<C> RaftNetwork<C> for Peer<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, SnapshotData = std::io::Cursor<Vec<u8>>>,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let entries = rpc.entries.len() as u64;
        self.send(APPEND_ENTRIES, rpc, entries, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.send(INSTALL_SNAPSHOT, rpc, 0, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.send(VOTE, rpc, 0, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::log_store::tests::{StateMachine, TestConfig};
    use crate::cluster::log_store::{LogStore, METADATA_GROUP, RaftLog, RaftLogOptions};
    use crate::config::Config;
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    /// One node of a test cluster: its links, its Raft for the metadata group, what it applied.
    struct TestNode {
        name: String,
        raft: Raft<TestConfig>,
        applied: StateMachine,
        stop: watch::Sender<bool>,
        _log: RaftLog,
    }

    async fn cluster_of(names: &[&str], dir: &std::path::Path) -> Vec<TestNode> {
        let mut listeners = Vec::new();
        for _ in names {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let raft_config = Arc::new(
            openraft::Config {
                heartbeat_interval: 100,
                election_timeout_min: 300,
                election_timeout_max: 600,
                ..openraft::Config::default()
            }
            .validate()
            .unwrap(),
        );
        let mut nodes = Vec::new();
        for (name, listener) in names.iter().zip(listeners) {
            let config = Config {
                data_dir: dir.join(name),
                node_name: (*name).into(),
                cluster_secret: Some("s".into()),
                peers: peers.clone(),
                ..Config::default()
            };
            let cluster = Cluster::new(&config).unwrap();
            let (stop, stopped) = watch::channel(false);
            cluster.start(listener, stopped);
            let groups = Groups::<TestConfig>::serve(&cluster);
            let log =
                RaftLog::open(&dir.join(name).join("raft"), RaftLogOptions::default()).unwrap();
            let store = LogStore::open(&log, METADATA_GROUP).await.unwrap();
            let applied = StateMachine::default();
            let raft = Raft::new(
                node_id(name),
                raft_config.clone(),
                Network::new(cluster.clone(), METADATA_GROUP),
                store,
                applied.clone(),
            )
            .await
            .unwrap();
            groups.insert(METADATA_GROUP, raft.clone());
            nodes.push(TestNode {
                name: (*name).into(),
                raft,
                applied,
                stop,
                _log: log,
            });
        }
        nodes
    }

    async fn leader_among(nodes: &[&TestNode], within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let ids: BTreeSet<u64> = nodes.iter().map(|n| node_id(&n.name)).collect();
            for n in nodes {
                if let Some(l) = n.raft.metrics().borrow().current_leader
                    && ids.contains(&l)
                {
                    return l;
                }
            }
            assert!(Instant::now() < deadline, "no leader elected in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn until_applied(nodes: &[&TestNode], expected: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let seen: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| n.applied.0.lock().unwrap().applied.data.clone())
                .collect();
            if seen.iter().all(|s| s == expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "applied {seen:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_replicate_over_their_links_and_elect_a_new_leader_when_one_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = cluster_of(&["warren@a", "warren@b", "warren@c"], dir.path()).await;
        let members: BTreeMap<u64, BasicNode> = nodes
            .iter()
            .map(|n| (node_id(&n.name), node(&n.name)))
            .collect();
        // The links come up within the dial interval; initializing retries until they do.
        let deadline = Instant::now() + Duration::from_secs(10);
        while nodes[0].raft.initialize(members.clone()).await.is_err() {
            assert!(Instant::now() < deadline, "cannot initialize");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all: Vec<&TestNode> = nodes.iter().collect();
        let leader = leader_among(&all, Duration::from_secs(10)).await;
        let on = |id: u64| nodes.iter().find(|n| node_id(&n.name) == id).unwrap();
        for d in ["vhost /", "queue q1"] {
            on(leader).raft.client_write(d.to_owned()).await.unwrap();
        }
        until_applied(&all, &["vhost /", "queue q1"], Duration::from_secs(10)).await;

        // The leader goes (links and Raft), as a SIGKILL takes both: the other two elect a
        // new leader and go on, with nothing committed lost.
        let gone = on(leader);
        gone.stop.send(true).unwrap();
        gone.raft.shutdown().await.unwrap();
        let rest: Vec<&TestNode> = nodes.iter().filter(|n| n.name != gone.name).collect();
        let killed = Instant::now();
        let next = leader_among(&rest, Duration::from_secs(15)).await;
        assert_ne!(next, leader);
        let elected_in = killed.elapsed();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match on(next).raft.client_write("queue q2".to_owned()).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no write after failover: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        until_applied(
            &rest,
            &["vhost /", "queue q1", "queue q2"],
            Duration::from_secs(10),
        )
        .await;
        eprintln!("new leader after {elected_in:?}");
        for n in rest {
            n.raft.shutdown().await.unwrap();
            let _ = n.stop.send(true);
        }
    }

    #[test]
    fn openraft_backs_off_only_from_unreachable_nodes_and_sends_fewer_entries_when_too_large() {
        let e = |err: RpcError, entries| rpc_error::<RaftError<u64>>(err, entries);
        assert!(matches!(
            e(RpcError::Unreachable("b".into()), 5),
            RPCError::Unreachable(_)
        ));
        assert!(matches!(
            e(RpcError::TimedOut("b".into()), 5),
            RPCError::Network(_)
        ));
        assert!(matches!(
            e(
                RpcError::Failed {
                    node: "b".into(),
                    reason: "x".into()
                },
                5
            ),
            RPCError::Network(_)
        ));
        match e(RpcError::TooLarge(1 << 30), 100) {
            RPCError::PayloadTooLarge(p) => assert_eq!(p.entries_hint(), 50),
            other => panic!("{other:?}"),
        }
        // One entry cannot be split: a plain failure.
        assert!(matches!(
            e(RpcError::TooLarge(1 << 30), 1),
            RPCError::Network(_)
        ));
    }

    #[test]
    fn node_ids_come_from_names_alone() {
        assert_eq!(node_id("warren@a"), node_id("warren@a"));
        assert_ne!(node_id("warren@a"), node_id("warren@b"));
    }
}
