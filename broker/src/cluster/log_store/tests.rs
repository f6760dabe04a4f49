//! Tests of the Raft log: openraft's own storage suite against [`LogStore`] (with a small
//! in-memory state machine), and what the suite cannot see: reopening, torn and damaged
//! files, segment deletion and group commit.

use super::segment::{self, Kind};
use super::*;
use openraft::storage::{
    RaftLogReaderExt, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine, Snapshot,
    SnapshotMeta,
};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, Entry, EntryPayload, StoredMembership};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

openraft::declare_raft_types!(
    /// Entries carry strings; everything else is openraft's default.
    TestConfig: D = String, R = String
);

type Store = LogStore<TestConfig>;

fn log_id(term: u64, index: u64) -> LogId<u64> {
    openraft::testing::log_id(term, 0, index)
}

fn entry(term: u64, index: u64, data: &str) -> Entry<TestConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(data.to_string()),
    }
}

/// The state machine's contents, also its snapshot format.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Applied {
    last: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    data: Vec<String>,
}

#[derive(Debug, Default)]
struct Machine {
    applied: Applied,
    snapshot: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    snapshots_built: u64,
}

/// An in-memory state machine: just enough for the storage suite.
#[derive(Debug, Default, Clone)]
struct StateMachine(Arc<Mutex<Machine>>);

fn snapshot_of(meta: &SnapshotMeta<u64, BasicNode>, data: &[u8]) -> Snapshot<TestConfig> {
    Snapshot {
        meta: meta.clone(),
        snapshot: Box::new(Cursor::new(data.to_vec())),
    }
}

impl RaftSnapshotBuilder<TestConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TestConfig>, StorageError<u64>> {
        let mut m = self.0.lock().unwrap();
        m.snapshots_built += 1;
        let data = serde_json::to_vec(&m.applied).expect("serializable");
        let meta = SnapshotMeta {
            last_log_id: m.applied.last,
            last_membership: m.applied.membership.clone(),
            snapshot_id: format!("snapshot-{}", m.snapshots_built),
        };
        m.snapshot = Some((meta.clone(), data.clone()));
        Ok(snapshot_of(&meta, &data))
    }
}

impl RaftStateMachine<TestConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let m = self.0.lock().unwrap();
        Ok((m.applied.last, m.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<String>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TestConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut m = self.0.lock().unwrap();
        let mut replies = Vec::new();
        for e in entries {
            m.applied.last = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(d) => m.applied.data.push(d),
                EntryPayload::Membership(mem) => {
                    m.applied.membership = StoredMembership::new(Some(e.log_id), mem)
                }
            }
            replies.push(String::new());
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
        let data = snapshot.into_inner();
        let applied: Applied = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?;
        let mut m = self.0.lock().unwrap();
        m.applied = applied;
        m.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TestConfig>>, StorageError<u64>> {
        let m = self.0.lock().unwrap();
        Ok(m.snapshot
            .as_ref()
            .map(|(meta, data)| snapshot_of(meta, data)))
    }
}

struct Builder;

impl StoreBuilder<TestConfig, Store, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, Store, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = RaftLog::open(dir.path(), RaftLogOptions::default())
            .map_err(|e| StorageIOError::<u64>::read_logs(AnyError::new(&e)))?;
        let store = Store::open(&log, METADATA_GROUP)
            .await
            .map_err(|e| StorageIOError::<u64>::read_logs(AnyError::new(&e)))?;
        Ok((dir, store, StateMachine::default()))
    }
}

#[test]
fn passes_openraft_storage_suite() {
    Suite::test_all(Builder).expect("suite passes");
}

fn open(dir: &Path, options: RaftLogOptions) -> RaftLog {
    RaftLog::open(dir, options).expect("log opens")
}

async fn store(log: &RaftLog, group: GroupId) -> Store {
    Store::open(log, group).await.expect("group opens")
}

