//! The conformance suite of [`QueueStore`]: what every implementation must do (append, read in
//! order, remove, delivered marks, ranges), then what a durable one must also do (recover,
//! truncate a torn tail, skip corruption, reclaim and compact segments).

use super::file::{FileQueueStore, FileStoreOptions};
use super::flusher::Flusher;
use super::memory::MemoryQueueStore;
use super::{QueueStore, RecordKind, Recovered, Stored};
use crate::broker::message::Message;
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn message(body: &str) -> Message {
    Message {
        exchange: "x".into(),
        routing_key: "rk".into(),
        properties: Bytes::from_static(&[0x10, 0x00, 2]),
        body: Bytes::copy_from_slice(body.as_bytes()),
        persistent: true,
        arrived_ms: 0,
        expires_at_ms: None,
    }
}

fn bodies(store: &dyn QueueStore, from: u64, until: u64) -> Vec<String> {
    store
        .read(from, until, usize::MAX, u64::MAX)
        .messages
        .into_iter()
        .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap())
        .collect()
}

/// Every implementation, fresh.
fn implementations(dir: &Path) -> Vec<(&'static str, Arc<dyn QueueStore>)> {
    let flusher = Flusher::start(Duration::from_millis(2));
    let (file, _) = FileQueueStore::open(dir, flusher, FileStoreOptions::default()).unwrap();
    vec![
        ("memory", Arc::new(MemoryQueueStore::new())),
        ("file", file),
    ]
}

#[test]
fn reads_return_messages_in_sequence_order() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in implementations(dir.path()) {
        for (seq, body) in [(0, "a"), (1, "b"), (5, "c")] {
            store.append(seq, &message(body), RecordKind::Persistent);
        }
        assert_eq!(bodies(&*store, 0, 10), ["a", "b", "c"], "{name}");
        assert_eq!(bodies(&*store, 1, 5), ["b"], "{name}");
    }
}

#[test]
fn removed_messages_are_not_read_again() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in implementations(dir.path()) {
        let stored: Vec<Stored> = (0..3)
            .map(|i| store.append(i, &message(&i.to_string()), RecordKind::Persistent))
            .collect();
        store.remove(1, stored[1].location);
        assert_eq!(bodies(&*store, 0, 3), ["0", "2"], "{name}");
    }
}

#[test]
fn reads_stop_at_the_limits_and_say_where_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in implementations(dir.path()) {
        for i in 0..10 {
            store.append(i, &message("0123456789"), RecordKind::Paged);
        }
        let batch = store.read(0, 10, 3, u64::MAX);
        assert_eq!(batch.messages.len(), 3, "{name}");
        assert_eq!(batch.next, 3, "{name}");
        let batch = store.read(batch.next, 10, usize::MAX, 25);
        assert_eq!(
            batch.messages.len(),
            3,
            "{name}: 3 bodies of 10 bytes reach 25"
        );
        assert_eq!(batch.messages[0].seq, 3, "{name}");
    }
}

#[test]
fn delivered_marks_are_read_back() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in implementations(dir.path()) {
        let s = store.append(0, &message("a"), RecordKind::Persistent);
        store.append(1, &message("b"), RecordKind::Persistent);
        store.mark_delivered(0, s.location, 0);
        let read = store.read(0, 2, 10, u64::MAX).messages;
        assert!(read[0].delivered, "{name}");
        assert!(!read[1].delivered, "{name}");
        // A return is counted, and a later delivery keeps the count it is given.
        store.mark_delivered(0, s.location, 2);
        assert_eq!(
            store.read(0, 1, 10, u64::MAX).messages[0].returned,
            2,
            "{name}"
        );
        store.mark_delivered(0, s.location, 3);
        let read = store.read(0, 2, 10, u64::MAX).messages;
        assert_eq!((read[0].returned, read[1].returned), (3, 0), "{name}");
    }
}

#[test]
fn remove_range_forgets_every_live_message_in_it() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in implementations(dir.path()) {
        for i in 0..6 {
            store.append(i, &message(&i.to_string()), RecordKind::Paged);
        }
        assert_eq!(store.remove_range(1, 4), 3, "{name}");
        assert_eq!(bodies(&*store, 0, 6), ["0", "4", "5"], "{name}");
    }
}

#[test]
fn destroy_forgets_everything() {
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in implementations(dir.path()) {
        store.append(0, &message("a"), RecordKind::Persistent);
        store.destroy();
        assert!(bodies(&*store, 0, 1).is_empty(), "{name}");
    }
    assert!(!dir.path().exists(), "the file store deletes its directory");
}

// ---- durable stores -------------------------------------------------------------------

