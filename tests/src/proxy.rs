//! A fault-injecting TCP proxy for partition tests: it forwards connections to one address
//! until it is told to cut; then nothing more crosses it, silently, as in a network
//! partition (its connections stay open but carry nothing, new ones are accepted and carry
//! nothing), until it is told to heal, when the connections held meanwhile are closed. Between
//! two brokers, one proxy per direction stands for the network between them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy to one address, on its own thread and runtime; stopped when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where the proxy listens (127.0.0.1, an ephemeral port).
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy to `target`, forwarding from the start.
    pub fn start(target: SocketAddr) -> Self {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy's listener");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (c, w) = (cut.clone(), cuts.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("proxy listener");
                tokio::select! {
                    () = serve(listener, target, c, w) => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            cut,
            cuts,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops carrying anything, silently.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Forwards again (new connections; those held while cut are closed).
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    cut: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mut changes = cuts.subscribe();
        let cut = cut.clone();
        tokio::spawn(async move {
            if !cut.load(Ordering::SeqCst) {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::select! {
                    _ = tokio::io::copy(&mut cr, &mut sw) => return,
                    _ = tokio::io::copy(&mut sr, &mut cw) => return,
                    _ = changes.changed() => {}
                }
                // Cut: both ends held open, carrying nothing, until healed.
                hold(&cut, &mut changes).await;
                drop((cr, cw, sr, sw));
            } else {
                hold(&cut, &mut changes).await;
                drop(client);
            }
        });
    }
}

/// Waits while the proxy is cut.
async fn hold(cut: &AtomicBool, changes: &mut watch::Receiver<u64>) {
    while cut.load(Ordering::SeqCst) {
        if changes.changed().await.is_err() {
            return;
        }
    }
}