async fn entries(store: &mut Store, range: std::ops::Range<u64>) -> Vec<(LogId<u64>, String)> {
    store
        .try_get_log_entries(range)
        .await
        .expect("entries read")
        .into_iter()
        .map(|e| {
            let data = match e.payload {
                EntryPayload::Normal(d) => d,
                _ => String::new(),
            };
            (e.log_id, data)
        })
        .collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    segment::list(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

#[tokio::test]
async fn vote_entries_truncation_and_purge_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), RaftLogOptions::default());
        let mut s = store(&log, METADATA_GROUP).await;
        s.save_vote(&Vote::new(3, 1)).await.unwrap();
        s.blocking_append((1..=5).map(|i| entry(1, i, &format!("a{i}"))))
            .await
            .unwrap();
        s.blocking_append((6..=10).map(|i| entry(1, i, &format!("a{i}"))))
            .await
            .unwrap();
        // A new leader overwrote 8.. and the log was compacted up to 3.
        s.truncate(log_id(1, 8)).await.unwrap();
        assert_eq!(
            s.get_log_state().await.unwrap().last_log_id,
            Some(log_id(1, 7))
        );
        s.blocking_append((8..=12).map(|i| entry(2, i, &format!("b{i}"))))
            .await
            .unwrap();
        s.purge(log_id(1, 3)).await.unwrap();
        s.save_committed(Some(log_id(2, 9))).await.unwrap();
        // A second group shares the log without mixing its entries in.
        let mut other = store(&log, 7).await;
        other.blocking_append([entry(5, 1, "other")]).await.unwrap();
    }
    let log = open(dir.path(), RaftLogOptions::default());
    let mut s = store(&log, METADATA_GROUP).await;
    assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    assert_eq!(s.read_committed().await.unwrap(), Some(log_id(2, 9)));
    let state = s.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(2, 12)));
    let got = entries(&mut s, 0..100).await;
    let want: Vec<_> = (4..=7)
        .map(|i| (log_id(1, i), format!("a{i}")))
        .chain((8..=12).map(|i| (log_id(2, i), format!("b{i}"))))
        .collect();
    assert_eq!(got, want);
    let mut other = store(&log, 7).await;
    assert_eq!(
        entries(&mut other, 0..100).await,
        vec![(log_id(5, 1), "other".to_string())]
    );
    // Appends go on after a reopen, and survive the next one.
    s.blocking_append([entry(2, 13, "b13")]).await.unwrap();
    drop((s, other, log));
    let log = open(dir.path(), RaftLogOptions::default());
    let mut s = store(&log, METADATA_GROUP).await;
    assert_eq!(
        s.get_log_state().await.unwrap().last_log_id,
        Some(log_id(2, 13))
    );
    assert_eq!(entries(&mut s, 12..14).await.len(), 2);
}

#[tokio::test]
async fn a_group_has_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), RaftLogOptions::default());
    let s = store(&log, 1).await;
    assert!(matches!(
        Store::open(&log, 1).await,
        Err(RaftLogError::GroupInUse(1))
    ));
    drop(s);
    store(&log, 1).await;
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), RaftLogOptions::default());
        let mut s = store(&log, METADATA_GROUP).await;
        for i in 1..=5 {
            s.blocking_append([entry(1, i, &format!("e{i}"))])
                .await
                .unwrap();
        }
    }
    let files = segments(dir.path());
    assert_eq!(files.len(), 1);
    let len = std::fs::metadata(&files[0]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    {
        let log = open(dir.path(), RaftLogOptions::default());
        let mut s = store(&log, METADATA_GROUP).await;
        assert_eq!(
            s.get_log_state().await.unwrap().last_log_id,
            Some(log_id(1, 4))
        );
        let want: Vec<_> = (1..=4).map(|i| (log_id(1, i), format!("e{i}"))).collect();
        assert_eq!(entries(&mut s, 0..100).await, want);
        s.blocking_append([entry(2, 5, "again")]).await.unwrap();
    }
    let log = open(dir.path(), RaftLogOptions::default());
    let mut s = store(&log, METADATA_GROUP).await;
    let got = entries(&mut s, 0..100).await;
    assert_eq!(got.len(), 5);
    assert_eq!(got[4], (log_id(2, 5), "again".to_string()));
}