fn open(dir: &Path, options: FileStoreOptions) -> (Arc<FileQueueStore>, Recovered, Arc<Flusher>) {
    let flusher = Flusher::start(Duration::from_millis(1));
    let (store, recovered) = FileQueueStore::open(dir, flusher.clone(), options).unwrap();
    (store, recovered, flusher)
}

fn wait_durable(store: &dyn QueueStore, epoch: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.durable_epoch() < epoch {
        assert!(Instant::now() < deadline, "flush round did not complete");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until everything appended so far is written (a round after the last change).
fn settle(store: &dyn QueueStore, flusher: &Flusher) {
    let epoch = flusher.current_epoch();
    flusher.hurry();
    wait_durable(store, epoch);
    // One more round lets after-sync work (reclaim, compaction) finish and be written.
    let epoch = flusher.current_epoch();
    flusher.hurry();
    wait_durable(store, epoch);
}

#[test]
fn persistent_messages_survive_reopening_and_paged_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _, flusher) = open(dir.path(), FileStoreOptions::default());
        store.append(0, &message("kept"), RecordKind::Persistent);
        store.append(1, &message("paged"), RecordKind::Paged);
        let last = store.append(2, &message("kept too"), RecordKind::Persistent);
        wait_durable(&*store, last.epoch);
        flusher.shutdown();
    }
    let (store, recovered, _) = open(dir.path(), FileStoreOptions::default());
    assert_eq!(
        recovered,
        Recovered {
            count: 2,
            bytes: 12,
            first_seq: 0,
            next_seq: 3,
            redelivered_below: 0,
        }
    );
    assert_eq!(bodies(&*store, 0, 3), ["kept", "kept too"]);
}

#[test]
fn removals_and_delivered_marks_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _, flusher) = open(dir.path(), FileStoreOptions::default());
        let a = store.append(0, &message("acked"), RecordKind::Persistent);
        let b = store.append(1, &message("delivered"), RecordKind::Persistent);
        store.append(2, &message("ready"), RecordKind::Persistent);
        store.remove(0, a.location);
        store.mark_delivered(1, b.location, 4);
        settle(&*store, &flusher);
        flusher.shutdown();
    }
    let (store, recovered, _) = open(dir.path(), FileStoreOptions::default());
    assert_eq!(recovered.count, 2);
    assert_eq!(recovered.first_seq, 1);
    let read = store.read(0, 3, 10, u64::MAX).messages;
    assert_eq!(read.len(), 2);
    assert!(read[0].delivered && !read[1].delivered);
    assert_eq!(
        (read[0].returned, read[1].returned),
        (4, 0),
        "returns survive a restart"
    );
}

fn only_file(dir: &Path, ext: &str) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    files.sort();
    files.pop().expect("a file")
}

#[test]
fn a_torn_record_at_the_tail_is_truncated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _, flusher) = open(dir.path(), FileStoreOptions::default());
        let s = store.append(0, &message("whole"), RecordKind::Persistent);
        wait_durable(&*store, s.epoch);
        flusher.shutdown();
    }
    let segment = only_file(dir.path(), "seg");
    let good = std::fs::metadata(&segment).unwrap().len();
    // Half of a record, as a crash mid-write leaves it.
    let mut partial = Vec::new();
    super::record::encode_record(&mut partial, 1, &message("cut short"));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&partial[..partial.len() / 2]);
    std::fs::write(&segment, bytes).unwrap();
    let (store, recovered, _) = open(dir.path(), FileStoreOptions::default());
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), good);
    assert_eq!(recovered.count, 1);
    assert_eq!(bodies(&*store, 0, 2), ["whole"]);
}

#[test]
fn a_corrupt_record_is_skipped_and_the_rest_read() {
    let dir = tempfile::tempdir().unwrap();
    let middle;
    {
        let (store, _, flusher) = open(dir.path(), FileStoreOptions::default());
        store.append(0, &message("first"), RecordKind::Persistent);
        middle = store.append(1, &message("damaged"), RecordKind::Persistent);
        let s = store.append(2, &message("third"), RecordKind::Persistent);
        wait_durable(&*store, s.epoch);
        flusher.shutdown();
    }
    let segment = only_file(dir.path(), "seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = middle.location.offset as usize + middle.location.record_len as usize - 2;
    bytes[at] ^= 0xFF;
    std::fs::write(&segment, bytes).unwrap();
    let (store, recovered, _) = open(dir.path(), FileStoreOptions::default());
    assert_eq!(recovered.count, 3, "recovery reads only the index");
    let batch = store.read(0, 3, 10, u64::MAX);
    assert_eq!(batch.dropped, 1);
    let got: Vec<_> = batch.messages.iter().map(|m| m.seq).collect();
    assert_eq!(got, [0, 2]);
}

#[test]
fn a_corrupt_index_slot_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _, flusher) = open(dir.path(), FileStoreOptions::default());
        store.append(0, &message("a"), RecordKind::Persistent);
        let s = store.append(1, &message("b"), RecordKind::Persistent);
        wait_durable(&*store, s.epoch);
        flusher.shutdown();
    }
    let index = only_file(dir.path(), "idx");
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[10] ^= 0xFF; // inside slot 0
    std::fs::write(&index, bytes).unwrap();
    let (store, recovered, _) = open(dir.path(), FileStoreOptions::default());
    assert_eq!(recovered.count, 1);
    assert_eq!(bodies(&*store, 0, 2), ["b"]);
}

