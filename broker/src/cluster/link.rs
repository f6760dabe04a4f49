//! One link between two nodes: the handshake's I/O, then frames both ways until either side
//! goes (a closed socket, or nothing heard for [`SILENCE`]).
//!
//! A frame is its length (four bytes, big-endian, counting the kind byte and the payload), a
//! kind byte and the payload. Both sides send a heartbeat every [`HEARTBEAT`] so that a
//! vanished peer is noticed even when nothing else flows.

use super::handshake::{self, Hello, NONCE_LEN, PROOF_LEN, Refusal, Role};
use super::tls::{Connection, ReadHalf, WriteHalf};
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Time the whole handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each side says it is there.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the peer is taken for gone.
pub const SILENCE: Duration = Duration::from_secs(5);
/// The largest frame a node accepts: a forwarded message of the largest size a client may
/// publish (`max_message_size` is at most 512 MiB, as in RabbitMQ) with room for its
/// envelope.
pub const MAX_FRAME: usize = 513 * 1024 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Heartbeat = 0,
    /// A request for a service of the other node (see `rpc`).
    Request = 1,
    /// The answer to a request.
    Response = 2,
    /// A one-way message for a service of the other node, handled in the order sent (see
    /// [`super::Cluster::on_cast`]).
    Cast = 3,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Heartbeat),
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            3 => Some(Self::Cast),
            _ => None,
        }
    }
}

/// A frame on its way out.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Bytes,
}

/// A link whose handshake succeeded.
pub struct Established {
    pub peer: Hello,
    pub reader: ReadHalf,
    pub writer: WriteHalf,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out")]
    Timeout,
}

/// The handshake from one end: hellos both ways, admission, then the dialer's proof and, once
/// it checked out, the acceptor's. `own_nonce` says whether a nonce is one this process is
/// using on a connection it accepted: a dialer that meets its own process instance with such
/// a nonce has dialed itself; with any other it meets someone replaying its hello.
///
/// On a TLS connection the proofs are keyed with the session's keying material as well as
/// the secret, so they hold for this session only.
pub async fn handshake(
    connection: Connection,
    ours: &Hello,
    secret: &[u8],
    role: Role,
    own_nonce: impl Fn(&[u8; NONCE_LEN]) -> bool,
) -> Result<Established, LinkError> {
    let Connection {
        mut reader,
        mut writer,
        binding,
    } = connection;
    let key = handshake::bound_key(secret, binding.as_ref().map(|b| b.as_slice()));
    let secret = key.as_slice();
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        writer.write_all(&ours.encode()).await?;
        writer.flush().await?;
        let peer = read_hello(&mut reader).await?;
        match handshake::admit(ours, &peer) {
            Err(Refusal::Itself) if role == Role::Dialer && !own_nonce(&peer.nonce) => {
                return Err(Refusal::Impostor.into());
            }
            Err(Refusal::Itself) if role == Role::Acceptor => {
                // Our own dial: its end checks our nonce, so ours stays known until it hangs
                // up.
                let mut sink = [0u8; 64];
                while reader.read(&mut sink).await? > 0 {}
                return Err(Refusal::Itself.into());
            }
            other => other?,
        }
        let mut proof = [0u8; PROOF_LEN];
        match role {
            Role::Dialer => {
                writer
                    .write_all(&handshake::proof(secret, Role::Dialer, ours, &peer))
                    .await?;
                writer.flush().await?;
                reader.read_exact(&mut proof).await?;
                handshake::verify(secret, Role::Acceptor, &peer, ours, &proof)?;
            }
            Role::Acceptor => {
                reader.read_exact(&mut proof).await?;
                handshake::verify(secret, Role::Dialer, &peer, ours, &proof)?;
                writer
                    .write_all(&handshake::proof(secret, Role::Acceptor, ours, &peer))
                    .await?;
                writer.flush().await?;
            }
        }
        Ok(Established {
            peer,
            reader,
            writer,
        })
    })
    .await
    .map_err(|_| LinkError::Timeout)?
}

async fn read_hello(reader: &mut ReadHalf) -> Result<Hello, LinkError> {
    let mut fixed = [0u8; Hello::FIXED];
    reader.read_exact(&mut fixed).await?;
    let (instance, nonce) = Hello::decode_fixed(&fixed)?;
    let mut names = Vec::with_capacity(2);
    for _ in 0..2 {
        let mut len = [0u8; 2];
        reader.read_exact(&mut len).await?;
        let len = handshake::read_name_len(&len)?;
        let mut name = vec![0u8; len];
        reader.read_exact(&mut name).await?;
        names.push(handshake::decode_name(&name)?);
    }
    let cluster = names.pop().expect("two names");
    let node = names.pop().expect("two names");
    Ok(Hello {
        instance,
        nonce,
        node,
        cluster,
    })
}

