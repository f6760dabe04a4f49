//! Tests of the definitions store: commits surviving a reopen through the log alone or a
//! snapshot, a torn or corrupt log, snapshots, and concurrent committers.

use super::*;
use amq_protocol::types::{AMQPValue, FieldTable};
use std::sync::Arc;

fn queue(name: &str) -> Command {
    Command::DeclareQueue {
        vhost: "/".into(),
        name: name.into(),
        auto_delete: false,
        arguments: FieldTable::default(),
        node: None,
    }
}

fn bind(queue: &str, key: &str) -> Command {
    Command::Bind {
        vhost: "/".into(),
        source: "amq.direct".into(),
        destination: queue.into(),
        destination_type: "queue".into(),
        routing_key: key.into(),
        arguments: FieldTable::default(),
    }
}

fn log_of(dir: &Path) -> Vec<u8> {
    fs::read(dir.join(LOG_NAME)).unwrap()
}

#[test]
fn commits_survive_reopening_through_the_log_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    store.commit(queue("q")).unwrap();
    store.commit(bind("q", "k")).unwrap();
    store
        .commit(Command::SetClusterName { name: "c".into() })
        .unwrap();
    assert!(!dir.path().join(FILE_NAME).exists(), "no snapshot yet");
    assert_eq!(
        log_of(dir.path()).iter().filter(|&&b| b == b'\n').count(),
        3
    );
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot(), store.snapshot());
    let defs = again.snapshot();
    assert!(defs.vhosts["/"].queues.contains_key("q"));
    assert_eq!(defs.vhosts["/"].bindings.len(), 1);
    assert_eq!(defs.cluster_name.as_deref(), Some("c"));
}

#[test]
fn a_command_that_changes_nothing_is_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    store.commit(queue("q")).unwrap();
    let len = log_of(dir.path()).len();
    store.commit(queue("q")).unwrap();
    store
        .commit(Command::DeleteQueue {
            vhost: "/".into(),
            name: "absent".into(),
        })
        .unwrap();
    assert_eq!(log_of(dir.path()).len(), len);
}

#[test]
fn a_torn_last_line_is_ignored_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    store.commit(queue("q")).unwrap();
    let whole = store.snapshot();
    drop(store);
    let log = dir.path().join(LOG_NAME);
    let mut file = fs::OpenOptions::new().append(true).open(&log).unwrap();
    file.write_all(br#"{"op":"declare_queue","vhost":"/","na"#)
        .unwrap();
    drop(file);
    let store = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(store.snapshot(), whole);
    // Later commits follow the last whole line, not the torn one.
    store.commit(queue("r")).unwrap();
    let again = DefinitionStore::open(dir.path()).unwrap();
    let queues = &again.snapshot().vhosts["/"].queues;
    assert!(queues.contains_key("q") && queues.contains_key("r"));
}

#[test]
fn a_corrupt_line_before_the_last_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    store.commit(queue("q")).unwrap();
    drop(store);
    let log = dir.path().join(LOG_NAME);
    let mut file = fs::OpenOptions::new().append(true).open(&log).unwrap();
    file.write_all(b"{\"op\":\"no_such_op\"}\n").unwrap();
    file.write_all(&serde_json::to_vec(&queue("r")).unwrap())
        .unwrap();
    file.write_all(b"\n").unwrap();
    drop(file);
    let err = DefinitionStore::open(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, DefinitionsError::CorruptLog { line: 2, .. }),
        "{text}"
    );
    assert!(text.contains(LOG_NAME) && text.contains("line 2"), "{text}");
}

#[test]
fn a_snapshot_with_the_log_not_yet_emptied_replays_harmlessly() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    for c in [
        queue("q"),
        bind("q", "a"),
        Command::DeleteQueue {
            vhost: "/".into(),
            name: "q".into(),
        },
        queue("q"),
        bind("q", "b"),
    ] {
        store.commit(c).unwrap();
    }
    let defs = store.snapshot();
    drop(store);
    // A crash after the snapshot was written and before the log was emptied.
    write_atomically(&dir.path().join(FILE_NAME), &defs).unwrap();
    assert!(!log_of(dir.path()).is_empty());
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot(), defs);
    let bindings: Vec<_> = defs.vhosts["/"].bindings.iter().collect();
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0].routing_key, "b");
}

