//! An in-process TCP proxy that adds latency, partitions silently or cuts every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ProxyState {
    /// Added before every chunk forwarded, each way.
    latency: Duration,
    /// Accept and read, but forward nothing (a silent partition: no RST, no FIN).
    partitioned: bool,
    /// Close every new connection at once, as a server that is down does.
    refusing: bool,
    /// Bumped to cut every open connection.
    generation: u64,
}

/// A TCP proxy in front of `upstream`, on a loopback port of its own, stopped on drop.
pub struct Proxy {
    addr: SocketAddr,
    state: watch::Sender<ProxyState>,
    /// Connections accepted (refused ones included: a server that is down accepts and closes).
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, rx) = watch::channel(ProxyState::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(client, upstream, rx.clone()));
            }
        });
        Proxy {
            addr,
            state,
            accepted,
            task,
        }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far, refused ones included.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// A URL of database `name` through the proxy, without TLS as `db::server_url` has it.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@{}/{name}?sslmode=disable", self.addr)
    }

    /// Adds `latency` to every chunk forwarded.
    pub fn set_latency(&self, latency: Duration) {
        self.state.send_modify(|s| s.latency = latency);
    }

    /// Starts or ends a silent partition.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.state.send_modify(|s| s.partitioned = partitioned);
    }

    /// Takes the server "down" (every open connection cut, every new one closed at once) or
    /// brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.send_modify(|s| {
            s.refusing = down;
            if down {
                s.generation += 1;
            }
        });
    }

    /// Closes every connection open now (new ones are accepted as usual).
    pub fn cut_all(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut state: watch::Receiver<ProxyState>) {
    let generation = state.borrow().generation;
    if state.borrow().refusing {
        return; // dropping the client closes it, as a server that is down would
    }
    // A partition swallows new connections too: accepted, never answered.
    while state.borrow().partitioned {
        if state.changed().await.is_err() || state.borrow().generation != generation {
            return;
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the client sees the connection closed, as with a server that is down
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut cut = state.clone();
    tokio::select! {
        _ = pump(cr, sw, state.clone()) => {}
        _ = pump(sr, cw, state.clone()) => {}
        _ = async {
            while cut.changed().await.is_ok() {
                if cut.borrow().generation != generation {
                    return;
                }
            }
        } => {}
    }
    // Dropping the halves closes both sockets.
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<ProxyState>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let now = *state.borrow_and_update();
            if now.partitioned {
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if !now.latency.is_zero() {
                tokio::time::sleep(now.latency).await;
            }
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The server address of a `postgres://` URL, for a proxy to forward to.
pub async fn upstream_of(url: &str) -> SocketAddr {
    let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    tokio::net::lookup_host(host_port)
        .await
        .unwrap()
        .next()
        .unwrap()
}
