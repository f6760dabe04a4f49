//! A bare AMQP 0-9-1 client over a raw socket, for what lapin hides or refuses to do: the
//! bytes of the handshake, malformed input, channels above `channel_max`, small frame sizes.
#![allow(dead_code)]

use super::TestBroker;
use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// A bare AMQP client: frames in, frames out, nothing hidden.
pub struct Raw {
    pub socket: TcpStream,
    buf: BytesMut,
}

#[derive(Debug, PartialEq)]
pub struct Close {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = WriteContext::from(Vec::new());
    gen_frame(frame)(ctx).expect("encodes").write
}

impl Raw {
    pub async fn connect(broker: &TestBroker) -> Self {
        let socket = TcpStream::connect(broker.addr).await.expect("connects");
        Self {
            socket,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("writes");
    }

    pub async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        let bytes = encode(&AMQPFrame::Method(channel, method));
        self.send(&bytes).await;
    }

    /// The next frame, or None when the server closed the socket.
    pub async fn frame(&mut self) -> Option<AMQPFrame> {
        loop {
            if !self.buf.is_empty() {
                let parsed = parse_frame(&self.buf[..]).map(|(rest, f)| (rest.len(), f));
                if let Ok((rest, frame)) = parsed {
                    let used = self.buf.len() - rest;
                    let _ = self.buf.split_to(used);
                    return Some(frame);
                }
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.socket.read_buf(&mut self.buf))
                    .await
                    .expect("server answers in time")
                    .unwrap_or(0);
            if n == 0 && !self.buf.is_empty() {
                // Bytes that are not a whole frame (the 8-byte protocol header reply).
                return None;
            }
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads frames until a method arrives (skipping heartbeats).
    pub async fn method(&mut self) -> Option<(u16, AMQPClass)> {
        loop {
            match self.frame().await? {
                AMQPFrame::Method(ch, m) => return Some((ch, m)),
                AMQPFrame::Heartbeat => continue,
                other => panic!("expected a method, got {other:?}"),
            }
        }
    }

    /// Whether the server closes the socket within a few seconds (answering a
    /// `connection.close` on the way, as a client would).
    pub async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.frame()).await {
                Ok(None) => return true,
                Ok(Some(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(_)),
                ))) => {
                    let close_ok = encode(&AMQPFrame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    ));
                    // The server may already be gone; that is fine.
                    let _ = self.socket.write_all(&close_ok).await;
                }
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    pub async fn start_ok(&mut self, user: &str, pass: &str, auth_failure_close: bool) {
        let mut caps = FieldTable::default();
        caps.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(auth_failure_close),
        );
        caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        let response = format!("\0{user}\0{pass}");
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(response.into_bytes()),
                locale: "en_US".into(),
            })),
        )
        .await;
    }

    /// Runs the handshake up to `connection.open-ok` and opens channel 1.
    pub async fn open(broker: &TestBroker) -> Self {
        let (mut raw, _, _) = Self::handshake(broker, None, None).await;
        raw.open_channel(1).await;
        raw
    }

    /// Runs the handshake as guest/guest on vhost `/` up to `connection.open-ok`, asking for
    /// `channel_max` and `frame_max` (`None`: the server's proposal; heartbeats off).
    /// Returns the server's `connection.start` and `connection.tune` too.
    pub async fn handshake(
        broker: &TestBroker,
        channel_max: Option<u16>,
        frame_max: Option<u32>,
    ) -> (Self, connection::Start, connection::Tune) {
        Self::handshake_in(broker, "/", channel_max, frame_max).await
    }

    /// Runs the handshake on `vhost` and opens channel 1.
    pub async fn open_in(broker: &TestBroker, vhost: &str) -> Self {
        let (mut raw, _, _) = Self::handshake_in(broker, vhost, None, None).await;
        raw.open_channel(1).await;
        raw
    }

    /// [`Raw::handshake`] on `vhost`.
    pub async fn handshake_in(
        broker: &TestBroker,
        vhost: &str,
        channel_max: Option<u16>,
        frame_max: Option<u32>,
    ) -> (Self, connection::Start, connection::Tune) {
        let mut raw = Self::connect(broker).await;
        raw.send(HEADER).await;
        let (_, start) = raw.method().await.expect("connection.start");
        let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = start else {
            panic!("expected connection.start, got {start:?}");
        };
        raw.start_ok("guest", "guest", true).await;
        let (_, tune) = raw.method().await.expect("connection.tune");
        let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = tune else {
            panic!("expected tune, got {tune:?}");
        };
        raw.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: channel_max.unwrap_or(tune.channel_max),
                frame_max: frame_max.unwrap_or(tune.frame_max),
                heartbeat: 0,
            })),
        )
        .await;
        raw.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost.into(),
            })),
        )
        .await;
        let (_, open_ok) = raw.method().await.expect("connection.open-ok");
        assert!(matches!(
            open_ok,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))
        ));
        (raw, start, tune)
    }

    pub async fn open_channel(&mut self, ch: u16) {
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        let (got_ch, ok) = self.method().await.expect("channel.open-ok");
        assert_eq!(got_ch, ch);
        assert!(matches!(
            ok,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))
        ));
    }

    /// Expects `connection.close` and answers close-ok.
    pub async fn expect_connection_close(&mut self) -> Close {
        let (ch, m) = self.method().await.expect("connection.close");
        assert_eq!(ch, 0, "connection.close comes on channel 0, got {m:?}");
        let AMQPClass::Connection(connection::AMQPMethod::Close(c)) = m else {
            panic!("expected connection.close, got {m:?}");
        };
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
        Close {
            code: c.reply_code,
            text: c.reply_text.as_str().to_owned(),
            class_id: c.class_id,
            method_id: c.method_id,
        }
    }
}
