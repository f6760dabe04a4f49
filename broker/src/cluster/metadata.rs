//! The metadata group at work: this node's member of the Raft group that holds the cluster's
//! definitions, how changes reach its leader, and how the group forms and grows.
//!
//! A change is proposed to the leader (this node, or the leader over the cluster links) and
//! answered once a majority has it and this node has applied it, so that a client that sees
//! its declaration done finds it on the node it asked. A node that cannot reach a majority
//! answers that it cannot make the change, after [`Metadata::commit`]'s wait.
//!
//! Forming: a node given no peers initializes a group of one at once. Nodes given peers wait
//! until every peer address is linked (or found to be the node itself); then the node with
//! the smallest name initializes the group with all of them, unless one of them already
//! belongs to a group. The leader adds every linked node that is not yet a member, first as
//! a learner (it catches up), then as a voter: this is how a new node joins a running
//! cluster.

use super::log_store::{LogStore, METADATA_GROUP, RaftLog, RaftLogOptions};
use super::meta_state::{ApplyHook, MetaConfig, MetaState, Proposal};
use super::raft_network::{Groups, Network, handler, node, node_id};
use super::rpc::{RpcError, Service};
use super::{Cluster, block_on};
use crate::store::Command;
use crate::store::definitions::{Definitions, DefinitionsError, MetaLog};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Raft, ServerState};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::runtime::{Handle, Runtime};

/// A proposal forwarded to the leader.
pub const PROPOSE: Service = 13;
/// The members of the metadata group a node belongs to (none: it belongs to none yet).
pub const MEMBER: Service = 14;

/// A node leaving the group (it stops for good or for a while), asking the leader to take it
/// out of the voters so that the others keep a majority without it.
pub const LEAVE: Service = 15;

/// How long a change waits for a majority before it is refused.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the group's forming and growth are looked at.
const TICK: Duration = Duration::from_millis(500);

/// This node's member of the metadata group. Clones share it.
#[derive(Clone)]
pub struct Metadata {
    inner: Arc<Inner>,
}

/// This process's proposals still of interest: a proposal's committer and the applier meet
/// here, under one lock, so that exactly one of them makes the change to the live objects.
#[derive(Default)]
struct Mine {
    /// Proposals whose committer is still waiting.
    waiting: HashSet<u64>,
    /// Waiting proposals that the applier passed over, leaving them to their committer.
    passed: HashSet<u64>,
    /// Proposals whose committer gave up (it made no change): the applier makes them if they
    /// are committed after all.
    abandoned: HashSet<u64>,
}

struct Inner {
    node: String,
    id: u64,
    raft: Raft<MetaConfig>,
    state: MetaState,
    cluster: Arc<Cluster>,
    rt: Handle,
    /// This process's mark on its proposals.
    origin: u64,
    next_id: AtomicU64,
    /// What became of this process's proposals, as the committer and the applier see them.
    mine: Mutex<Mine>,
    /// Nodes that left the group while still linked (draining before they stop): not added
    /// again until their link has gone and come back.
    departed: Arc<Mutex<HashSet<String>>>,
    /// The last entry of the log when it was opened: until it is applied, the definitions
    /// may lack what this node had committed before it stopped.
    last_at_open: u64,
    timeout: Duration,
    /// The runtime Raft and the cluster links run on (its own threads, so that callers
    /// waiting for a commit never hold up what the commit needs).
    runtime: Mutex<Option<Runtime>>,
    _log: RaftLog,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }
}

/// What a node knows of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub leader: Option<String>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// This node's part: leader, follower, candidate, learner.
    pub role: &'static str,
    pub term: u64,
    pub applied: u64,
}

fn raft_config(commit_timeout: Duration) -> openraft::Config {
    let heartbeat = (commit_timeout.as_millis() as u64 / 25).clamp(50, 250);
    openraft::Config {
        cluster_name: "warren-metadata".into(),
        heartbeat_interval: heartbeat,
        election_timeout_min: heartbeat * 4,
        election_timeout_max: heartbeat * 8,
        ..openraft::Config::default()
    }
}

