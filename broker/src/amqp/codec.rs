//! Frames on the wire.
//!
//! Decoding happens in two steps, as in mini-redis: [`next_frame`] looks only at the 7-byte
//! header to decide whether a whole frame is buffered (and refuses one larger than `frame_max`
//! before any of its payload is buffered), then hands out the payload as a zero-copy `Bytes`.
//! Method payloads are parsed by `amq-protocol`, the codec generated from the spec.
//!
//! Encoding of the frames on the delivery path (`basic.deliver`, `basic.get-ok`,
//! `basic.return`, `basic.ack`/`nack`, content header and body) is written by hand: they are sent
//! once per message, the message's properties are passed through as the raw bytes the publisher
//! sent, and bodies are never re-encoded. Their output is checked against `amq-protocol`'s parser
//! in the tests below. Every other method goes through `amq-protocol`'s generator.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic::parse_properties, parse_class};
use amq_protocol::types::FieldTable;
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Type, channel and size before the payload, the end octet after it.
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may negotiate (spec: frame-min-size).
pub const FRAME_MIN_SIZE: u32 = 4096;

/// The 8 bytes a client opens with, and the only version we speak.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

const CLASS_BASIC: u16 = 60;

/// One frame cut out of the read buffer; the payload shares the buffer's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Bytes,
}

/// Why the byte stream is not a valid frame sequence. All of these are connection errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The payload announced in the header exceeds the negotiated maximum (`max` is the
    /// largest payload the negotiated frame_max allows, as RabbitMQ reports it).
    TooLarge {
        kind: u8,
        channel: u16,
        size: u64,
        max: u32,
    },
    /// The octet after the payload is not 0xCE.
    BadFrameEnd {
        kind: u8,
        channel: u16,
        payload: Bytes,
        end: u8,
    },
}

/// Cuts the next whole frame from `buf`, or returns `Ok(None)` if more bytes are needed.
/// The size check uses only the header, so an oversized frame is refused before it is read.
pub fn next_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<RawFrame>, FrameError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    // Like RabbitMQ, allow the payload itself to reach frame_max (8 bytes of slack for clients
    // that forget the frame overhead); anything larger is refused from the header alone.
    if frame_max != 0 && size as u64 > u64::from(frame_max) {
        return Err(FrameError::TooLarge {
            kind,
            channel,
            size: size as u64,
            max: frame_max.saturating_sub(FRAME_OVERHEAD as u32),
        });
    }
    let total = size + FRAME_OVERHEAD;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let end = buf[total - 1];
    let mut frame = buf.split_to(total);
    if end != FRAME_END {
        return Err(FrameError::BadFrameEnd {
            kind,
            channel,
            payload: frame.freeze().slice(7..7 + size),
            end,
        });
    }
    frame.advance(7);
    frame.truncate(size);
    Ok(Some(RawFrame {
        kind,
        channel,
        payload: frame.freeze(),
    }))
}

/// Why a method payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodError {
    /// Fewer than four bytes: not even a class and method id.
    Truncated,
    /// A class or method id that AMQP 0-9-1 does not define.
    Unknown { class_id: u16, method_id: u16 },
    /// The ids are known but the arguments do not parse.
    Syntax { class_id: u16, method_id: u16 },
    /// The arguments hold a field table nested deeper than [`MAX_TABLE_DEPTH`].
    TooDeep { class_id: u16, method_id: u16 },
}

