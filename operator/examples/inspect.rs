//! What a platform admin (or a gateway, or a downstream service) sees of the operator's
//! output. Used by `make demo`; handy against any environment:
//!
//! ```text
//! cargo run -p m3o-operator --example inspect -- events [N]   # latest N decoded events
//! cargo run -p m3o-operator --example inspect -- config       # etcd platform config
//! cargo run -p m3o-operator --example inspect -- lookup < key # the gateway's lookup of a key
//! ```
//!
//! Reads REDIS_URL, ETCD_ENDPOINTS, M3O_STREAM_PREFIX (default `events:`) and
//! M3O_ETCD_PREFIX (default `/m3o`) from the environment.

use std::io::Read;

use m3o_events::consumer::read_all;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn env(name: &str, default: Option<&str>) -> Result<String> {
    match (std::env::var(name), default) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(d)) => Ok(d.to_owned()),
        (Err(_), None) => Err(format!("{name} is not set").into()),
    }
}

async fn events(count: usize) -> Result<()> {
    let client = redis::Client::open(env("REDIS_URL", None)?)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let key = m3o_events::stream_key(
        &env("M3O_STREAM_PREFIX", Some(m3o_events::DEFAULT_STREAM_PREFIX))?,
        m3o_events::customers::TOPIC,
    );
    let events = read_all(&mut conn, &key).await?;
    println!(
        "{key}: {} entries, latest {}",
        events.len(),
        count.min(events.len())
    );
    for e in events.iter().rev().take(count).rev() {
        let c = e.event.customer.clone().unwrap_or_default();
        let key_id = [
            e.event.generate_key.as_ref().map(|k| k.id.clone()),
            e.event.delete_key.as_ref().map(|k| k.id.clone()),
            e.event.block_key.as_ref().map(|k| k.id.clone()),
            e.event.unblock_key.as_ref().map(|k| k.id.clone()),
            e.event.key_expired.as_ref().map(|k| k.id.clone()),
            e.event.key_rotated.as_ref().map(|k| k.id.clone()),
        ]
        .into_iter()
        .flatten()
        .next();
        let tier = e
            .event
            .subscription_changed
            .as_ref()
            .map(|s| s.tier.clone());
        let detail = key_id
            .map(|k| format!(" key={k}"))
            .or(tier.map(|t| format!(" tier={t}")))
            .unwrap_or_default();
        println!(
            "  {} {:<32} customer={} {} ({}){detail}  id={}",
            e.created, e.event_type, c.id, c.email, c.status, e.id
        );
    }
    Ok(())
}

async fn etcd() -> Result<(etcd_client::Client, String)> {
    let endpoints: Vec<String> = env("ETCD_ENDPOINTS", None)?
        .split(',')
        .map(str::to_owned)
        .collect();
    let client = etcd_client::Client::connect(endpoints, None).await?;
    Ok((
        client,
        env("M3O_ETCD_PREFIX", Some("/m3o"))?
            .trim_end_matches('/')
            .to_owned(),
    ))
}

async fn config() -> Result<()> {
    let (client, prefix) = etcd().await?;
    let resp = client
        .kv_client()
        .get(
            format!("{prefix}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    println!("{prefix}/: {} keys", resp.kvs().len());
    for kv in resp.kvs() {
        println!("  {} {}", kv.key_str()?, kv.value_str()?);
    }
    Ok(())
}

/// What an API gateway does with a presented key: hash it, read the entry.
async fn lookup() -> Result<()> {
    let mut key = String::new();
    std::io::stdin().read_to_string(&mut key)?;
    let hash = m3o_controllers::apikey::secret::hash(key.trim().as_bytes());
    let (client, prefix) = etcd().await?;
    let path = format!("{prefix}/apikeys/{hash}");
    let resp = client.kv_client().get(path.clone(), None).await?;
    match resp.kvs().first() {
        Some(kv) => println!("GET {path}\n  {}", kv.value_str()?),
        None => println!("GET {path}\n  (no entry: the gateway rejects this key)"),
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("events") => events(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20)).await,
        Some("config") => config().await,
        Some("lookup") => lookup().await,
        _ => Err("usage: inspect events [N] | config | lookup < key".into()),
    };
    if let Err(err) = result {
        eprintln!("inspect: {err}");
        std::process::exit(1);
    }
}