impl Metadata {
    /// Opens this node's member of the metadata group, with its log and snapshot in `dir`,
    /// and replays what it had committed. Raft and the cluster's links run on a runtime of
    /// their own, made here.
    pub fn open(cluster: Arc<Cluster>, dir: &Path) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("warren-cluster")
            .enable_all()
            .build()?;
        let rt = runtime.handle().clone();
        let log = RaftLog::open(&dir.join("log"), RaftLogOptions::default())
            .map_err(std::io::Error::other)?;
        let state = MetaState::open(Some(&dir.join("state")))?;
        let node_name = cluster.node().to_owned();
        let id = node_id(&node_name);
        let config = raft_config(COMMIT_TIMEOUT)
            .validate()
            .map_err(std::io::Error::other)?;
        let (log2, state2, cluster2) = (log.clone(), state.clone(), cluster.clone());
        let (raft, last_at_open) = block_on(&rt, async move {
            use openraft::storage::RaftLogStorage;
            let mut store = LogStore::open(&log2, METADATA_GROUP)
                .await
                .map_err(std::io::Error::other)?;
            // Read from the log itself: Raft's metrics show it only once its task has run.
            let last = store
                .get_log_state()
                .await
                .map_err(std::io::Error::other)?
                .last_log_id
                .map(|l| l.index);
            let raft = Raft::new(
                id,
                Arc::new(config),
                Network::new(cluster2, METADATA_GROUP),
                store,
                state2,
            )
            .await
            .map_err(std::io::Error::other)?;
            // What the metrics say (the membership too) is what the log holds from here on.
            if last.is_some() {
                let _ = raft
                    .wait(Some(COMMIT_TIMEOUT))
                    .log_index_at_least(last, "the log loaded")
                    .await;
            }
            Ok::<_, std::io::Error>((raft, last.unwrap_or(0)))
        })
        .unwrap_or_else(|| Err(std::io::Error::other("the cluster's runtime stopped")))?;
        let groups = Groups::<MetaConfig>::serve(&cluster);
        groups.insert(METADATA_GROUP, raft.clone());
        let me = Self {
            inner: Arc::new(Inner {
                node: node_name,
                id,
                raft,
                state,
                cluster,
                rt,
                origin: rand::random::<u64>() | 1,
                next_id: AtomicU64::new(1),
                mine: Mutex::new(Mine::default()),
                departed: Arc::default(),
                last_at_open,
                timeout: COMMIT_TIMEOUT,
                runtime: Mutex::new(Some(runtime)),
                _log: log,
            }),
        };
        me.serve();
        Ok(me)
    }

    /// The runtime the cluster runs on.
    pub fn runtime(&self) -> &Handle {
        &self.inner.rt
    }

    /// Whether everything the log held when it was opened is applied (until then, the
    /// definitions may lack queues this node had).
    pub fn caught_up(&self) -> bool {
        self.inner.state.applied_index() >= self.inner.last_at_open
    }

    pub fn state(&self) -> &MetaState {
        &self.inner.state
    }

    /// Whether a proposal applied here was made by this process and already made to its live
    /// objects.
    pub fn made_here(&self, p: &Proposal) -> bool {
        if p.origin != self.inner.origin {
            return false;
        }
        let mut mine = self.inner.mine.lock();
        if mine.abandoned.remove(&p.id) {
            return false;
        }
        if mine.waiting.contains(&p.id) {
            mine.passed.insert(p.id);
        }
        true
    }

    /// Calls `f` with the definitions as applied, then `hook` with every entry applied after.
    pub fn follow<R>(&self, f: impl FnOnce(&Definitions, u64) -> R, hook: ApplyHook) -> R {
        self.inner.state.follow(f, hook)
    }

    fn serve(&self) {
        let raft = self.inner.raft.clone();
        self.inner.cluster.handle(
            PROPOSE,
            handler(move |p: Proposal| {
                let raft = raft.clone();
                async move {
                    match tokio::time::timeout(COMMIT_TIMEOUT, raft.client_write(p)).await {
                        Ok(Ok(written)) => Ok(written.log_id.index),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                            Err(NOT_LEADER.to_owned())
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(NO_MAJORITY.to_owned()),
                    }
                }
            }),
        );
        let (raft, departed) = (self.inner.raft.clone(), self.inner.departed.clone());
        self.inner.cluster.handle(
            LEAVE,
            handler(move |node: String| {
                let (raft, departed) = (raft.clone(), departed.clone());
                async move { remove_member(&raft, &departed, &node).await }
            }),
        );
        let raft = self.inner.raft.clone();
        self.inner.cluster.handle(
            MEMBER,
            handler(move |(): ()| {
                let members = members_of(&raft);
                async move { Ok(members) }
            }),
        );
    }

    /// For a node given no peers whose group has no members yet (a new single node): forms
    /// a group of itself, and waits until it leads it. Returns whether it did. A group of
    /// one that restarts is led again at once, without waiting for an election timeout.
    pub fn form_alone_if_first(&self) -> bool {
        let alone = self.inner.cluster.has_no_peers();
        let formed = alone && !self.inner.state.has_membership();
        let me = self.clone();
        block_on(&self.inner.rt, async move {
            let raft = &me.inner.raft;
            if formed {
                let members = BTreeMap::from([(me.inner.id, node(&me.inner.node))]);
                if let Err(e) = raft.initialize(members).await {
                    tracing::warn!(error = %e, "cannot form a cluster of one");
                }
            }
            let sole = {
                let m = raft.metrics().borrow().clone();
                m.membership_config
                    .membership()
                    .voter_ids()
                    .eq([me.inner.id])
            };
            if sole {
                let _ = raft.trigger().elect().await;
                let _ = raft
                    .wait(Some(COMMIT_TIMEOUT))
                    .current_leader(me.inner.id, "this node leads its cluster of one")
                    .await;
                // Leading, it commits what its log holds: applied before the broker is made.
                let _ = raft
                    .wait(Some(COMMIT_TIMEOUT))
                    .applied_index_at_least(Some(me.inner.last_at_open), "the log applied")
                    .await;
            }
        });
        formed
    }

    /// Starts forming the group (or joining it) and, as leader, adding the nodes that link.
    pub fn start(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        self.inner
            .rt
            .spawn(async move { me.keep_membership(stop).await });
    }

    async fn keep_membership(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        let mut cut_off = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            // Said once each way: a node cut off from the majority refuses changes.
            let now_cut_off = self.inner.state.has_membership() && !self.majority_reachable();
            if now_cut_off != cut_off {
                cut_off = now_cut_off;
                if cut_off {
                    tracing::warn!(
                        unreachable = ?self.unreachable_voters(),
                        "cut off from the majority of the cluster: metadata changes (declarations, users, policies) are refused until it is reachable again"
                    );
                } else {
                    tracing::info!("the majority of the cluster is reachable again");
                }
            }
            if !self.inner.state.has_membership() {
                self.try_to_form().await;
            } else if self.is_leader() {
                self.add_linked().await;
            }
        }
    }

    /// Takes this node out of the group's voters (through the leader), so that the others
    /// keep a majority while it is gone; it is added again when it links after a restart.
    /// A group of one keeps its only member.
    pub async fn leave(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.inner.timeout;
        let me = self.inner.node.clone();
        loop {
            let leader = self.inner.raft.metrics().borrow().current_leader;
            let result = match leader {
                Some(id) if id == self.inner.id => {
                    remove_member(&self.inner.raft, &self.inner.departed, &me).await
                }
                Some(id) => match self.name_of(id) {
                    Some(name) => {
                        let body = serde_json::to_vec(&me).map_err(|e| e.to_string())?;
                        let left = deadline.saturating_duration_since(Instant::now());
                        match self.inner.cluster.call(&name, LEAVE, &body, left).await {
                            Ok(_) => Ok(()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    None => Err(NO_LEADER.to_owned()),
                },
                None => Err(NO_LEADER.to_owned()),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The name of the member with Raft id `id`, if known.
    fn name_of(&self, id: u64) -> Option<String> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Whether a leader of the group is known here.
    /// The voters of the group this node cannot reach now (their link is down).
    pub fn unreachable_voters(&self) -> Vec<String> {
        self.unreachable_of(self.status().voters)
    }

    fn unreachable_of(&self, voters: Vec<String>) -> Vec<String> {
        let linked = self.inner.cluster.linked();
        voters
            .into_iter()
            .filter(|v| *v != self.inner.node && !linked.contains(v))
            .collect()
    }

    /// The group's voters and how many of them this node reaches (itself included).
    pub fn reach(&self) -> (usize, usize) {
        let voters = self.status().voters;
        let count = voters.len();
        (count, count - self.unreachable_of(voters).len())
    }

    /// Whether this node reaches a majority of the group's voters (itself included): what a
    /// change needs.
    pub fn majority_reachable(&self) -> bool {
        let (voters, reached) = self.reach();
        voters == 0 || reached * 2 > voters
    }

    pub fn has_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader.is_some()
    }

    fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader == Some(self.inner.id)
    }

    /// Initializes the group when this node is the one to.
    async fn try_to_form(&self) {
        let cluster = &self.inner.cluster;
        let Some(linked) = cluster.linked_peers_if_settled() else {
            return;
        };
        if linked.iter().any(|n| *n < self.inner.node) {
            return;
        }
        for peer in &linked {
            match self.members_of_peer(peer).await {
                Some(members) if members.is_empty() => {}
                // A member already (this node joins when its leader adds it), or no answer.
                _ => return,
            }
        }
        let members: BTreeMap<u64, openraft::BasicNode> = std::iter::once(&self.inner.node)
            .chain(&linked)
            .map(|n| (node_id(n), node(n)))
            .collect();
        match self.inner.raft.initialize(members).await {
            Ok(()) => tracing::info!(
                members = ?std::iter::once(&self.inner.node).chain(&linked).collect::<Vec<_>>(),
                "metadata group formed"
            ),
            Err(e) => tracing::debug!(error = %e, "cannot form the metadata group yet"),
        }
    }

    /// As leader: adds every linked node that is not a member, as a learner, then a voter.
    async fn add_linked(&self) {
        let linked = self.inner.cluster.linked();
        // A departed node that went away may come back as a member.
        self.inner.departed.lock().retain(|n| linked.contains(n));
        let membership = self.inner.raft.metrics().borrow().membership_config.clone();
        let config = membership.membership();
        let voters: BTreeSet<u64> = config.voter_ids().collect();
        let known: BTreeSet<u64> = config.nodes().map(|(id, _)| *id).collect();
        for peer in linked {
            let id = node_id(&peer);
            if known.contains(&id) || self.inner.departed.lock().contains(&peer) {
                continue;
            }
            match self.members_of_peer(&peer).await {
                Some(members) if members.is_empty() || members.contains(&self.inner.node) => {}
                Some(members) => {
                    tracing::warn!(node = %peer, its_members = ?members, "a linked node belongs to another cluster's metadata group and is not added; reset its data directory to join this cluster");
                    continue;
                }
                None => continue,
            }
            tracing::info!(node = %peer, "adding a node to the metadata group");
            if let Err(e) = self.inner.raft.add_learner(id, node(&peer), true).await {
                tracing::warn!(node = %peer, error = %e, "cannot add a node to the metadata group");
                return;
            }
        }
        let membership = self.inner.raft.metrics().borrow().membership_config.clone();
        let learners: Vec<u64> = membership.membership().learner_ids().collect();
        if learners.is_empty() {
            return;
        }
        let mut wanted = voters;
        wanted.extend(learners);
        if let Err(e) = self.inner.raft.change_membership(wanted, true).await {
            tracing::warn!(error = %e, "cannot make the new nodes voters");
        }
    }

    /// The members of the group `peer` belongs to (empty: none), if it answers.
    async fn members_of_peer(&self, peer: &str) -> Option<Vec<String>> {
        let answer = self
            .inner
            .cluster
            .call(peer, MEMBER, b"null", Duration::from_secs(2))
            .await
            .ok()?;
        serde_json::from_slice(&answer).ok()
    }

    /// What this node knows of the group.
    pub fn status(&self) -> GroupStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let name = |id: u64| {
            m.membership_config
                .membership()
                .get_node(&id)
                .map_or_else(|| id.to_string(), |n| n.addr.clone())
        };
        let config = m.membership_config.membership();
        GroupStatus {
            leader: m.current_leader.map(name),
            voters: config.voter_ids().map(name).collect(),
            learners: config.learner_ids().map(name).collect(),
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "stopped",
            },
            term: m.current_term,
            applied: m.last_applied.map_or(0, |l| l.index),
        }
    }

    /// Proposes `proposal` to the leader, wherever it is, until `deadline`; the index of its
    /// entry once committed.
    async fn propose(&self, proposal: Proposal, deadline: Instant) -> Result<u64, String> {
        let body = serde_json::to_vec(&proposal).map_err(|e| e.to_string())?;
        let mut last = NO_LEADER;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last.to_owned());
            }
            let leader = self.inner.raft.metrics().borrow().current_leader;
            match leader {
                Some(id) if id == self.inner.id => {
                    match tokio::time::timeout(left, self.inner.raft.client_write(proposal.clone()))
                        .await
                    {
                        Ok(Ok(written)) => return Ok(written.log_id.index),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
                        Ok(Err(e)) => return Err(e.to_string()),
                        Err(_) => return Err(NO_MAJORITY.to_owned()),
                    }
                }
                Some(id) => {
                    let name = self
                        .inner
                        .raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(&id)
                        .map(|n| n.addr.clone());
                    if let Some(name) = name {
                        match self.inner.cluster.call(&name, PROPOSE, &body, left).await {
                            Ok(answer) => {
                                return serde_json::from_slice(&answer)
                                    .map_err(|e| format!("malformed answer from {name}: {e}"));
                            }
                            Err(RpcError::Failed { reason, .. }) if reason == NOT_LEADER => {}
                            Err(RpcError::Failed { reason, .. }) => return Err(reason),
                            Err(RpcError::TimedOut(_)) => return Err(NO_MAJORITY.to_owned()),
                            Err(_) => last = NO_MAJORITY,
                        }
                    }
                }
                None => {
                    if !self.inner.state.has_membership() {
                        last = FORMING;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50).min(left)).await;
        }
    }
}