/// Decodes a method frame's payload.
pub fn decode_method(payload: &[u8]) -> Result<AMQPClass, MethodError> {
    if payload.len() < 4 {
        return Err(MethodError::Truncated);
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    if !is_known_method(class_id, method_id) {
        return Err(MethodError::Unknown {
            class_id,
            method_id,
        });
    }
    // The generated parser recurses once per level of nesting: a hostile table would
    // overflow the stack, so its depth is checked first.
    if let Some(at) = table_offset(class_id, method_id, payload)
        && let Some(table) = payload.get(at..)
    {
        match check_table(table) {
            Ok(()) => {}
            Err(TableFault::TooDeep) => {
                return Err(MethodError::TooDeep {
                    class_id,
                    method_id,
                });
            }
            // RabbitMQ cannot decode these either (Erlang has no such floats); and
            // definitions.json could not store them. Malformed tables get the answer the
            // parser would have given.
            Err(TableFault::NotFinite | TableFault::Malformed) => {
                return Err(MethodError::Syntax {
                    class_id,
                    method_id,
                });
            }
        }
    }
    match parse_class(payload) {
        // Trailing bytes after the arguments are an error too, as in RabbitMQ.
        Ok(([], class)) => Ok(class),
        _ => Err(MethodError::Syntax {
            class_id,
            method_id,
        }),
    }
}

/// How deeply field tables and arrays may nest, the outermost table being level 1. RabbitMQ
/// sets no limit, but a parser that recurses per level (as `amq-protocol`'s does) must have
/// one. Real clients nest two or three levels (capabilities in the client properties, x-death
/// tables in an array in the headers), so 32 leaves ample room; and every table accepted must
/// be readable back from definitions.json, where a level takes two levels of JSON (the value's
/// type and its contents), a leaf up to two more, under six enclosing objects, and serde_json
/// reads 128: 32 levels take at most 6 + 2 * 32 + 2 = 72.
pub const MAX_TABLE_DEPTH: usize = 32;

/// Where the field table in a method's arguments starts, for the methods that carry one.
/// The offset may lie past the payload's end when the arguments are truncated.
fn table_offset(class_id: u16, method_id: u16, payload: &[u8]) -> Option<usize> {
    // The short strings after the reserved ticket, and whether an octet of bits follows them.
    let (strings, bits) = match (class_id, method_id) {
        (10, 10) => return Some(6), // connection.start: after the two version octets
        (10, 11) => return Some(4), // connection.start-ok: first
        (40, 10) => (2, true),
        (40, 30) | (40, 40) => (3, true),
        (50, 10) => (1, true),
        (50, 20) => (3, true),
        (50, 50) => (3, false),
        (60, 20) => (2, true),
        _ => return None,
    };
    let mut at = 6usize;
    for _ in 0..strings {
        at += 1 + *payload.get(at)? as usize;
    }
    Some(at + usize::from(bits))
}

/// Why a field table is refused before it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFault {
    /// Tables and arrays nested deeper than [`MAX_TABLE_DEPTH`].
    TooDeep,
    /// A float or double that is NaN or infinite.
    NotFinite,
    /// Not a well-formed table (an unknown field type, a length past its end). Refused by
    /// the scan itself, so that the parser never reads what the scan did not check.
    Malformed,
}

/// What a scan of a field table found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nesting {
    Within,
    Fault(TableFault),
    /// Not a well-formed table: the scan stops where a parser would.
    Malformed,
}

const TOO_DEEP: Nesting = Nesting::Fault(TableFault::TooDeep);

/// Checks the field table at the start of `bytes` (with its length prefix) for what the
/// broker refuses before parsing it. The scan neither allocates nor recurses deeper than
/// [`MAX_TABLE_DEPTH`]. Bytes that are not a table are refused too: handing them to the
/// parser would leave it to the parser to stop where the scan stopped.
pub fn check_table(bytes: &[u8]) -> Result<(), TableFault> {
    let Some(len) = bytes.get(..4) else {
        return Err(TableFault::Malformed);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    match bytes
        .get(4..4usize.saturating_add(len))
        .map(|t| scan_table(t, 1))
    {
        Some(Nesting::Within) => Ok(()),
        Some(Nesting::Fault(fault)) => Err(fault),
        Some(Nesting::Malformed) | None => Err(TableFault::Malformed),
    }
}

/// Scans the entries of a table at `depth` (without its length prefix).
fn scan_table(b: &[u8], depth: usize) -> Nesting {
    if depth > MAX_TABLE_DEPTH {
        return TOO_DEEP;
    }
    let mut at = 0;
    while at < b.len() {
        at += 1 + b[at] as usize; // the key
        if at > b.len() {
            return Nesting::Malformed;
        }
        match scan_value(b, &mut at, depth) {
            Nesting::Within => {}
            other => return other,
        }
    }
    Nesting::Within
}

/// Scans the values of an array at `depth` (without its length prefix).
fn scan_array(b: &[u8], depth: usize) -> Nesting {
    if depth > MAX_TABLE_DEPTH {
        return TOO_DEEP;
    }
    let mut at = 0;
    while at < b.len() {
        match scan_value(b, &mut at, depth) {
            Nesting::Within => {}
            other => return other,
        }
    }
    Nesting::Within
}

/// Steps over one typed value inside a table or array at `depth`, with the type letters
/// `amq-protocol` reads.
fn scan_value(b: &[u8], at: &mut usize, depth: usize) -> Nesting {
    let Some(&kind) = b.get(*at) else {
        return Nesting::Malformed;
    };
    *at += 1;
    let finite = match kind {
        b'f' => b
            .get(*at..*at + 4)
            .map(|f| f32::from_be_bytes([f[0], f[1], f[2], f[3]]).is_finite()),
        b'd' => b
            .get(*at..*at + 8)
            .and_then(|f| f.try_into().ok())
            .map(|f| f64::from_be_bytes(f).is_finite()),
        _ => None,
    };
    if finite == Some(false) {
        return Nesting::Fault(TableFault::NotFinite);
    }
    let size = match kind {
        b't' | b'b' | b'B' => 1,
        b's' | b'u' | b'U' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'l' | b'L' | b'd' | b'T' => 8,
        b'V' => 0,
        b'S' | b'x' | b'F' | b'A' => {
            let Some(len) = b.get(*at..*at + 4) else {
                return Nesting::Malformed;
            };
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let start = *at + 4;
            let Some(inner) = start.checked_add(len).and_then(|end| b.get(start..end)) else {
                return Nesting::Malformed;
            };
            *at = start + len;
            return match kind {
                b'F' => scan_table(inner, depth + 1),
                b'A' => scan_array(inner, depth + 1),
                _ => Nesting::Within,
            };
        }
        _ => return Nesting::Malformed,
    };
    *at += size;
    if *at > b.len() {
        return Nesting::Malformed;
    }
    Nesting::Within
}

fn is_known_method(class_id: u16, method_id: u16) -> bool {
    let methods: &[u16] = match class_id {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => return false,
    };
    methods.contains(&method_id)
}

/// The arguments of `basic.publish`, cut from the frame without copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishArgs {
    pub exchange: Bytes,
    pub routing_key: Bytes,
    pub mandatory: bool,
    pub immediate: bool,
}

