//! A minimal raw AMQP 0-9-1 client, for what lapin hides or refuses to do on its own: reading
//! the server properties of `connection.start`, and opening a channel above the negotiated
//! `channel_max` (lapin refuses that client-side).

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{FieldTable, LongString};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RawConnection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConnection {
    /// Opens the socket and sends the protocol header.
    pub async fn open_socket(addr: SocketAddr) -> Self {
        let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("tcp connect in time")
            .expect("tcp connect");
        stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("send protocol header");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Performs the handshake as guest/guest on vhost `/`, asking for `channel_max`.
    /// Returns the connection, the server's `connection.start` and its `connection.tune`.
    pub async fn handshake(
        addr: SocketAddr,
        channel_max: u16,
    ) -> (Self, connection::Start, connection::Tune) {
        Self::handshake_with(addr, Some(channel_max), None).await
    }

    /// As [`RawConnection::handshake`]; `None` accepts the server's proposal. (RabbitMQ refuses
    /// a tune-ok with channel_max 0 when it proposed a limit.)
    pub async fn handshake_with(
        addr: SocketAddr,
        channel_max: Option<u16>,
        frame_max: Option<u32>,
    ) -> (Self, connection::Start, connection::Tune) {
        let mut conn = Self::open_socket(addr).await;
        let start = match conn.recv().await {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
            other => panic!("expected connection.start, got {other:?}"),
        };
        conn.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: "en_US".into(),
            })),
        )
        .await;
        let tune = match conn.recv().await {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
            other => panic!("expected connection.tune, got {other:?}"),
        };
        conn.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: channel_max.unwrap_or(tune.channel_max),
                frame_max: frame_max.unwrap_or(tune.frame_max),
                heartbeat: 0,
            })),
        )
        .await;
        conn.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        match conn.recv().await {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        (conn, start, tune)
    }

    pub async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        let frame = AMQPFrame::Method(channel, method);
        let ctx = gen_frame(&frame)(WriteContext::from(Vec::new())).expect("encode frame");
        self.stream.write_all(&ctx.write).await.expect("send frame");
    }

    /// Sends raw bytes (for content frames built by the test).
    pub async fn send_frame(&mut self, frame: AMQPFrame) {
        let ctx = gen_frame(&frame)(WriteContext::from(Vec::new())).expect("encode frame");
        self.stream.write_all(&ctx.write).await.expect("send frame");
    }

    pub async fn open_channel(&mut self, id: u16) {
        self.send_method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
    }

    /// The next frame (heartbeats skipped), within 5 seconds.
    pub async fn recv(&mut self) -> AMQPFrame {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if !self.buf.is_empty() {
                    let parsed = parse_frame(&self.buf[..]).map(|(rest, f)| (rest.len(), f));
                    match parsed {
                        Ok((rest, frame)) => {
                            let used = self.buf.len() - rest;
                            self.buf.drain(..used);
                            if matches!(frame, AMQPFrame::Heartbeat) {
                                continue;
                            }
                            return frame;
                        }
                        Err(e) if e.is_incomplete() => {}
                        Err(e) => panic!("cannot parse a frame from the server: {e:?}"),
                    }
                }
                let mut chunk = [0u8; 65536];
                let n = self.stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "server closed the socket");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("timed out waiting for a frame")
    }
}
