//! One link between two nodes: the handshake's I/O, then frames both ways until either side
//! goes (a closed socket, or nothing heard for [`SILENCE`]).
//!
//! A frame is its length (four bytes, big-endian, counting the kind byte and the payload), a
//! kind byte and the payload. Both sides send a heartbeat every [`HEARTBEAT`] so that a
//! vanished peer is noticed even when nothing else flows.

use super::handshake::{self, Hello, NONCE_LEN, PROOF_LEN, Refusal};
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// Time the whole handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each side says it is there.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the peer is taken for gone.
pub const SILENCE: Duration = Duration::from_secs(5);
/// The largest frame a node accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Heartbeat = 0,
    /// A request for a service of the other node (see `rpc`).
    Request = 1,
    /// The answer to a request.
    Response = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Heartbeat),
            1 => Some(Self::Request),
            2 => Some(Self::Response),
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

/// Which side opened the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Dialed,
    Accepted,
}

/// A link whose handshake succeeded.
#[derive(Debug)]
pub struct Established {
    pub peer: Hello,
    pub reader: OwnedReadHalf,
    pub writer: OwnedWriteHalf,
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

/// The handshake: hellos both ways, admission, proofs both ways.
pub async fn handshake(
    stream: TcpStream,
    ours: &Hello,
    secret: &[u8],
) -> Result<Established, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        writer.write_all(&ours.encode()).await?;
        let peer = read_hello(&mut reader).await?;
        handshake::admit(ours, &peer)?;
        writer
            .write_all(&handshake::proof(secret, ours, &peer))
            .await?;
        let mut proof = [0u8; PROOF_LEN];
        reader.read_exact(&mut proof).await?;
        handshake::verify(secret, &peer, ours, &proof)?;
        Ok(Established {
            peer,
            reader,
            writer,
        })
    })
    .await
    .map_err(|_| LinkError::Timeout)?
}

async fn read_hello(reader: &mut OwnedReadHalf) -> Result<Hello, LinkError> {
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

/// Serves an established link until it ends: heartbeats out, frames from `outgoing` out,
/// frames in handed to `incoming`. Returns why it ended.
pub async fn run(
    link: Established,
    mut outgoing: mpsc::Receiver<Frame>,
    mut incoming: impl FnMut(Kind, Bytes),
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> String {
    let Established {
        mut reader,
        mut writer,
        ..
    } = link;
    let (frames_tx, mut frames_rx) = mpsc::channel::<Result<(Kind, Bytes), String>>(64);
    // Reading on a task of its own: a read cut short by `select!` would lose its bytes.
    let read_task = tokio::spawn(async move {
        loop {
            let got = tokio::time::timeout(SILENCE, read_frame(&mut reader)).await;
            let item = match got {
                Err(_) => Err(format!("nothing heard for {} s", SILENCE.as_secs())),
                Ok(Err(e)) => Err(e),
                Ok(Ok(frame)) => Ok(frame),
            };
            let end = item.is_err();
            if frames_tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    let mut beat = tokio::time::interval(HEARTBEAT);
    let why = loop {
        tokio::select! {
            _ = beat.tick() => {
                if let Err(e) = write_frame(&mut writer, Kind::Heartbeat, &[]).await {
                    break format!("write failed: {e}");
                }
            }
            Some(frame) = outgoing.recv() => {
                if let Err(e) = write_frame(&mut writer, frame.kind, &frame.payload).await {
                    break format!("write failed: {e}");
                }
            }
            got = frames_rx.recv() => match got {
                // Heartbeats only say the peer is there, which the reader's clock has noted.
                Some(Ok((kind, payload))) => if kind != Kind::Heartbeat {
                    incoming(kind, payload)
                },
                Some(Err(why)) => break why,
                None => break "reader ended".to_owned(),
            },
            _ = stop.changed() => break "closed".to_owned(),
        }
    };
    read_task.abort();
    let _ = writer.shutdown().await;
    why
}

async fn read_frame(reader: &mut OwnedReadHalf) -> Result<(Kind, Bytes), String> {
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

async fn write_frame(
    writer: &mut OwnedWriteHalf,
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(payload);
    writer.write_all(&buf).await
}

/// Dials `addr` (a `host:port`, resolved now) within the handshake's time.
pub async fn dial(addr: &str) -> std::io::Result<(TcpStream, SocketAddr)> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let peer = stream.peer_addr()?;
    Ok((stream, peer))
}