/// Whether a method payload is `basic.publish`, the one method decoded by hand.
pub fn is_publish(payload: &[u8]) -> bool {
    payload.len() >= 4 && payload[..4] == [0, 60, 0, 40]
}

/// Whether the next buffered frame is a `basic.publish` method frame (looking only at its
/// first bytes).
pub fn peek_is_publish(buf: &[u8]) -> bool {
    buf.len() >= 11 && buf[0] == FRAME_METHOD && buf[7..11] == [0, 60, 0, 40]
}

/// Decodes `basic.publish` (ticket, exchange, routing key, flags) without allocating.
pub fn decode_publish(payload: &Bytes) -> Option<PublishArgs> {
    let mut at = 6; // class, method, reserved ticket
    let short_str = |at: &mut usize| {
        let len = *payload.get(*at)? as usize;
        let s = payload.get(*at + 1..*at + 1 + len)?;
        let s = payload.slice_ref(s);
        *at += 1 + len;
        Some(s)
    };
    let exchange = short_str(&mut at)?;
    let routing_key = short_str(&mut at)?;
    let bits = *payload.get(at)?;
    if payload.len() != at + 1 {
        return None;
    }
    Some(PublishArgs {
        exchange,
        routing_key,
        mandatory: bits & 1 != 0,
        immediate: bits & 2 != 0,
    })
}

/// A content header frame. The properties stay as the publisher encoded them
/// (`raw_properties`, what deliveries carry, so every header round-trips byte for byte); the
/// few the broker acts on are located by [`scan_properties`] without allocating, and the
/// rest are decoded only when needed.
#[derive(Debug, Clone)]
pub struct ContentHeader {
    pub class_id: u16,
    pub weight: u16,
    pub body_size: u64,
    pub raw_properties: Bytes,
    pub scan: PropertyScan,
}

/// A headers table that does not decode (an unknown field type, a length past its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedHeaders;

/// Where the properties the broker acts on are, within the raw property bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyScan {
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    /// The headers table, with its length prefix.
    pub headers: Option<std::ops::Range<usize>>,
    pub reply_to: Option<std::ops::Range<usize>>,
    pub expiration: Option<std::ops::Range<usize>>,
    pub user_id: Option<std::ops::Range<usize>>,
}

impl ContentHeader {
    /// The bytes of a located property.
    pub fn bytes(&self, at: &Option<std::ops::Range<usize>>) -> Option<&[u8]> {
        at.as_ref().map(|r| &self.raw_properties[r.clone()])
    }

    /// Every property, decoded (for the rare publish whose properties the broker rewrites).
    pub fn properties(&self) -> Option<BasicProperties> {
        match parse_properties(&self.raw_properties[..]) {
            Ok(([], p)) => Some(p),
            _ => None,
        }
    }

    /// The headers table, decoded.
    pub fn headers(&self) -> Result<Option<FieldTable>, MalformedHeaders> {
        let Some(bytes) = self.bytes(&self.scan.headers) else {
            return Ok(None);
        };
        match amq_protocol::types::parsing::parse_field_table(bytes) {
            Ok(([], table)) => Ok(Some(table)),
            _ => Err(MalformedHeaders),
        }
    }
}

/// Locates the properties in a content header's property flags and list (the 14 properties
/// of class basic, in the spec's order). `None` when the list does not match its flags, or
/// its headers table is one the broker refuses ([`check_table`]).
pub fn scan_properties(raw: &[u8]) -> Option<PropertyScan> {
    locate(raw, true)
}