const NOT_LEADER: &str = "not the leader";
const NO_MAJORITY: &str = "no majority of the cluster is reachable";
const NO_LEADER: &str = "no leader of the cluster's metadata is known";
const STOPPING: &str = "the node is stopping";
const FORMING: &str = "the cluster is still forming (not every peer is reachable yet)";

/// As leader: takes `node` out of the group, unless it is the only voter.
async fn remove_member(
    raft: &Raft<MetaConfig>,
    departed: &Mutex<HashSet<String>>,
    node: &str,
) -> Result<(), String> {
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return Err(NOT_LEADER.to_owned());
    }
    departed.lock().insert(node.to_owned());
    let id = node_id(node);
    let config = m.membership_config.membership();
    let voters: BTreeSet<u64> = config.voter_ids().collect();
    if !config.nodes().any(|(n, _)| *n == id) {
        return Ok(());
    }
    if voters.len() == 1 && voters.contains(&id) {
        return Ok(());
    }
    let rest: BTreeSet<u64> = voters.into_iter().filter(|v| *v != id).collect();
    match tokio::time::timeout(COMMIT_TIMEOUT, raft.change_membership(rest, false)).await {
        Ok(Ok(_)) => {
            tracing::info!(node, "a node left the metadata group");
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(NO_MAJORITY.to_owned()),
    }
}

