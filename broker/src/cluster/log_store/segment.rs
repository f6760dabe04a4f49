//! The Raft log's on-disk format: numbered segment files of checksummed records, and the scan
//! that reads them back at startup.
//!
//! A record is `crc32 u32 | len u32 | kind u8 | group u64 | index u64 | payload`, big-endian:
//! `len` counts the bytes after the `len` field and the checksum covers everything after it,
//! as in the queue store's records. `group` says which Raft group the record belongs to, so
//! that every group of a node can share one log (and one fsync per batch).
//!
//! A segment (`00000001.seg`, …) opens with a *start* record (its own number and a format
//! string), then the state every group had when it was opened (vote, committed and purged
//! log ids), then records in the order they were written. Because each segment repeats the
//! state, segments older than the oldest entry still in use can be deleted outright.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// The checksum and the length.
pub const HEADER: usize = 8;
/// Kind, group and index: the part of the body every record has.
pub const FIXED: usize = 17;
/// The start record's payload: names the format, and its version.
pub const MAGIC: &[u8] = b"warren raft log 1";
pub const SUFFIX: &str = "seg";

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// First record of a segment; `index` is the segment's number.
    Start = 1,
    /// A log entry at `index`. It replaces any entry at `index` or after.
    Entry = 2,
    /// The group's vote (serialized).
    Vote = 3,
    /// The group's committed log id (serialized).
    Committed = 4,
    /// Entries up to `index` are gone; the payload is the serialized log id.
    Purge = 5,
    /// Entries from `index` on are gone (they conflicted with the leader's).
    Truncate = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Start,
            2 => Kind::Entry,
            3 => Kind::Vote,
            4 => Kind::Committed,
            5 => Kind::Purge,
            6 => Kind::Truncate,
            _ => return None,
        })
    }
}

/// Appends a record to `out`; returns its length.
pub fn encode(out: &mut Vec<u8>, kind: Kind, group: u64, index: u64, payload: &[u8]) -> usize {
    let start = out.len();
    let len = (FIXED + payload.len()) as u32;
    out.extend_from_slice(&[0; 4]); // crc, filled below
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&group.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_be_bytes());
    out.len() - start
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub group: u64,
    pub index: u64,
    pub payload: Vec<u8>,
}

/// Decodes a whole record (header included); `None` if it is damaged.
pub fn decode(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < HEADER + FIXED {
        return None;
    }
    let crc = u32::from_be_bytes(bytes[..4].try_into().ok()?);
    let len = u32::from_be_bytes(bytes[4..8].try_into().ok()?) as usize;
    if len + HEADER != bytes.len() || crc != crc32fast::hash(&bytes[4..]) {
        return None;
    }
    Some(Record {
        kind: Kind::from_u8(bytes[8])?,
        group: u64::from_be_bytes(bytes[9..17].try_into().ok()?),
        index: u64::from_be_bytes(bytes[17..25].try_into().ok()?),
        payload: bytes[HEADER + FIXED..].to_vec(),
    })
}

/// The payload of an entry record read back at `offset` (whole record, `len` bytes).
pub fn entry_payload(file: &File, path: &Path, offset: u64, len: u32) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    match decode(&buf) {
        Some(r) if r.kind == Kind::Entry => Ok(r.payload),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "raft log {}: damaged record at offset {offset}",
                path.display()
            ),
        )),
    }
}

pub fn file_name(segment: u32) -> String {
    format!("{segment:08}.{SUFFIX}")
}

/// The segments in `dir`, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.strip_suffix('.'))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(n) = number {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

/// How a scan of one segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte was a good record.
    Clean,
    /// The last record was cut short or garbled and nothing written after it survived: a write
    /// torn by a crash, at this offset.
    TornTail(u64),
}

/// A damaged record with good data after it: the file cannot be trusted.
#[derive(Debug)]
pub struct Damaged {
    pub offset: u64,
}

/// Reads every record of a segment in order, passing each with its offset and length. A
/// damaged record (cut short, garbled length or checksum) is a torn tail when no good record
/// starts anywhere after it: a crash can only have torn what was written last, and may leave
/// the file longer than what reached it. Anything else is [`Damaged`].
pub fn scan(
    path: &Path,
    mut each: impl FnMut(Record, u64, u32),
) -> io::Result<Result<ScanEnd, Damaged>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut offset = 0u64;
    let mut buf = Vec::new();
    while offset < size {
        let left = size - offset;
        let mut record = None;
        if left >= (HEADER + FIXED) as u64 {
            buf.resize(HEADER, 0);
            reader.read_exact(&mut buf)?;
            let len = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes")) as u64;
            let total = HEADER as u64 + len;
            if len >= FIXED as u64 && total <= left {
                buf.resize(total as usize, 0);
                reader.read_exact(&mut buf[HEADER..])?;
                record = decode(&buf);
            }
        }
        let Some(record) = record else {
            return Ok(if good_record_after(reader.get_ref(), offset + 1, size)? {
                Err(Damaged { offset })
            } else {
                Ok(ScanEnd::TornTail(offset))
            });
        };
        let total = buf.len();
        each(record, offset, total as u32);
        offset += total as u64;
    }
    Ok(Ok(ScanEnd::Clean))
}

/// Whether a good record starts at any offset in `from..size` (a damaged file is rare, and its
/// damaged part is usually short: the whole rest is read at once).
fn good_record_after(file: &File, from: u64, size: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    if from >= size {
        return Ok(false);
    }
    let mut rest = vec![0u8; (size - from) as usize];
    file.read_exact_at(&mut rest, from)?;
    let min = HEADER + FIXED;
    for at in 0..rest.len().saturating_sub(min - 1) {
        let len = u32::from_be_bytes(rest[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        if len >= FIXED
            && at + HEADER + len <= rest.len()
            && decode(&rest[at..at + HEADER + len]).is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}