/// [`scan_properties`] without walking the headers table: for the properties of a message
/// the broker already admitted, read on the way through a queue, where the headers are only
/// stepped over and never parsed.
pub fn locate_properties(raw: &[u8]) -> Option<PropertyScan> {
    locate(raw, false)
}

fn locate(raw: &[u8], check_headers: bool) -> Option<PropertyScan> {
    let flags = u16::from_be_bytes([*raw.first()?, *raw.get(1)?]);
    if flags & 0b11 != 0 {
        // Continuation bit or reserved bits: basic has no more than 14 properties.
        return None;
    }
    let mut scan = PropertyScan::default();
    let mut at = 2usize;
    let short_str = |at: &mut usize| -> Option<std::ops::Range<usize>> {
        let len = *raw.get(*at)? as usize;
        let start = *at + 1;
        if start + len > raw.len() {
            return None;
        }
        *at = start + len;
        Some(start..start + len)
    };
    for bit in (2..16).rev() {
        if flags & (1 << bit) == 0 {
            continue;
        }
        match bit {
            13 => {
                let len = u32::from_be_bytes(raw.get(at..at + 4)?.try_into().ok()?) as usize;
                let end = at.checked_add(4 + len)?;
                if end > raw.len() || (check_headers && check_table(&raw[at..end]).is_err()) {
                    return None;
                }
                scan.headers = Some(at..end);
                at = end;
            }
            12 => {
                scan.delivery_mode = Some(*raw.get(at)?);
                at += 1;
            }
            11 => {
                scan.priority = Some(*raw.get(at)?);
                at += 1;
            }
            6 => {
                raw.get(at..at + 8)?;
                at += 8;
            }
            9 => scan.reply_to = Some(short_str(&mut at)?),
            8 => scan.expiration = Some(short_str(&mut at)?),
            4 => scan.user_id = Some(short_str(&mut at)?),
            _ => {
                short_str(&mut at)?;
            }
        }
    }
    (at == raw.len()).then_some(scan)
}

/// Decodes a content header payload; `None` when it is malformed.
pub fn decode_content_header(payload: &Bytes) -> Option<ContentHeader> {
    if payload.len() < 14 {
        return None;
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let weight = u16::from_be_bytes([payload[2], payload[3]]);
    let body_size = u64::from_be_bytes(payload[4..12].try_into().ok()?);
    let raw_properties = payload.slice(12..);
    let scan = scan_properties(&raw_properties)?;
    Some(ContentHeader {
        class_id,
        weight,
        body_size,
        raw_properties,
        scan,
    })
}

/// Which of `basic.ack`, `basic.reject` and `basic.nack` a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    Ack,
    Reject,
    Nack,
}

/// A consumer's acknowledgement, decoded by hand: there is one per message (or per batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckArgs {
    pub kind: AckKind,
    pub delivery_tag: u64,
    pub multiple: bool,
    pub requeue: bool,
}

/// Decodes `basic.ack`, `basic.reject` or `basic.nack`; `None` for anything else (including a
/// malformed one, which the generic decoder then reports).
pub fn decode_ack(payload: &[u8]) -> Option<AckArgs> {
    if payload.len() != 13 || payload[..3] != [0, 60, 0] {
        return None;
    }
    let kind = match payload[3] {
        80 => AckKind::Ack,
        90 => AckKind::Reject,
        120 => AckKind::Nack,
        _ => return None,
    };
    let delivery_tag = u64::from_be_bytes(payload[4..12].try_into().ok()?);
    let bits = payload[12];
    let (multiple, requeue) = match kind {
        AckKind::Ack => (bits & 1 != 0, false),
        AckKind::Reject => (false, bits & 1 != 0),
        AckKind::Nack => (bits & 1 != 0, bits & 2 != 0),
    };
    Some(AckArgs {
        kind,
        delivery_tag,
        multiple,
        requeue,
    })
}

/// Decodes a content header's property flags and list.
pub fn decode_properties(raw: &[u8]) -> Option<BasicProperties> {
    // The scan refuses headers nested too deep for the generated parser.
    scan_properties(raw)?;
    match parse_properties(raw) {
        Ok(([], p)) => Some(p),
        _ => None,
    }
}

/// Encodes `properties` as a content header's property flags and list.
pub fn encode_properties(properties: &BasicProperties) -> Bytes {
    let ctx = WriteContext::from(Vec::with_capacity(64));
    let generate = amq_protocol::protocol::basic::gen_properties(properties);
    match generate(ctx) {
        Ok(ctx) => Bytes::from(ctx.write),
        // Writing into a Vec cannot run out of space.
        Err(_) => Bytes::from_static(&[0, 0]),
    }
}

