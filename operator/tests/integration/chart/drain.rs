//! Drain on SIGTERM (chart: `gateway.shutdownDelaySeconds`, `--shutdown-delay`): a
//! replica under load through nginx is sent a real SIGTERM and no request is lost.
//!
//! How the client side learns a replica is leaving, as in a cluster: nginx asks one
//! address, the gateway Service; a kube-proxy-like balancer here spreads each new
//! connection over the ready endpoints and drops the terminating replica only a
//! propagation lag after the SIGTERM (the endpoint controller and kube-proxy are not
//! instant; established connections keep going to the replica, as conntrack does). nginx
//! retries a failed cached keep-alive connection, but a fresh connection that the
//! balancer sends to a closed port fails the request (one upstream address: no next
//! server). So a replica that closes its listener at once loses requests during the
//! lag; one that fails /readyz and keeps answering for longer than the lag loses none.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::support::gateway::{request, start_upstream};
use crate::support::nginx::Nginx;
use crate::support::operator::http_get;
use crate::support::{TestEnv, eventually, free_port, suffix};

/// How long the balancer keeps sending new connections to a terminating replica.
const PROPAGATION_LAG: Duration = Duration::from_secs(1);
/// The drain delay under test: above the lag, as the chart's default is.
const SHUTDOWN_DELAY: &str = "3s";

/// A kube-proxy-like TCP balancer: each new connection goes to the next endpoint in
/// turn; a refused connection is closed on the client at once.
struct Balancer {
    port: u16,
    endpoints: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    async fn start(endpoints: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind balancer");
        let port = listener.local_addr().expect("balancer addr").port();
        let endpoints = Arc::new(Mutex::new(endpoints));
        let table = endpoints.clone();
        tokio::spawn(async move {
            let mut turn = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                let target = {
                    let table = table.lock().expect("endpoints");
                    turn += 1;
                    table.get(turn % table.len().max(1)).cloned()
                };
                tokio::spawn(async move {
                    let Some(target) = target else { return };
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, endpoints }
    }

    fn remove(&self, endpoint: &str) {
        self.endpoints
            .lock()
            .expect("endpoints")
            .retain(|e| e != endpoint);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_gateway_under_load_through_nginx_loses_no_request() {
    let env = TestEnv::new("gw-drain").await;
    let quota =
        json!({"plan": "business", "monthlyRequests": 100_000_000, "requestsPerSecond": 1_000_000});
    let key = env.put_gateway_key(&["*"], Some(quota)).await;
    let config = env.gateway_config();

    // Replica A: the real binary, so the SIGTERM is a real signal.
    let binary = Path::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .parent()
        .expect("binary dir")
        .join("m3o-gateway-auth");
    assert!(
        binary.is_file(),
        "{} missing: `cargo build --workspace --bins` (make test does)",
        binary.display()
    );
    let (a_listen, a_ops) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut a = tokio::process::Command::new(&binary)
        .args(["--etcd-endpoints", &config.etcd_endpoints])
        .args(["--etcd-prefix", &env.etcd_prefix])
        .args(["--redis-url", &config.redis_url])
        .args(["--redis-prefix", &config.redis_prefix])
        .args(["--listen", &a_listen, "--metrics-addr", &a_ops])
        .args(["--replica-id", &format!("drain-a-{}", suffix())])
        .arg(format!("--shutdown-delay={SHUTDOWN_DELAY}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start m3o-gateway-auth");
    let ready = |ops: String| async move { http_get(&ops, "/readyz").await.map(|(code, _)| code) };
    eventually("replica A ready", Duration::from_secs(30), || async {
        (ready(a_ops.clone()).await == Some(200)).then_some(())
    })
    .await;
    let b = env.start_gateway(&config).await;

    let balancer = Balancer::start(vec![a_listen.clone(), b.addr.to_string()]).await;
    let upstream = start_upstream().await;
    let nginx = Nginx::start(&[balancer.port], upstream).await;

    // The load: eight loops (each keeps an nginx keep-alive connection to the Service busy) of requests through nginx, every status kept.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::<u16>::new()));
    let auth = format!("Bearer {}", key.key);
    let mut loops = Vec::new();
    for _ in 0..8 {
        let (stop, statuses, addr, auth) =
            (stop.clone(), statuses.clone(), nginx.addr(), auth.clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = request(&addr, "/v1/helloworld/call", &[("Authorization", &auth)]).await;
                statuses.lock().expect("statuses").push(r.status);
            }
        }));
    }
    let count = || statuses.lock().expect("statuses").len();
    eventually("load flowing", Duration::from_secs(30), || async {
        (count() >= 100).then_some(())
    })
    .await;

    let pid = a.id().expect("replica A's pid").to_string();
    let before = count();
    crate::support::cli::ok("kill", &["-TERM", &pid], None).await;
    // The readiness probe fails at once (so the endpoint leaves the Service)...
    let readyz = eventually("replica A to fail /readyz", PROPAGATION_LAG, || async {
        let code = ready(a_ops.clone()).await;
        (code != Some(200)).then_some(code)
    })
    .await;
    // ... but new connections reach it for the propagation lag.
    tokio::time::sleep(PROPAGATION_LAG).await;
    balancer.remove(&a_listen);
    let exit = tokio::time::timeout(Duration::from_secs(20), a.wait())
        .await
        .expect("replica A exits within its drain")
        .expect("replica A's status");
    assert!(exit.success(), "replica A: {exit}");
    let at_exit = count();
    eventually(
        "load flowing after A left",
        Duration::from_secs(30),
        || async { (count() >= at_exit + 100).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("load loop");
    }
    let statuses = statuses.lock().expect("statuses").clone();
    let lost: Vec<u16> = statuses.iter().copied().filter(|s| *s != 200).collect();
    println!(
        "drain: {} requests, {} during A's drain, {} not 200",
        statuses.len(),
        at_exit - before,
        lost.len()
    );
    assert!(
        at_exit - before >= 100,
        "load during the drain: {}",
        at_exit - before
    );
    assert!(lost.is_empty(), "lost requests (statuses {lost:?})");
    assert_eq!(
        readyz,
        Some(503),
        "draining, /readyz answers 503 (not a closed port)"
    );
    b.stop().await;
}
