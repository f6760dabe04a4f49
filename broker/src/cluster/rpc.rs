//! Requests and answers between nodes, over their links: what the Raft groups and, later,
//! forwarded queue operations are built on.
//!
//! A request names a service (a number the receiving node registered a handler for) and
//! carries opaque bytes; the answer comes back on the link with the request's id. A caller
//! always hears back: the answer, or that the node is unreachable (no link, or the link went
//! down with the request in flight), or that no answer came in time. Handlers run on tasks of
//! their own, so a slow one holds up nothing else on the link.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

tokio::task_local! {
    /// The link the request being handled came on.
    static REQUEST_LINK: u64;
}

/// Runs a handler's future knowing the link its request came on ([`request_link`]).
pub async fn on_link<T>(link: u64, fut: impl Future<Output = T>) -> T {
    REQUEST_LINK.scope(link, fut).await
}

/// In a handler: the id of the link the request came on (its answer goes back on it).
pub fn request_link() -> Option<u64> {
    REQUEST_LINK.try_with(|l| *l).ok()
}

/// A service's number, the same on every node.
pub type Service = u16;

/// What a handler does with a request from `from`: the answer's bytes, or why it failed.
pub type Handler = Arc<
    dyn Fn(String, Bytes) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>>
        + Send
        + Sync,
>;

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("node {0} is not reachable")]
    Unreachable(String),
    #[error("no answer from node {0} in time")]
    TimedOut(String),
    /// The other node answered that it could not do it.
    #[error("node {node}: {reason}")]
    Failed { node: String, reason: String },
    /// A request of this many bytes does not fit in a frame.
    #[error("a request of {0} bytes is too large for a cluster link")]
    TooLarge(usize),
}

/// Bytes a request adds to its body (id and service).
pub const REQUEST_HEADER: usize = 10;

/// A request on the wire: id, service, body.
pub fn encode_request(id: u64, service: Service, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(10 + body.len());
    b.put_u64(id);
    b.put_u16(service);
    b.put_slice(body);
    b.freeze()
}

pub fn decode_request(mut b: Bytes) -> Option<(u64, Service, Bytes)> {
    if b.len() < 10 {
        return None;
    }
    let id = b.get_u64();
    let service = b.get_u16();
    Some((id, service, b))
}

/// An answer on the wire: id, status (0 done, 1 failed with a UTF-8 reason), body.
pub fn encode_response(id: u64, result: &Result<Bytes, String>) -> Bytes {
    let (status, body): (u8, &[u8]) = match result {
        Ok(b) => (0, b),
        Err(reason) => (1, reason.as_bytes()),
    };
    let mut b = BytesMut::with_capacity(9 + body.len());
    b.put_u64(id);
    b.put_u8(status);
    b.put_slice(body);
    b.freeze()
}

pub fn decode_response(mut b: Bytes) -> Option<(u64, Result<Bytes, String>)> {
    if b.len() < 9 {
        return None;
    }
    let id = b.get_u64();
    let status = b.get_u8();
    Some((
        id,
        match status {
            0 => Ok(b),
            _ => Err(String::from_utf8_lossy(&b).into_owned()),
        },
    ))
}

/// The services this node serves, by number.
#[derive(Default)]
pub struct Handlers(parking_lot::RwLock<HashMap<Service, Handler>>);

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut services: Vec<Service> = self.0.read().keys().copied().collect();
        services.sort_unstable();
        f.debug_tuple("Handlers").field(&services).finish()
    }
}

impl Handlers {
    pub fn insert(&self, service: Service, handler: Handler) {
        self.0.write().insert(service, handler);
    }

    pub fn get(&self, service: Service) -> Option<Handler> {
        self.0.read().get(&service).cloned()
    }
}

/// A caller waiting for its answer: the node asked, the link the request went on (0 until
/// sent), and where the answer goes.
struct Waiting {
    node: String,
    link: u64,
    answer: tokio::sync::oneshot::Sender<Result<Bytes, RpcError>>,
}

/// Calls waiting for their answers, by id.
#[derive(Default)]
pub struct Pending {
    next: u64,
    waiting: HashMap<u64, Waiting>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl Pending {
    pub fn register(
        &mut self,
        node: &str,
    ) -> (u64, tokio::sync::oneshot::Receiver<Result<Bytes, RpcError>>) {
        self.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.insert(
            self.next,
            Waiting {
                node: node.to_owned(),
                link: 0,
                answer: tx,
            },
        );
        (self.next, rx)
    }

    /// Records the link the request `id` went on.
    pub fn sent_on(&mut self, id: u64, link: u64) {
        if let Some(w) = self.waiting.get_mut(&id) {
            w.link = link;
        }
    }

    pub fn forget(&mut self, id: u64) {
        self.waiting.remove(&id);
    }

    /// Hands an answer from `node` to its caller; answers to unknown ids (the caller gave up)
    /// or from another node than asked are dropped.
    pub fn answer(&mut self, node: &str, id: u64, result: Result<Bytes, String>) {
        if self.waiting.get(&id).is_some_and(|w| w.node == node)
            && let Some(w) = self.waiting.remove(&id)
        {
            let node = w.node;
            let _ = w
                .answer
                .send(result.map_err(|reason| RpcError::Failed { node, reason }));
        }
    }

    /// Fails every call sent on link `link`: it went down or was replaced, and answers come
    /// back on the link a request went on.
    pub fn fail_link(&mut self, link: u64) {
        let ids: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.link == link)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(w) = self.waiting.remove(&id) {
                let _ = w.answer.send(Err(RpcError::Unreachable(w.node)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_and_short_frames_are_refused() {
        let r = encode_request(7, 3, b"body");
        assert_eq!(decode_request(r), Some((7, 3, Bytes::from_static(b"body"))));
        assert_eq!(decode_request(Bytes::from_static(b"short")), None);
        for result in [
            Ok(Bytes::from_static(b"yes")),
            Err("no such group".to_owned()),
        ] {
            let r = encode_response(9, &result);
            assert_eq!(decode_response(r), Some((9, result)));
        }
        assert_eq!(decode_response(Bytes::from_static(b"12345678")), None);
    }

    #[test]
    fn answers_reach_their_caller_once_and_a_lost_link_fails_its_calls() {
        let mut p = Pending::default();
        let (a, mut rx_a) = p.register("n2");
        let (b, mut rx_b) = p.register("n3");
        let (c, mut rx_c) = p.register("n2");
        p.sent_on(a, 1);
        p.sent_on(b, 2);
        p.sent_on(c, 1);
        // From the wrong node: dropped.
        p.answer("n3", a, Ok(Bytes::from_static(b"x")));
        assert!(rx_a.try_recv().is_err());
        p.answer("n2", a, Ok(Bytes::from_static(b"x")));
        assert_eq!(rx_a.try_recv().unwrap(), Ok(Bytes::from_static(b"x")));
        p.answer("n2", a, Ok(Bytes::from_static(b"again")));
        p.answer("n3", b, Err("refused".into()));
        assert_eq!(
            rx_b.try_recv().unwrap(),
            Err(RpcError::Failed {
                node: "n3".into(),
                reason: "refused".into()
            })
        );
        p.fail_link(2);
        assert!(
            rx_c.try_recv().is_err(),
            "another link's call is left alone"
        );
        p.fail_link(1);
        assert_eq!(
            rx_c.try_recv().unwrap(),
            Err(RpcError::Unreachable("n2".into()))
        );
        let _ = c;
        assert!(p.waiting.is_empty());
    }
}
