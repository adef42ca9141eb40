//! A TCP proxy that a test can cut, to take one backend away from one operator
//! without disturbing the servers other tests share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CuttableProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    frozen: watch::Sender<u64>,
}

impl CuttableProxy {
    /// Forwards a free loopback port to `upstream` (host:port).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(0u64);
        let (flag, gen_tx, frozen_tx) = (up.clone(), generation.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(client); // refused while cut
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = gen_tx.subscribe();
                let mut freeze = frozen_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        _ = cut.changed() => return, // dropping both ends resets the connection
                        _ = freeze.changed() => {}
                    }
                    // Frozen: both ends stay open and nothing is forwarded (a half-open
                    // path, a stopped middlebox), until cut.
                    let _ = cut.changed().await;
                    drop((client, server));
                });
            }
        });
        Self {
            port,
            up,
            generation,
            frozen,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops forwarding on every open connection, keeping them open (as a hung
    /// middlebox or a half-open path would: writes are accepted, nothing answers);
    /// new connections are forwarded as before.
    pub fn freeze(&self) {
        self.frozen.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// `host:port` of a URL such as `postgres://u:p@127.0.0.1:5432/db` or `http://127.0.0.1:2379`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// `url` with its host:port replaced by the proxy's.
pub fn via(url: &str, proxy: &CuttableProxy) -> String {
    url.replacen(&host_port(url), &format!("127.0.0.1:{}", proxy.port), 1)
}