#[tokio::test]
async fn zeros_after_the_last_record_are_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), RaftLogOptions::default());
        let mut s = store(&log, METADATA_GROUP).await;
        s.blocking_append((1..=3).map(|i| entry(1, i, "x")))
            .await
            .unwrap();
    }
    let file = &segments(dir.path())[0];
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len + 5000)
        .unwrap();
    let log = open(dir.path(), RaftLogOptions::default());
    let mut s = store(&log, METADATA_GROUP).await;
    assert_eq!(entries(&mut s, 0..100).await.len(), 3);
    assert_eq!(std::fs::metadata(file).unwrap().len(), len);
}

/// Offsets of the entry records in a segment.
fn entry_offsets(file: &Path) -> Vec<u64> {
    let mut offsets = Vec::new();
    let end = segment::scan(file, |r, offset, _| {
        if r.kind == Kind::Entry {
            offsets.push(offset);
        }
    })
    .unwrap()
    .unwrap();
    assert_eq!(end, segment::ScanEnd::Clean);
    offsets
}

#[tokio::test]
async fn a_damaged_record_in_the_middle_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), RaftLogOptions::default());
        let mut s = store(&log, METADATA_GROUP).await;
        for i in 1..=5 {
            s.blocking_append([entry(1, i, "some data to flip a byte in")])
                .await
                .unwrap();
        }
    }
    let file = segments(dir.path())[0].clone();
    let good = std::fs::read(&file).unwrap();
    let third = entry_offsets(&file)[2] as usize;
    // A flipped bit in the body, then in the length field (which no longer says where the
    // next record is): either way the good records after it show it is no torn tail.
    for at in [third + 30, third + 6] {
        let mut bytes = good.clone();
        bytes[at] ^= 0x55;
        std::fs::write(&file, &bytes).unwrap();
        let err = RaftLog::open(dir.path(), RaftLogOptions::default()).unwrap_err();
        assert!(
            matches!(err, RaftLogError::Damaged { offset, .. } if offset == third as u64),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains(&*file.to_string_lossy()), "{message}");
        // Nothing was cut: the file is as it was found.
        assert_eq!(std::fs::read(&file).unwrap(), bytes);
    }
}

#[tokio::test]
async fn a_torn_last_header_is_cut_too() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), RaftLogOptions::default());
        let mut s = store(&log, METADATA_GROUP).await;
        for i in 1..=3 {
            s.blocking_append([entry(1, i, "x")]).await.unwrap();
        }
    }
    let file = segments(dir.path())[0].clone();
    let last = entry_offsets(&file)[2];
    // Only 5 bytes of the last record's header reached the disk.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(last + 5)
        .unwrap();
    let log = open(dir.path(), RaftLogOptions::default());
    let mut s = store(&log, METADATA_GROUP).await;
    assert_eq!(entries(&mut s, 0..10).await.len(), 2);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), last);
}

#[tokio::test]
async fn purged_segments_are_deleted_and_the_state_outlives_them() {
    let dir = tempfile::tempdir().unwrap();
    let small = RaftLogOptions {
        segment_bytes: 1024,
        cache_bytes: 512,
    };
    {
        let log = open(dir.path(), small.clone());
        let mut s = store(&log, METADATA_GROUP).await;
        s.save_vote(&Vote::new(1, 1)).await.unwrap();
        for i in 1..=60 {
            s.blocking_append([entry(1, i, &format!("entry number {i}"))])
                .await
                .unwrap();
        }
        let before = segments(dir.path()).len();
        assert!(before > 4, "{before} segments");
        // Read back from disk: most entries left the small cache.
        assert_eq!(entries(&mut s, 1..61).await.len(), 60);
        s.purge(log_id(1, 50)).await.unwrap();
        // The deletion follows the purge's batch: wait for one more to be on disk.
        s.save_vote(&Vote::new(2, 1)).await.unwrap();
        let after = segments(dir.path()).len();
        assert!(after < before && after <= 3, "{before} -> {after} segments");
    }
    let log = open(dir.path(), small);
    let mut s = store(&log, METADATA_GROUP).await;
    assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    let state = s.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 50)));
    assert_eq!(state.last_log_id, Some(log_id(1, 60)));
    let got = entries(&mut s, 0..100).await;
    assert_eq!(got.first().unwrap().0, log_id(1, 51));
    assert_eq!(got.len(), 10);
    // A bounded read stops early but always returns something.
    let some = s.limited_get_log_entries(51, 61).await.unwrap();
    assert!(!some.is_empty() && some[0].log_id == log_id(1, 51));
    let all = s.get_log_entries(51..61).await.unwrap();
    assert_eq!(all.len(), 10);
}