/// A fresh hello for this node.
pub fn hello(instance: u64, node: &str, cluster: &str) -> Hello {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    Hello {
        instance,
        nonce,
        node: node.to_owned(),
        cluster: cluster.to_owned(),
    }
}

/// Serves an established link until it ends: frames in handed to `incoming` as they are read
/// (it must not block), frames from `outgoing` and heartbeats written by a task of its own, so
/// that a peer that stops reading stalls neither the reading nor the other links. Returns why
/// it ended: the peer silent for [`SILENCE`], a write stuck as long, a closed socket, a bad
/// frame, `outgoing` closed, or `stop`.
pub async fn run(
    link: Established,
    outgoing: mpsc::Receiver<Frame>,
    mut incoming: impl FnMut(Kind, Bytes),
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> String {
    let Established { reader, writer, .. } = link;
    // Frames are read through a buffer: under load, many small frames cost one read.
    let mut reader = tokio::io::BufReader::with_capacity(BATCH_BYTES, reader);
    let (ended, mut writer_ended) = tokio::sync::oneshot::channel::<String>();
    let writing = tokio::spawn(write_loop(writer, outgoing, ended));
    let why = loop {
        tokio::select! {
            got = tokio::time::timeout(SILENCE, read_frame(&mut reader)) => match got {
                Err(_) => break format!("nothing heard for {} s", SILENCE.as_secs()),
                Ok(Err(e)) => break e,
                // Heartbeats only say the peer is there, which the read itself showed.
                Ok(Ok((Kind::Heartbeat, _))) => {}
                Ok(Ok((kind, payload))) => incoming(kind, payload),
            },
            why = &mut writer_ended => break why.unwrap_or_else(|_| "writer ended".to_owned()),
            _ = stop.changed() => break "closed".to_owned(),
        }
    };
    writing.abort();
    why
}

async fn write_loop(
    mut writer: WriteHalf,
    mut outgoing: mpsc::Receiver<Frame>,
    ended: tokio::sync::oneshot::Sender<String>,
) {
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut buf = Vec::with_capacity(BATCH_BYTES);
    let why = loop {
        let first = tokio::select! {
            _ = beat.tick() => Frame { kind: Kind::Heartbeat, payload: Bytes::new() },
            frame = outgoing.recv() => match frame {
                Some(f) => f,
                None => break "retired".to_owned(),
            },
        };
        // Frames queued meanwhile go out in the same write: under load, many small frames
        // (forwarded messages, settlements) cost one system call.
        buf.clear();
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            if frame.payload.len() + 1 > MAX_FRAME {
                tracing::warn!(
                    bytes = frame.payload.len(),
                    "cluster frame too large to send, dropped"
                );
            } else {
                put_frame(&mut buf, frame.kind, &frame.payload);
            }
            if buf.len() < BATCH_BYTES {
                next = outgoing.try_recv().ok();
            }
        }
        if buf.is_empty() {
            continue;
        }
        // Flushed as well as written: a TLS stream may hold the tail of a write back.
        let written = async {
            writer.write_all(&buf).await?;
            writer.flush().await
        };
        match tokio::time::timeout(SILENCE, written).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break format!("write failed: {e}"),
            Err(_) => break format!("a write stuck for {} s", SILENCE.as_secs()),
        }
    };
    // Told first: closing may itself get stuck behind what the peer does not read (a TLS
    // close sends what the session still holds).
    let _ = ended.send(why);
    let _ = tokio::time::timeout(HEARTBEAT, writer.shutdown()).await;
}

/// Frames written together up to about this many bytes.
const BATCH_BYTES: usize = 256 * 1024;

async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> Result<(Kind, Bytes), String> {
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len)
        .await
        .map_err(|e| format!("read failed: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(format!("bad frame length {len}"));
    }
    let mut buf = vec![0u8; len];
    reader
        .read_exact(&mut buf)
        .await
        .map_err(|e| format!("read failed: {e}"))?;
    let kind = Kind::from_byte(buf[0]).ok_or_else(|| format!("unknown frame kind {}", buf[0]))?;
    let payload = Bytes::from(buf).slice(1..);
    Ok((kind, payload))
}

fn put_frame(buf: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    buf.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(payload);
}

/// Dials `addr` (a `host:port`, resolved now) within the handshake's time.
pub async fn dial(addr: &str) -> std::io::Result<(TcpStream, SocketAddr)> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let peer = stream.peer_addr()?;
    Ok((stream, peer))
}