#[test]
fn a_long_log_is_folded_into_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    let count = COMPACT_ENTRIES as usize + 10;
    let (_, synced) = store.batch(|| {
        for i in 0..count {
            store.commit(queue(&format!("q{i}"))).unwrap();
        }
    });
    synced.unwrap();
    assert!(dir.path().join(FILE_NAME).exists());
    assert!(log_of(dir.path()).is_empty(), "the log starts again empty");
    store.commit(queue("after")).unwrap();
    assert!(!log_of(dir.path()).is_empty());
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot(), store.snapshot());
    assert_eq!(again.snapshot().vhosts["/"].queues.len(), count + 1);
}

#[test]
fn a_batch_syncs_once_at_its_end_and_nested_batches_join_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    let (inner, synced) = store.batch(|| {
        store.commit(queue("q")).unwrap();
        let (_, inner) = store.batch(|| store.commit(queue("r")).unwrap());
        // Appended to memory only until the outer batch ends.
        assert!(log_of(dir.path()).is_empty());
        inner
    });
    inner.unwrap();
    synced.unwrap();
    assert_eq!(
        log_of(dir.path()).iter().filter(|&&b| b == b'\n').count(),
        2
    );
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot(), store.snapshot());
}

#[test]
fn commit_now_in_a_batch_is_on_disk_before_it_returns_with_what_the_batch_appended() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    let (_, synced) = store.batch(|| {
        store.commit(bind("q", "k")).unwrap();
        assert!(log_of(dir.path()).is_empty());
        store.commit_now(queue("q")).unwrap();
        // The queue, and the binding appended before it, are on disk at once.
        let lines = log_of(dir.path()).iter().filter(|&&b| b == b'\n').count();
        assert_eq!(lines, 2);
        let reopened = DefinitionStore::open(dir.path()).unwrap();
        assert!(reopened.snapshot().vhosts["/"].queues.contains_key("q"));
        store.commit(bind("q", "k2")).unwrap();
    });
    synced.unwrap();
    assert_eq!(
        log_of(dir.path()).iter().filter(|&&b| b == b'\n').count(),
        3
    );
}

#[test]
fn a_commit_that_changes_nothing_waits_for_the_equal_change_still_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    // A batch on this thread leaves its command appended but not written; another thread
    // committing the same change must not return before it is on disk.
    let (_, synced) = store.batch(|| {
        store.commit(queue("q")).unwrap();
        assert!(log_of(dir.path()).is_empty());
        std::thread::scope(|s| {
            s.spawn(|| {
                store.commit(queue("q")).unwrap();
                assert!(
                    !log_of(dir.path()).is_empty(),
                    "returned before the equal change was on disk"
                );
            });
        });
    });
    synced.unwrap();
}

#[test]
fn concurrent_committers_all_reach_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DefinitionStore::open(dir.path()).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    store.commit(queue(&format!("t{t}-{i}"))).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot().vhosts["/"].queues.len(), 100);
    assert_eq!(again.snapshot(), store.snapshot());
}

#[test]
fn bindings_are_kept_once_in_the_order_made() {
    let mut all = Bindings::default();
    let b = |key: &str, n: i32| {
        let mut arguments = FieldTable::default();
        arguments.insert("n".into(), AMQPValue::LongInt(n));
        BindingDefinition {
            source: "x".into(),
            destination: "q".into(),
            destination_type: "queue".into(),
            routing_key: key.into(),
            arguments,
        }
    };
    assert!(all.insert(b("z", 1)));
    assert!(all.insert(b("a", 1)));
    assert!(all.insert(b("a", 2)), "other arguments, another binding");
    assert!(!all.insert(b("z", 1)));
    assert!(all.contains(&b("a", 2)));
    assert!(all.remove(&b("a", 1)));
    assert!(!all.remove(&b("a", 1)));
    let keys: Vec<_> = all.iter().map(|b| b.routing_key.clone()).collect();
    assert_eq!(keys, ["z", "a"]);
    let text = serde_json::to_string(&all).unwrap();
    assert!(text.starts_with('['), "{text}");
    let back: Bindings = serde_json::from_str(&text).unwrap();
    assert_eq!(back, all);
    assert_eq!(all.remove_where(|b| b.routing_key == "z"), 1);
    assert_eq!(all.len(), 1);
}

