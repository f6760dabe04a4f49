//! A store that keeps messages in memory: for brokers run without a data directory and for
//! tests. Appends are durable at once (epoch 0) because there is nothing to wait for.

use super::record::RecordKind;
use super::{Location, QueueStore, ReadBatch, Stored, StoredMessage};
use crate::broker::message::Message;
use parking_lot::Mutex;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct MemoryQueueStore {
    messages: Mutex<BTreeMap<u64, (Message, Location, bool, u16)>>,
}

impl MemoryQueueStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.messages.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.lock().is_empty()
    }
}

impl QueueStore for MemoryQueueStore {
    fn append(&self, seq: u64, message: &Message, kind: RecordKind) -> Stored {
        let location = Location {
            kind,
            segment: 0,
            offset: 0,
            record_len: 0,
            body_len: message.body.len() as u32,
        };
        self.messages
            .lock()
            .insert(seq, (message.clone(), location, false, 0));
        Stored { location, epoch: 0 }
    }

    fn mark_delivered(&self, seq: u64, _at: Location, returned: u16) {
        if let Some(entry) = self.messages.lock().get_mut(&seq) {
            entry.2 = true;
            entry.3 = returned;
        }
    }

    fn remove(&self, seq: u64, _at: Location) {
        self.messages.lock().remove(&seq);
    }

    fn read(&self, from: u64, until: u64, max: usize, max_bytes: u64) -> ReadBatch {
        let messages = self.messages.lock();
        let mut batch = ReadBatch {
            next: until,
            ..ReadBatch::default()
        };
        let mut bytes = 0u64;
        for (seq, (message, location, delivered, returned)) in messages.range(from..until) {
            if batch.messages.len() >= max || bytes >= max_bytes {
                batch.next = *seq;
                break;
            }
            bytes += message.body.len() as u64;
            batch.messages.push(StoredMessage {
                seq: *seq,
                message: message.clone(),
                location: *location,
                delivered: *delivered,
                returned: *returned,
            });
        }
        batch
    }

    fn remove_range(&self, from: u64, until: u64) -> u64 {
        let mut messages = self.messages.lock();
        let doomed: Vec<u64> = messages.range(from..until).map(|(s, _)| *s).collect();
        for s in &doomed {
            messages.remove(s);
        }
        doomed.len() as u64
    }

    fn destroy(&self) {
        self.messages.lock().clear();
    }

    fn durable_epoch(&self) -> u64 {
        0
    }
}