/// Waits (bounded) until `cond` holds.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn concurrent_appends_share_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), RaftLogOptions::default());
    // Let the new segment's head reach the disk first.
    wait_for("the first batch", || {
        log.stats().batches.load(Ordering::Relaxed) >= 1
    });
    let fsyncs = log.stats().fsyncs.load(Ordering::Relaxed);
    let fired = Arc::new(AtomicUsize::new(0));
    const THREADS: u64 = 8;
    const EACH: u64 = 25;
    {
        // Hold the writer while callers from several threads and groups append.
        let _paused = log.pause_writer();
        std::thread::scope(|scope| {
            for group in 0..THREADS {
                let (log, fired) = (&log, fired.clone());
                scope.spawn(move || {
                    for index in 1..=EACH {
                        let fired = fired.clone();
                        let done: shared::Done = Box::new(move |r| {
                            r.expect("synced");
                            fired.fetch_add(1, Ordering::SeqCst);
                        });
                        log.append(group, [(index, Bytes::from_static(b"payload"))], done)
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(
            fired.load(Ordering::SeqCst),
            0,
            "no callback before the sync"
        );
    }
    let appends = (THREADS * EACH) as usize;
    wait_for("every callback", || fired.load(Ordering::SeqCst) == appends);
    let synced = log.stats().fsyncs.load(Ordering::Relaxed) - fsyncs;
    eprintln!("group commit: {appends} appends, {synced} fsync(s)");
    assert_eq!(synced, 1);
}

/// Appends `count` entries to each store from its own task, starting at `first`; gives the
/// stores back.
async fn append_from_tasks(stores: Vec<Store>, first: u64, count: u64) -> Vec<Store> {
    let tasks: Vec<_> = stores
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                for i in first..first + count {
                    s.blocking_append([entry(1, i, "x")]).await.unwrap();
                }
                s
            })
        })
        .collect();
    let mut stores = Vec::new();
    for t in tasks {
        stores.push(t.await.unwrap());
    }
    stores
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_appending_at_once_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), RaftLogOptions::default());
    const GROUPS: u64 = 32;
    const EACH: u64 = 20;
    let mut stores = Vec::new();
    for g in 0..GROUPS {
        let mut s = store(&log, g).await;
        // A vote first: from then on the log's own start is on disk.
        s.save_vote(&Vote::new(1, g)).await.unwrap();
        stores.push(s);
    }
    let stats = log.stats();
    // Every group appends while the writer is held: one sync covers them all.
    let fsyncs = stats.fsyncs.load(Ordering::Relaxed);
    let paused = log.pause_writer();
    let tasks = tokio::spawn(append_from_tasks(stores, 1, 1));
    wait_for("every group's append", || {
        stats.entries.load(Ordering::Relaxed) == GROUPS
    });
    drop(paused);
    let stores = tasks.await.unwrap();
    assert_eq!(stats.fsyncs.load(Ordering::Relaxed) - fsyncs, 1);
    // Left to run freely, each sync still covers whatever arrived while the last one ran.
    let fsyncs = stats.fsyncs.load(Ordering::Relaxed);
    let stores = append_from_tasks(stores, 2, EACH).await;
    let synced = stats.fsyncs.load(Ordering::Relaxed) - fsyncs;
    let appends = GROUPS * EACH;
    eprintln!("group commit, {GROUPS} groups: {appends} appends, {synced} fsync(s)");
    assert!(synced <= appends);
    for mut s in stores {
        assert_eq!(entries(&mut s, 1..EACH + 2).await.len() as u64, EACH + 1);
    }
}