#[test]
fn a_corrupt_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
    let err = DefinitionStore::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains(FILE_NAME), "{err}");
}

/// A table nested as deep as the wire accepts, levels alternating between tables and
/// arrays (or all tables), around the leaf that takes the most JSON levels.
fn deepest(alternate: bool) -> FieldTable {
    use crate::amqp::codec::MAX_TABLE_DEPTH;
    use amq_protocol::types::{DecimalValue, FieldArray};
    let mut value = AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 7 });
    for level in (2..=MAX_TABLE_DEPTH).rev() {
        value = if alternate && level % 2 == 0 {
            AMQPValue::FieldArray(FieldArray::from(vec![value]))
        } else {
            let mut t = FieldTable::default();
            t.insert("k".into(), value);
            AMQPValue::FieldTable(t)
        };
    }
    let mut top = FieldTable::default();
    top.insert("k".into(), value);
    top
}

/// Through the log and through a snapshot.
#[test]
fn arguments_nested_to_the_wire_limit_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    for (name, alternate) in [("q", true), ("r", false)] {
        let (vhost, name) = ("/".to_owned(), name.to_owned());
        for c in [
            Command::DeclareQueue {
                vhost: vhost.clone(),
                name: name.clone(),
                auto_delete: false,
                arguments: deepest(alternate),
                node: None,
            },
            Command::DeclareExchange {
                vhost: vhost.clone(),
                name: name.clone(),
                kind: "headers".into(),
                auto_delete: false,
                internal: false,
                arguments: deepest(alternate),
            },
            Command::Bind {
                vhost,
                source: name.clone(),
                destination: name,
                destination_type: "queue".into(),
                routing_key: String::new(),
                arguments: deepest(alternate),
            },
        ] {
            store.commit(c).unwrap();
        }
    }
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot(), store.snapshot());
    write_atomically(&dir.path().join(FILE_NAME), &store.snapshot()).unwrap();
    fs::write(dir.path().join(LOG_NAME), b"").unwrap();
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot(), store.snapshot());
}

/// Points the store's log at a handle that cannot be written (`broken`), or back at the file.
fn break_log(store: &DefinitionStore, dir: &Path, broken: bool) {
    let path = dir.join(LOG_NAME);
    let file = if broken {
        fs::File::open(&path).unwrap()
    } else {
        fs::OpenOptions::new().append(true).open(&path).unwrap()
    };
    *store.disk.as_ref().unwrap().log.lock() = file;
}

#[test]
fn a_batch_whose_commands_failed_is_told_so_however_many_writes_failed_after() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    let (_, batch) = store.batch(|| {
        store.commit(queue("in the batch")).unwrap();
        // Other committers' writes fail many times over, the batch's pending command with
        // the first of them; then the disk comes back before the batch ends.
        std::thread::scope(|s| {
            s.spawn(|| {
                break_log(&store, dir.path(), true);
                for i in 0..40 {
                    assert!(store.commit(queue(&format!("other {i}"))).is_err());
                }
                break_log(&store, dir.path(), false);
            });
        });
    });
    assert!(batch.is_err(), "the batch's command never reached the disk");
    assert!(
        !store
            .snapshot()
            .vhosts
            .get("/")
            .is_some_and(|v| v.queues.contains_key("in the batch"))
    );
}

#[test]
fn a_failed_write_fails_its_commit_and_leaves_memory_as_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = DefinitionStore::open(dir.path()).unwrap();
    store.commit(queue("kept")).unwrap();
    break_log(&store, dir.path(), true);
    let err = store.commit(queue("lost")).unwrap_err();
    assert!(err.to_string().contains(LOG_NAME), "{err}");
    let (_, batch) = store.batch(|| {
        store.commit(queue("lost too")).unwrap();
        store.commit(queue("and this")).unwrap();
    });
    assert!(batch.is_err());
    assert_eq!(store.snapshot().vhosts["/"].queues.len(), 1);
    break_log(&store, dir.path(), false);
    store.commit(queue("later")).unwrap();
    let again = DefinitionStore::open(dir.path()).unwrap();
    assert_eq!(again.snapshot(), store.snapshot());
    let names: Vec<String> = again.snapshot().vhosts["/"]
        .queues
        .keys()
        .cloned()
        .collect();
    assert_eq!(names, ["kept", "later"]);
}