/// Appends a method frame encoded by `amq-protocol`.
pub fn encode_method(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    let frame = AMQPFrame::Method(channel, method);
    let ctx = WriteContext::from(Vec::with_capacity(64));
    if let Ok(ctx) = gen_frame(&frame)(ctx) {
        out.extend_from_slice(&ctx.write);
    }
}

pub fn encode_heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Starts a frame and returns the offset of its size field, to be filled by [`end_frame`].
fn begin_frame(out: &mut BytesMut, kind: u8, channel: u16) -> usize {
    out.put_u8(kind);
    out.put_u16(channel);
    let at = out.len();
    out.put_u32(0);
    at
}

fn end_frame(out: &mut BytesMut, size_at: usize) {
    let size = (out.len() - size_at - 4) as u32;
    out[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

fn put_short_str(out: &mut BytesMut, s: &[u8]) {
    // Short strings come from short strings on the wire; truncate defensively.
    let bytes = &s[..s.len().min(255)];
    out.put_u8(bytes.len() as u8);
    out.put_slice(bytes);
}

/// `basic.deliver` method frame.
pub fn encode_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &[u8],
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(CLASS_BASIC);
    out.put_u16(60);
    put_short_str(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    end_frame(out, at);
}

/// `basic.get-ok` method frame.
pub fn encode_get_ok(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
    message_count: u32,
) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(CLASS_BASIC);
    out.put_u16(71);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u32(message_count);
    end_frame(out, at);
}

/// `basic.return` method frame.
pub fn encode_return(
    out: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &[u8],
    exchange: &[u8],
    routing_key: &[u8],
) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(CLASS_BASIC);
    out.put_u16(50);
    out.put_u16(reply_code);
    put_short_str(out, reply_text);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    end_frame(out, at);
}

/// `basic.ack` (a publisher confirm).
pub fn encode_ack(out: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(CLASS_BASIC);
    out.put_u16(80);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(multiple));
    end_frame(out, at);
}

/// `basic.nack` (a negative publisher confirm).
pub fn encode_nack(out: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.put_u16(CLASS_BASIC);
    out.put_u16(120);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(multiple));
    end_frame(out, at);
}

