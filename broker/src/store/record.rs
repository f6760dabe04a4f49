//! The two on-disk formats of a queue's store, each checksummed so that torn and corrupt data
//! is recognised rather than trusted.
//!
//! A *message record* (in a segment file) holds one message:
//! `crc32 u32 | len u32 | seq u64 | exchange (u8 len + bytes) | routing key (u8 len + bytes) |
//!  properties length u32 | [arrived u64 | expires u64] | properties | body (the rest)`; the
//! checksum covers everything after it and `len` counts the bytes after the `len` field. The
//! top bit of the properties length says the two timestamps (milliseconds since the Unix
//! epoch; expires 0 for none) follow it; records written before they existed lack them.
//!
//! An *index slot* (in an index file) is 32 bytes at a position given by the message's queue
//! sequence number, so it can be found and rewritten without any in-memory map:
//! `crc32 u32 | kind u8 | flags u8 | returned u16 | seq u64 | segment u32 | offset u32 |
//!  record len u32 | body len u32`, `returned` counting the times the message came back
//! unacknowledged (for `x-delivery-limit`; 0 in slots written before it was kept). An all-zero
//! slot was never written.

use crate::broker::message::{Message, ShortStr};
use bytes::{BufMut, Bytes};

pub const SLOT_SIZE: usize = 32;
/// In a record's properties length: the arrival and expiry times follow.
const TIMESTAMPS: u32 = 1 << 31;
pub const RECORD_HEADER: usize = 8;

/// What a stored message is to recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A persistent message on a durable queue: recovered after a restart.
    Persistent = 1,
    /// Written only to keep memory bounded (a transient message, or any message of a
    /// non-durable queue): discarded at restart.
    Paged = 2,
}

pub const FLAG_REMOVED: u8 = 1;
pub const FLAG_DELIVERED: u8 = 2;

/// A decoded index slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub kind: RecordKind,
    pub flags: u8,
    /// Times the message came back unacknowledged.
    pub returned: u16,
    pub seq: u64,
    pub segment: u32,
    pub offset: u32,
    pub record_len: u32,
    pub body_len: u32,
}

impl Slot {
    pub fn removed(&self) -> bool {
        self.flags & FLAG_REMOVED != 0
    }

    pub fn delivered(&self) -> bool {
        self.flags & FLAG_DELIVERED != 0
    }

    pub fn encode(&self) -> [u8; SLOT_SIZE] {
        let mut out = [0u8; SLOT_SIZE];
        out[4] = self.kind as u8;
        out[5] = self.flags;
        out[6..8].copy_from_slice(&self.returned.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..20].copy_from_slice(&self.segment.to_be_bytes());
        out[20..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.record_len.to_be_bytes());
        out[28..32].copy_from_slice(&self.body_len.to_be_bytes());
        let crc = crc32fast::hash(&out[4..]);
        out[..4].copy_from_slice(&crc.to_be_bytes());
        out
    }
}

/// What a slot on disk turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRead {
    Empty,
    Valid(Slot),
    Corrupt,
}

pub fn decode_slot(bytes: &[u8]) -> SlotRead {
    if bytes.len() < SLOT_SIZE {
        return SlotRead::Corrupt;
    }
    if bytes[..SLOT_SIZE].iter().all(|b| *b == 0) {
        return SlotRead::Empty;
    }
    let crc = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&bytes[4..SLOT_SIZE]) {
        return SlotRead::Corrupt;
    }
    let kind = match bytes[4] {
        1 => RecordKind::Persistent,
        2 => RecordKind::Paged,
        _ => return SlotRead::Corrupt,
    };
    let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    SlotRead::Valid(Slot {
        kind,
        flags: bytes[5],
        returned: u16::from_be_bytes([bytes[6], bytes[7]]),
        seq: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
        segment: u32_at(16),
        offset: u32_at(20),
        record_len: u32_at(24),
        body_len: u32_at(28),
    })
}

/// Appends a message record to `out`; returns its length.
pub fn encode_record(out: &mut Vec<u8>, seq: u64, msg: &Message) -> usize {
    let start = out.len();
    out.put_u32(0); // crc, filled below
    out.put_u32(0); // len, filled below
    out.put_u64(seq);
    let exchange = &msg.exchange.as_bytes()[..msg.exchange.len().min(255)];
    out.put_u8(exchange.len() as u8);
    out.put_slice(exchange);
    let key = &msg.routing_key.as_bytes()[..msg.routing_key.len().min(255)];
    out.put_u8(key.len() as u8);
    out.put_slice(key);
    out.put_u32(msg.properties.len() as u32 | TIMESTAMPS);
    out.put_u64(msg.arrived_ms);
    out.put_u64(msg.expires_at_ms.unwrap_or(0));
    out.put_slice(&msg.properties);
    out.put_slice(&msg.body);
    let len = (out.len() - start - RECORD_HEADER) as u32;
    out[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_be_bytes());
    out.len() - start
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the record says it has: a write cut short.
    Truncated,
    /// The checksum or the structure is wrong.
    Corrupt,
}

/// Length of the record starting at `bytes` according to its header, if the header is there.
pub fn record_len(bytes: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
    Some(RECORD_HEADER + len)
}

