//! Benchmark: N Customers from apply to all Ready, against the real servers of
//! `hack/env.sh`. Prints figures; asserts nothing. `make bench` runs it in release mode:
//!
//! ```text
//! hack/env.sh run -- cargo run --release -p m3o-operator --example bench_customers -- 1000
//! ```
//!
//! It starts the operator binary next to it (target/<profile>/m3o-operator) on a fresh
//! namespace, schema and prefixes, applies N Customers with 32 requests in flight,
//! and polls until every one is Ready. The operator's peak RSS comes from /proc.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use m3o_crds::Customer;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn var(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| format!("{name} is not set: run inside hack/env.sh").into())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn ready_count(api: &Api<Customer>) -> Result<usize> {
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .count())
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let ns = format!("bench-{id}");
    let client = Client::try_default().await?;
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;

    let binary = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("m3o-operator"))
        .ok_or("no target dir")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut operator = tokio::process::Command::new(&binary)
        .args([
            "run",
            "--namespace",
            &ns,
            "--database-schema",
            &format!("bench_{id}"),
        ])
        .args([
            "--stream-prefix",
            &format!("bench-{id}:"),
            "--etcd-prefix",
            &format!("/bench-{id}"),
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", var("DATABASE_URL")?)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = operator.id().ok_or("operator exited")?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let api: Api<Customer> = Api::namespaced(client, &ns);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let api = api.clone();
            async move {
                let name = format!("c-{i:05}");
                let body = serde_json::json!({
                    "apiVersion": "m3o.com/v1alpha1", "kind": "Customer",
                    "metadata": {"name": name}, "spec": {"email": format!("{name}@bench.example.com")},
                });
                if let Err(err) = api.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&body)).await {
                    eprintln!("apply {name}: {err}");
                }
            }
        })
        .await;
    let applied = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while ready_count(&api).await? < n {
        if Instant::now() > deadline {
            return Err("not all Ready within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready = started.elapsed();
    let rss = peak_rss_kib(pid);
    operator.kill().await?;

    println!("customers:               {n}");
    println!("applied in:              {:.2} s", applied.as_secs_f64());
    println!("apply to all Ready:      {:.2} s", all_ready.as_secs_f64());
    println!(
        "throughput:              {:.0} customers/s",
        n as f64 / all_ready.as_secs_f64()
    );
    println!(
        "operator peak RSS:       {} MiB",
        rss.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
    Ok(())
}