/// Content header and body frames for a message; bodies are split so that no frame exceeds
/// `frame_max`, and an empty body sends no body frame at all.
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    raw_properties: &[u8],
    body: &[u8],
    frame_max: u32,
) {
    let at = begin_frame(out, FRAME_HEADER, channel);
    out.put_u16(CLASS_BASIC);
    out.put_u16(0);
    out.put_u64(body.len() as u64);
    out.put_slice(raw_properties);
    end_frame(out, at);
    let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    out.reserve(body.len() + body.len().div_ceil(chunk) * FRAME_OVERHEAD);
    for piece in body.chunks(chunk) {
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(piece.len() as u32);
        out.put_slice(piece);
        out.put_u8(FRAME_END);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::parse_frame;
    use amq_protocol::protocol::basic;
    use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

    fn parse_all(mut bytes: &[u8]) -> Vec<AMQPFrame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (rest, frame) = parse_frame(bytes).expect("amq-protocol parses our frame");
            frames.push(frame);
            bytes = rest;
        }
        frames
    }

    #[test]
    fn deliver_matches_the_generated_codec() {
        let mut out = BytesMut::new();
        encode_deliver(&mut out, 7, b"ctag", 42, true, b"amq.topic", b"a.b");
        let frames = parse_all(&out);
        let expected = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "ctag".into(),
            delivery_tag: 42,
            redelivered: true,
            exchange: "amq.topic".into(),
            routing_key: "a.b".into(),
        }));
        assert_eq!(frames, vec![AMQPFrame::Method(7, expected)]);
    }

    #[test]
    fn get_ok_return_ack_nack_match_the_generated_codec() {
        let mut out = BytesMut::new();
        encode_get_ok(&mut out, 1, 9, false, b"", b"q", 5);
        encode_return(&mut out, 1, 312, b"NO_ROUTE", b"x", b"rk");
        encode_ack(&mut out, 2, 77, true);
        encode_nack(&mut out, 2, 78, false);
        let frames = parse_all(&out);
        assert_eq!(
            frames,
            vec![
                AMQPFrame::Method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                        delivery_tag: 9,
                        redelivered: false,
                        exchange: "".into(),
                        routing_key: "q".into(),
                        message_count: 5,
                    }))
                ),
                AMQPFrame::Method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                        reply_code: 312,
                        reply_text: "NO_ROUTE".into(),
                        exchange: "x".into(),
                        routing_key: "rk".into(),
                    }))
                ),
                AMQPFrame::Method(
                    2,
                    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: 77,
                        multiple: true,
                    }))
                ),
                AMQPFrame::Method(
                    2,
                    AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: 78,
                        multiple: false,
                        requeue: false,
                    }))
                ),
            ]
        );
    }

    #[test]
    fn publish_decodes_like_the_generated_codec() {
        let method = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "amq.direct".into(),
            routing_key: "key".into(),
            mandatory: true,
            immediate: false,
        }));
        let mut out = BytesMut::new();
        encode_method(&mut out, 1, method);
        let frame = next_frame(&mut out, 131072).unwrap().unwrap();
        assert!(is_publish(&frame.payload));
        let args = decode_publish(&frame.payload).unwrap();
        assert_eq!(&args.exchange[..], b"amq.direct");
        assert_eq!(&args.routing_key[..], b"key");
        assert!(args.mandatory && !args.immediate);
        assert_eq!(
            decode_publish(&frame.payload.slice(..frame.payload.len() - 1)),
            None
        );
    }

    #[test]
    fn content_is_split_at_frame_max_and_properties_pass_through() {
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from("k"), AMQPValue::LongInt(-5));
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers)
            .with_delivery_mode(2);
        let raw = encode_properties(&props);
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut out = BytesMut::new();
        encode_content(&mut out, 3, &raw, &body, 4096);
        let frames = parse_all(&out);
        assert_eq!(frames.len(), 1 + 3);
        match &frames[0] {
            AMQPFrame::Header(3, h) => {
                assert_eq!(h.body_size, 10_000);
                assert_eq!(h.properties, props);
            }
            other => panic!("expected a header, got {other:?}"),
        }
        let mut joined = Vec::new();
        for f in &frames[1..] {
            match f {
                AMQPFrame::Body(3, b) => {
                    assert!(b.len() + FRAME_OVERHEAD <= 4096);
                    joined.extend_from_slice(b);
                }
                other => panic!("expected a body, got {other:?}"),
            }
        }
        assert_eq!(joined, body);
    }

    #[test]
    fn property_scan_agrees_with_the_generated_decoder() {
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from("CC"), AMQPValue::LongString("k".into()));
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers.clone())
            .with_delivery_mode(2)
            .with_priority(7)
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_expiration("60000".into())
            .with_timestamp(12345)
            .with_user_id("guest".into())
            .with_cluster_id("c".into());
        let raw = encode_properties(&props);
        let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&raw);
        let h = decode_content_header(&Bytes::from(payload)).unwrap();
        assert_eq!(h.scan.delivery_mode, Some(2));
        assert_eq!(h.scan.priority, Some(7));
        assert_eq!(
            h.bytes(&h.scan.reply_to),
            Some(&b"amq.rabbitmq.reply-to"[..])
        );
        assert_eq!(h.bytes(&h.scan.expiration), Some(&b"60000"[..]));
        assert_eq!(h.bytes(&h.scan.user_id), Some(&b"guest"[..]));
        assert_eq!(h.headers(), Ok(Some(headers)));
        assert_eq!(h.properties(), Some(props));
        assert_eq!(scan_properties(&[0, 0]), Some(PropertyScan::default()));
        assert_eq!(
            scan_properties(&[0x10, 0]),
            None,
            "delivery mode flagged but missing"
        );
        assert_eq!(
            scan_properties(&[0, 0, 9]),
            None,
            "bytes after the last property"
        );
    }

    #[test]
    fn acks_decode_like_the_generated_codec() {
        let mut out = BytesMut::new();
        encode_ack(&mut out, 1, 42, true);
        encode_nack(&mut out, 1, 43, true);
        encode_method(
            &mut out,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: 44,
                requeue: true,
            })),
        );
        let mut got = Vec::new();
        while let Some(f) = next_frame(&mut out, 131072).unwrap() {
            got.push(decode_ack(&f.payload).unwrap());
        }
        assert_eq!(
            got[0],
            AckArgs {
                kind: AckKind::Ack,
                delivery_tag: 42,
                multiple: true,
                requeue: false
            }
        );
        assert_eq!(
            got[1],
            AckArgs {
                kind: AckKind::Nack,
                delivery_tag: 43,
                multiple: true,
                requeue: false
            }
        );
        assert_eq!(
            got[2],
            AckArgs {
                kind: AckKind::Reject,
                delivery_tag: 44,
                multiple: false,
                requeue: true
            }
        );
        assert_eq!(decode_ack(&[0, 60, 0, 80, 0]), None);
    }

    #[test]
    fn empty_body_sends_only_a_header() {
        let mut out = BytesMut::new();
        encode_content(&mut out, 1, &[0, 0], &[], 131072);
        assert_eq!(parse_all(&out).len(), 1);
    }

    #[test]
    fn next_frame_waits_for_a_whole_frame_then_cuts_it() {
        let mut out = BytesMut::new();
        encode_ack(&mut out, 1, 1, false);
        let whole = out.clone();
        let mut buf = BytesMut::from(&whole[..5]);
        assert_eq!(next_frame(&mut buf, 131072), Ok(None));
        buf.extend_from_slice(&whole[5..]);
        buf.extend_from_slice(&whole[..3]);
        let frame = next_frame(&mut buf, 131072).unwrap().unwrap();
        assert_eq!(frame.kind, FRAME_METHOD);
        assert_eq!(frame.channel, 1);
        assert_eq!(frame.payload.len(), whole.len() - FRAME_OVERHEAD);
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 0x0F, 0x42, 0x40][..]);
        assert_eq!(
            next_frame(&mut buf, 131072),
            Err(FrameError::TooLarge {
                kind: FRAME_BODY,
                channel: 1,
                size: 1_000_000,
                max: 131064
            })
        );
    }

    #[test]
    fn bad_frame_end_is_an_error_and_unknown_types_are_cut_like_any_frame() {
        let mut buf = BytesMut::from(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, 0xAB][..]);
        assert_eq!(
            next_frame(&mut buf, 131072),
            Err(FrameError::BadFrameEnd {
                kind: FRAME_HEARTBEAT,
                channel: 0,
                payload: Bytes::new(),
                end: 0xAB
            })
        );
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, FRAME_END][..]);
        let frame = next_frame(&mut buf, 131072).unwrap().unwrap();
        assert_eq!(frame.kind, 9);
    }

    /// A table nested `depth` levels deep (the outermost is 1): tables in tables, or arrays
    /// in arrays under the outermost table. Built in one pass, outside in.
    fn nested(depth: usize, arrays: bool) -> Vec<u8> {
        let entry = |level: usize| -> &'static [u8] {
            match (arrays, level) {
                (true, 1) => b"\x01kA",
                (true, _) => b"A",
                (false, _) => b"\x01kF",
            }
        };
        // The length each level announces: its entry's header and the level inside it.
        let mut lengths = vec![0u32; depth + 1];
        for level in (1..depth).rev() {
            lengths[level] = (entry(level).len() + 4) as u32 + lengths[level + 1];
        }
        let mut out = Vec::with_capacity(lengths[1] as usize + 4);
        for (level, length) in lengths.iter().enumerate().take(depth).skip(1) {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(entry(level));
        }
        out.extend_from_slice(&[0, 0, 0, 0]);
        out
    }

    #[test]
    fn tables_nested_past_the_limit_are_refused_without_recursing() {
        for arrays in [false, true] {
            let at = nested(MAX_TABLE_DEPTH, arrays);
            let parsed = amq_protocol::types::parsing::parse_field_table(&at[..]);
            assert!(matches!(parsed, Ok(([], _))), "a well-formed table");
            assert_eq!(check_table(&at), Ok(()));
            let too_deep = Err(TableFault::TooDeep);
            assert_eq!(check_table(&nested(MAX_TABLE_DEPTH + 1, arrays)), too_deep);
            assert_eq!(check_table(&nested(100_000, arrays)), too_deep);
            let mut declare = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
            declare.extend_from_slice(&nested(100_000, arrays));
            assert_eq!(
                decode_method(&declare),
                Err(MethodError::TooDeep {
                    class_id: 50,
                    method_id: 10
                })
            );
            let mut header = vec![0x20, 0];
            header.extend_from_slice(&nested(100_000, arrays));
            assert_eq!(scan_properties(&header), None);
            assert_eq!(decode_properties(&header), None);
            // Locating a priority steps over the headers without walking them.
            let mut header = vec![0x28, 0];
            header.extend_from_slice(&nested(100_000, arrays));
            header.push(7);
            assert_eq!(scan_properties(&header), None);
            let located = locate_properties(&header).expect("located");
            assert_eq!(located.priority, Some(7));
        }
    }

    /// The scan refuses malformed bytes itself rather than stop there and leave the rest (a
    /// sibling nested 100,000 deep) to the recursive parser.
    #[test]
    fn malformed_tables_are_refused_by_the_scan() {
        let malformed = Err(TableFault::Malformed);
        assert_eq!(check_table(&[0, 0, 0, 3, 1, b'k', b'Z']), malformed);
        assert_eq!(check_table(&[0, 0, 0, 9, 1]), malformed);
        assert_eq!(
            check_table(&[0, 0, 0, 2, 5, b'k']),
            malformed,
            "key past the end"
        );
        assert_eq!(
            check_table(&[0, 0, 0, 3, 1, b'k', b'I']),
            malformed,
            "value past the end"
        );
        assert_eq!(check_table(&[0, 0]), malformed);
        for arrays in [false, true] {
            let mut content = vec![1, b'a', b'F', 0, 0, 0, 3, 1, b'k', b'Z', 1, b'b', b'F'];
            content.extend_from_slice(&nested(100_000, arrays));
            let mut table = (content.len() as u32).to_be_bytes().to_vec();
            table.extend_from_slice(&content);
            assert_eq!(check_table(&table), malformed);
            let mut declare = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
            declare.extend_from_slice(&table);
            assert_eq!(
                decode_method(&declare),
                Err(MethodError::Syntax {
                    class_id: 50,
                    method_id: 10
                })
            );
            let mut header = vec![0x20, 0];
            header.extend_from_slice(&table);
            assert_eq!(scan_properties(&header), None);
        }
    }

    #[test]
    fn floats_that_are_not_finite_are_refused() {
        let table = |kind: u8, bytes: &[u8]| {
            let mut t = ((bytes.len() + 3) as u32).to_be_bytes().to_vec();
            t.extend_from_slice(&[1, b'n', kind]);
            t.extend_from_slice(bytes);
            t
        };
        for bad in [
            table(b'd', &f64::NAN.to_be_bytes()),
            table(b'd', &f64::INFINITY.to_be_bytes()),
            table(b'f', &f32::NEG_INFINITY.to_be_bytes()),
        ] {
            assert_eq!(check_table(&bad), Err(TableFault::NotFinite));
            let mut declare = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
            declare.extend_from_slice(&bad);
            assert_eq!(
                decode_method(&declare),
                Err(MethodError::Syntax {
                    class_id: 50,
                    method_id: 10
                })
            );
        }
        assert_eq!(check_table(&table(b'd', &1.5f64.to_be_bytes())), Ok(()));
    }

    #[test]
    fn unknown_methods_are_told_apart_from_syntax_errors() {
        assert_eq!(
            decode_method(&[0, 99, 0, 10]),
            Err(MethodError::Unknown {
                class_id: 99,
                method_id: 10
            })
        );
        assert_eq!(
            decode_method(&[0, 60, 0, 99]),
            Err(MethodError::Unknown {
                class_id: 60,
                method_id: 99
            })
        );
        // basic.qos needs 7 bytes of arguments.
        assert_eq!(
            decode_method(&[0, 60, 0, 10, 0]),
            Err(MethodError::Syntax {
                class_id: 60,
                method_id: 10
            })
        );
        assert_eq!(decode_method(&[0]), Err(MethodError::Truncated));
    }
}