fn segment_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count()
}

#[test]
fn segments_with_nothing_live_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions {
        segment_size: 1024,
        ..FileStoreOptions::default()
    };
    let (store, _, flusher) = open(dir.path(), options);
    let body = "x".repeat(200);
    let stored: Vec<_> = (0..20)
        .map(|i| store.append(i, &message(&body), RecordKind::Persistent))
        .collect();
    settle(&*store, &flusher);
    assert!(segment_count(dir.path()) >= 4);
    for (i, s) in stored.iter().enumerate() {
        store.remove(i as u64, s.location);
    }
    settle(&*store, &flusher);
    assert!(
        segment_count(dir.path()) <= 1,
        "only the segment being written may remain, found {}",
        segment_count(dir.path())
    );
}

#[test]
fn a_mostly_dead_segment_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions {
        segment_size: 4096,
        compact_below: 0.2,
        sync: true,
    };
    let (store, _, flusher) = open(dir.path(), options);
    let body = "y".repeat(300);
    let stored: Vec<_> = (0..60)
        .map(|i| store.append(i, &message(&body), RecordKind::Persistent))
        .collect();
    settle(&*store, &flusher);
    let before = segment_count(dir.path());
    // Keep one message in the first segment, and drop everything else but the last few.
    for (i, s) in stored.iter().enumerate().skip(1).take(50) {
        store.remove(i as u64, s.location);
    }
    settle(&*store, &flusher);
    settle(&*store, &flusher);
    assert!(segment_count(dir.path()) < before);
    let first_segment = dir.path().join("00000000.seg");
    assert!(
        !first_segment.exists(),
        "the first segment was compacted away"
    );
    let left = bodies(&*store, 0, 60);
    assert_eq!(left.len(), 10);
    // A delivery (with a count of returns) of the moved message is still recorded, with the
    // place it moved to (the location the queue holds is the old one).
    store.mark_delivered(0, stored[0].location, 5);
    settle(&*store, &flusher);
    let first = &store.read(0, 1, 1, u64::MAX).messages[0];
    assert!(first.delivered);
    assert_eq!(first.returned, 5);
    assert_eq!(first.message.body.len(), 300);
    // The moved message can still be removed; reopening finds what is left.
    store.remove(0, stored[0].location);
    settle(&*store, &flusher);
    flusher.shutdown();
    let (_, recovered, _) = open(dir.path(), options);
    assert_eq!(recovered.count, 9);
}

#[test]
fn messages_not_yet_flushed_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    // A long interval: nothing is written unless a publisher waits.
    let flusher = Flusher::start(Duration::from_secs(3600));
    let (store, _) =
        FileQueueStore::open(dir.path(), flusher.clone(), FileStoreOptions::default()).unwrap();
    store.append(0, &message("in memory"), RecordKind::Paged);
    assert_eq!(bodies(&*store, 0, 1), ["in memory"]);
    flusher.shutdown();
}

#[test]
fn segments_and_index_files_emptied_while_written_are_deleted_once_full() {
    // Consumers that keep up: each message is gone before its segment (or index file) is
    // full. The files must still go once writing moves on.
    let dir = tempfile::tempdir().unwrap();
    let options = FileStoreOptions {
        segment_size: 4096,
        ..FileStoreOptions::default()
    };
    let (store, _, flusher) = open(dir.path(), options);
    let body = "z".repeat(200);
    let total = super::file::SLOTS_PER_INDEX + 100;
    for seq in 0..total {
        let s = store.append(seq, &message(&body), RecordKind::Persistent);
        store.remove(seq, s.location);
        if seq % 10_000 == 0 {
            settle(&*store, &flusher);
        }
    }
    settle(&*store, &flusher);
    assert!(
        segment_count(dir.path()) <= 2,
        "{} segments left",
        segment_count(dir.path())
    );
    assert!(
        !dir.path().join("0000000000000000.idx").exists(),
        "the first index file went"
    );
    flusher.shutdown();
    let (_, recovered, _) = open(dir.path(), options);
    assert_eq!(recovered.count, 0);
}
