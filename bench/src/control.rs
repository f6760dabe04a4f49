//! Plumbing shared by the producer, consumer and coordinator tasks: one-shot
//! signals (go / stop), the events tasks report back, connecting with a clear
//! error, and the bounded pipeline of client writes.
//!
//! It exists so the hot loops stay small: a stop signal that costs one atomic
//! load per message, and a pipeline that keeps at most N publishes (or acks)
//! queued inside lapin, so the client never buffers without bound.

use futures::future::BoxFuture;
use futures::stream::AbortHandle;
use lapin::{Connection, ConnectionProperties};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// How long a connection attempt may take before the run is abandoned.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing a connection may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Wall-clock nanoseconds since the Unix epoch; the timestamp carried in bodies.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A flag that is set once and can be awaited. Setting it also aborts the
/// registered streams, which is how consumers blocked on a delivery stop
/// without paying for a select per message.
#[derive(Clone, Default)]
pub struct Signal(Arc<SignalInner>);

#[derive(Default)]
struct SignalInner {
    set: AtomicBool,
    notify: Notify,
    aborts: Mutex<Vec<AbortHandle>>,
}

impl Signal {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self) {
        self.0.set.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
        let aborts = std::mem::take(&mut *self.0.aborts.lock().unwrap_or_else(|e| e.into_inner()));
        for a in aborts {
            a.abort();
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    /// Aborts `handle` when the signal is set (at once if it already is).
    pub fn abort_on_set(&self, handle: AbortHandle) {
        let mut aborts = self.0.aborts.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_set() {
            handle.abort();
        } else {
            aborts.push(handle);
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Producer,
    Consumer,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
        })
    }
}

/// What tasks tell the coordinator.
#[derive(Debug)]
pub enum Event {
    /// Connected, channel open, ready to start.
    Ready,
    /// A consumer's basic.consume-ok arrived.
    Subscribed,
    /// The task ended.
    Finished(Role, usize, Result<(), String>),
}

pub type Events = tokio::sync::mpsc::UnboundedSender<Event>;

/// Connects with a timeout; the error names the (password-masked) URI.
pub async fn connect(uri: &str, name: &str) -> Result<Connection, String> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let shown = crate::cli::redact_uri(uri);
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(uri, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("cannot connect to {shown}: {e}")),
        Err(_) => Err(format!(
            "cannot connect to {shown}: no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// Closes a connection, giving up after CLOSE_TIMEOUT (a broker that stopped
/// reading never answers; lapin's I/O thread then ends with the process).
pub async fn close(conn: &Connection) {
    let closing = conn.close(200, "warren-perf done".into());
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        tracing::debug!("closing connection failed: {e}");
    }
}

/// Client writes (publishes, acks) handed to lapin but not yet on the socket.
///
/// lapin resolves a publish future once its frames are written; awaiting each
/// one costs a round trip to lapin's I/O thread per message. The pipeline
/// polls each new future once (which queues its frames, in submission order)
/// and keeps it until written. The caller waits for the oldest (`next`) while
/// the pipeline `is_full`, which bounds what the client holds to `cap`
/// messages; waiting is left to the caller so it can give up on stop.
pub struct Pipeline<T> {
    queue: VecDeque<BoxFuture<'static, lapin::Result<T>>>,
    cap: usize,
}

impl<T> Pipeline<T> {
    pub fn new(cap: usize) -> Self {
        Self {
            queue: VecDeque::with_capacity(cap.max(1)),
            cap: cap.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.queue.len() >= self.cap
    }

    /// Queues `fut` in the client now (one poll) and moves writes that have
    /// completed to `done`. Never waits.
    pub async fn push(
        &mut self,
        mut fut: BoxFuture<'static, lapin::Result<T>>,
        done: &mut Vec<T>,
    ) -> lapin::Result<()> {
        match futures::poll!(fut.as_mut()) {
            Poll::Ready(r) => done.push(r?),
            Poll::Pending => self.queue.push_back(fut),
        }
        self.reap(done).await
    }

    /// Moves already-completed writes (from the front) to `done`.
    pub async fn reap(&mut self, done: &mut Vec<T>) -> lapin::Result<()> {
        while let Some(front) = self.queue.front_mut() {
            match futures::poll!(front.as_mut()) {
                Poll::Ready(r) => {
                    self.queue.pop_front();
                    done.push(r?);
                }
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Waits for the oldest outstanding write.
    pub async fn next(&mut self) -> Option<lapin::Result<T>> {
        Some(self.queue.pop_front()?.await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn signal_wakes_waiters_and_aborts() {
        let s = Signal::new();
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.wait().await });
        let (stream, handle) = futures::stream::abortable(futures::stream::pending::<()>());
        s.abort_on_set(handle);
        assert!(!s.is_set());
        s.set();
        waiter.await.unwrap();
        assert!(s.is_set());
        use futures::StreamExt;
        let mut stream = stream;
        assert!(stream.next().await.is_none());
        // Registering after the fact aborts at once.
        let (mut late, handle) = futures::stream::abortable(futures::stream::pending::<()>());
        s.abort_on_set(handle);
        assert!(late.next().await.is_none());
        s.wait().await;
    }

    #[tokio::test]
    async fn pipeline_bounds_outstanding_writes() {
        let mut p: Pipeline<u32> = Pipeline::new(2);
        let mut done = Vec::new();
        let (tx1, rx1) = tokio::sync::oneshot::channel::<u32>();
        let (tx2, rx2) = tokio::sync::oneshot::channel::<u32>();
        p.push(async move { Ok(rx1.await.unwrap()) }.boxed(), &mut done)
            .await
            .unwrap();
        assert_eq!(p.len(), 1);
        assert!(!p.is_full());
        // A future that completes on its first poll never occupies a slot.
        p.push(async { Ok(7) }.boxed(), &mut done).await.unwrap();
        assert_eq!(done, vec![7]);
        p.push(async move { Ok(rx2.await.unwrap()) }.boxed(), &mut done)
            .await
            .unwrap();
        assert!(p.is_full());
        tx2.send(2).unwrap();
        // The oldest is still pending, so nothing behind it is reaped.
        p.reap(&mut done).await.unwrap();
        assert_eq!(p.len(), 2);
        tx1.send(1).unwrap();
        p.reap(&mut done).await.unwrap();
        assert!(p.is_empty());
        assert_eq!(done, vec![7, 1, 2]);
        assert!(p.next().await.is_none());
    }
}