/// The names of the members (voters and learners) of `raft`'s group, as it knows them.
fn members_of(raft: &Raft<MetaConfig>) -> Vec<String> {
    let m = raft.metrics().borrow().membership_config.clone();
    m.membership()
        .nodes()
        .map(|(_, n)| n.addr.clone())
        .collect()
}

impl MetaLog for Metadata {
    fn commit(&self, commands: Vec<Command>) -> Result<(), DefinitionsError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let proposal = Proposal {
            origin: self.inner.origin,
            id,
            commands,
        };
        let deadline = Instant::now() + self.inner.timeout;
        self.inner.mine.lock().waiting.insert(id);
        let me = self.clone();
        let done = block_on(&self.inner.rt, async move {
            let index = me.propose(proposal, deadline).await?;
            let mut applied = me.inner.state.applied();
            let seen = tokio::time::timeout_at(deadline.into(), applied.wait_for(|i| *i >= index));
            match seen.await {
                Ok(Ok(_)) => Ok(()),
                _ => Err(NO_MAJORITY.to_owned()),
            }
        });
        let done = done.unwrap_or_else(|| Err(STOPPING.to_owned()));
        let mut mine = self.inner.mine.lock();
        mine.waiting.remove(&id);
        let passed = mine.passed.remove(&id);
        match done {
            Ok(()) => Ok(()),
            // Committed and passed over by the applier while this gave up: it is done, and
            // the caller makes the change as for any commit.
            Err(_) if passed => Ok(()),
            Err(reason) => {
                mine.abandoned.insert(id);
                Err(DefinitionsError::Unavailable(reason))
            }
        }
    }

    fn definitions(&self) -> Definitions {
        self.inner.state.definitions()
    }

    fn node(&self) -> &str {
        &self.inner.node
    }
}