#[cfg(test)]
mod properties {
    //! Property tests of the decoder: arbitrary bytes never panic it, never make it hand out
    //! a frame over the limit, and every method the generated codec encodes decodes back.
    use super::*;
    use amq_protocol::protocol::{basic, queue};
    use amq_protocol::types::FieldTable;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..4096), frame_max in 4096u32..200_000) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Each step consumes bytes or stops, so this ends.
            while let Ok(Some(frame)) = next_frame(&mut buf, frame_max) {
                prop_assert!(frame.payload.len() as u64 <= u64::from(frame_max));
                let _ = decode_method(&frame.payload);
                if let Some(h) = decode_content_header(&frame.payload) {
                    let _ = h.headers();
                    let _ = h.properties();
                }
                let _ = decode_publish(&frame.payload);
                let _ = decode_ack(&frame.payload);
            }
        }

        #[test]
        fn oversized_headers_are_refused_before_buffering(size in 200_001u32.., frame_max in 4096u32..200_000) {
            let mut buf = BytesMut::new();
            buf.put_u8(FRAME_BODY);
            buf.put_u16(1);
            buf.put_u32(size);
            let refused = matches!(next_frame(&mut buf, frame_max), Err(FrameError::TooLarge { .. }));
            prop_assert!(refused);
        }

        #[test]
        fn generated_methods_round_trip(
            name in "[a-zA-Z0-9._-]{0,255}",
            key in "[a-zA-Z0-9.#*]{0,255}",
            flags in any::<[bool; 5]>(),
            tag in any::<u64>(),
        ) {
            let methods = vec![
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: name.as_str().into(),
                    passive: flags[0],
                    durable: flags[1],
                    exclusive: flags[2],
                    auto_delete: flags[3],
                    nowait: flags[4],
                    arguments: FieldTable::default(),
                })),
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: name.as_str().into(),
                    routing_key: key.as_str().into(),
                    mandatory: flags[0],
                    immediate: flags[1],
                })),
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: tag, multiple: flags[2] })),
            ];
            for m in methods {
                let mut out = BytesMut::new();
                encode_method(&mut out, 5, m.clone());
                let frame = next_frame(&mut out, 131072).unwrap().unwrap();
                prop_assert_eq!(decode_method(&frame.payload).unwrap(), m);
            }
        }
    }
}