/// Decodes the record at the start of `bytes`. `persistent` comes from the index.
pub fn decode_record(bytes: &Bytes, persistent: bool) -> Result<(u64, Message), RecordError> {
    let total = record_len(bytes).ok_or(RecordError::Truncated)?;
    if bytes.len() < total {
        return Err(RecordError::Truncated);
    }
    let crc = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&bytes[4..total]) {
        return Err(RecordError::Corrupt);
    }
    let mut at = RECORD_HEADER;
    let take = |at: &mut usize, n: usize| -> Result<Bytes, RecordError> {
        if *at + n > total {
            return Err(RecordError::Corrupt);
        }
        let b = bytes.slice(*at..*at + n);
        *at += n;
        Ok(b)
    };
    let seq = u64::from_be_bytes(take(&mut at, 8)?[..].try_into().expect("8 bytes"));
    let xlen = take(&mut at, 1)?[0] as usize;
    let exchange = take(&mut at, xlen)?;
    let klen = take(&mut at, 1)?[0] as usize;
    let routing_key = take(&mut at, klen)?;
    let plen = u32::from_be_bytes(take(&mut at, 4)?[..].try_into().expect("4 bytes"));
    let (arrived_ms, expires_at_ms) = if plen & TIMESTAMPS != 0 {
        let arrived = u64::from_be_bytes(take(&mut at, 8)?[..].try_into().expect("8 bytes"));
        let expires = u64::from_be_bytes(take(&mut at, 8)?[..].try_into().expect("8 bytes"));
        (arrived, (expires != 0).then_some(expires))
    } else {
        (0, None)
    };
    let properties = take(&mut at, (plen & !TIMESTAMPS) as usize)?;
    let body = bytes.slice(at..total);
    Ok((
        seq,
        Message {
            exchange: ShortStr::from_bytes(exchange),
            routing_key: ShortStr::from_bytes(routing_key),
            properties,
            body,
            persistent,
            arrived_ms,
            expires_at_ms,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Message {
        Message {
            exchange: "amq.direct".into(),
            routing_key: "key".into(),
            properties: Bytes::from_static(&[0x10, 0x00, 2]),
            body: Bytes::copy_from_slice(body),
            persistent: true,
            arrived_ms: 0,
            expires_at_ms: None,
        }
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        let n = encode_record(&mut out, 42, &message(b"hello"));
        assert_eq!(n, out.len());
        let (seq, m) = decode_record(&Bytes::from(out), true).unwrap();
        assert_eq!(seq, 42);
        assert_eq!(&m.body[..], b"hello");
        assert_eq!(m.routing_key.as_bytes(), b"key");
        assert_eq!(&m.properties[..], &[0x10, 0x00, 2]);
    }

    #[test]
    fn arrival_and_expiry_times_are_kept_and_older_records_still_read() {
        let mut out = Vec::new();
        let mut m = message(b"ttl");
        m.arrived_ms = 1_700_000_000_123;
        m.expires_at_ms = Some(1_700_000_060_123);
        encode_record(&mut out, 9, &m);
        let (_, back) = decode_record(&Bytes::from(out), true).unwrap();
        assert_eq!(back.arrived_ms, 1_700_000_000_123);
        assert_eq!(back.expires_at_ms, Some(1_700_000_060_123));
        assert_eq!(&back.body[..], b"ttl");
        // A record as written before the timestamps: no flag, no times.
        let mut old = Vec::new();
        old.put_u32(0);
        old.put_u32(0);
        old.put_u64(5);
        old.put_u8(0);
        old.put_u8(1);
        old.put_slice(b"q");
        old.put_u32(3);
        old.put_slice(&[0x10, 0x00, 2]);
        old.put_slice(b"body");
        let len = (old.len() - RECORD_HEADER) as u32;
        old[4..8].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&old[4..]);
        old[..4].copy_from_slice(&crc.to_be_bytes());
        let (seq, back) = decode_record(&Bytes::from(old), false).unwrap();
        assert_eq!((seq, &back.body[..], back.arrived_ms), (5, &b"body"[..], 0));
        assert_eq!(back.expires_at_ms, None);
    }

    #[test]
    fn torn_and_corrupt_records_are_told_apart() {
        let mut out = Vec::new();
        encode_record(&mut out, 1, &message(b"hello world"));
        let torn = Bytes::copy_from_slice(&out[..out.len() - 3]);
        assert_eq!(
            decode_record(&torn, true).unwrap_err(),
            RecordError::Truncated
        );
        let mut flipped = out.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xFF;
        assert_eq!(
            decode_record(&Bytes::from(flipped), true).unwrap_err(),
            RecordError::Corrupt
        );
    }

    #[test]
    fn slots_round_trip_and_detect_damage() {
        let slot = Slot {
            kind: RecordKind::Persistent,
            flags: FLAG_DELIVERED,
            returned: 513,
            seq: 7,
            segment: 3,
            offset: 4096,
            record_len: 120,
            body_len: 100,
        };
        let bytes = slot.encode();
        assert_eq!(decode_slot(&bytes), SlotRead::Valid(slot));
        assert_eq!(decode_slot(&[0u8; SLOT_SIZE]), SlotRead::Empty);
        let mut bad = bytes;
        bad[10] ^= 1;
        assert_eq!(decode_slot(&bad), SlotRead::Corrupt);
    }
}