/// A network to no one: a single-node group never sends anything.
struct NoNetwork;

type RpcResult<T, E = openraft::error::RaftError<u64>> =
    Result<T, openraft::error::RPCError<u64, BasicNode, E>>;

fn unreachable<E: std::error::Error>() -> openraft::error::RPCError<u64, BasicNode, E> {
    let e = io::Error::other("single-node test cluster");
    openraft::error::RPCError::Unreachable(openraft::error::Unreachable::new(&e))
}

impl openraft::RaftNetworkFactory<TestConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoNetwork {
        NoNetwork
    }
}

impl openraft::RaftNetwork<TestConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: openraft::raft::AppendEntriesRequest<TestConfig>,
        _option: openraft::network::RPCOption,
    ) -> RpcResult<openraft::raft::AppendEntriesResponse<u64>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: openraft::raft::InstallSnapshotRequest<TestConfig>,
        _option: openraft::network::RPCOption,
    ) -> RpcResult<
        openraft::raft::InstallSnapshotResponse<u64>,
        openraft::error::RaftError<u64, openraft::error::InstallSnapshotError>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: openraft::raft::VoteRequest<u64>,
        _option: openraft::network::RPCOption,
    ) -> RpcResult<openraft::raft::VoteResponse<u64>> {
        Err(unreachable())
    }
}

async fn start_node(log: &RaftLog, sm: StateMachine) -> openraft::Raft<TestConfig> {
    let config = openraft::Config::default()
        .validate()
        .expect("valid config");
    openraft::Raft::new(
        1,
        Arc::new(config),
        NoNetwork,
        store(log, METADATA_GROUP).await,
        sm,
    )
    .await
    .expect("raft starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_group_commits_and_replays_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Some(Duration::from_secs(10));
    let last = {
        let log = open(dir.path(), RaftLogOptions::default());
        let raft = start_node(&log, StateMachine::default()).await;
        raft.initialize(std::collections::BTreeSet::from([1u64]))
            .await
            .expect("initialized");
        raft.wait(timeout)
            .current_leader(1, "elected")
            .await
            .expect("leader");
        let mut last = 0;
        for data in ["vhost /", "user guest", "queue q1"] {
            last = raft
                .client_write(data.to_string())
                .await
                .expect("committed")
                .log_id
                .index;
        }
        raft.shutdown().await.expect("shut down");
        last
    };
    // A fresh state machine: the committed entries are applied again from the log.
    let log = open(dir.path(), RaftLogOptions::default());
    let sm = StateMachine::default();
    let raft = start_node(&log, sm.clone()).await;
    raft.wait(timeout)
        .applied_index_at_least(Some(last), "entries applied again")
        .await
        .expect("applied");
    assert_eq!(
        sm.0.lock().unwrap().applied.data,
        ["vhost /", "user guest", "queue q1"]
    );
    // And the node leads again and takes new writes.
    raft.wait(timeout)
        .current_leader(1, "leader again")
        .await
        .expect("leader");
    raft.client_write("exchange x".to_string())
        .await
        .expect("committed");
    raft.shutdown().await.expect("shut down");
}

#[test]
fn records_round_trip_and_damage_is_seen() {
    let mut out = Vec::new();
    let n = segment::encode(&mut out, Kind::Entry, 9, 42, b"payload");
    assert_eq!(n, out.len());
    let r = segment::decode(&out).unwrap();
    assert_eq!(
        (r.kind, r.group, r.index, &r.payload[..]),
        (Kind::Entry, 9, 42, &b"payload"[..])
    );
    let mut bad = out.clone();
    bad[20] ^= 1;
    assert!(segment::decode(&bad).is_none());
    assert!(segment::decode(&out[..out.len() - 1]).is_none());
}
