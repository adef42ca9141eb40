//! `m3o-operator outbox list | backlog | redrive | replay`: what does not flow in the
//! event outbox, re-driving parked events, and re-publishing retained ones to a lost
//! stream. Read-only except `redrive` (rows) and `replay` (streams).

use chrono::{DateTime, Utc};
use m3o_events::outbox::EventRef;
use m3o_events::outbox::admin::{self, Redrive, StuckRow, TopicBacklog};
use serde_json::json;

use crate::cli::{OutboxCommand, OutputFormat, ReplayTarget};
use crate::startup::{self, StartupError};

pub async fn run(command: OutboxCommand) -> Result<(), StartupError> {
    let common = command.common();
    let db = startup::database(
        common.database.database_url.as_deref(),
        &common.database.database_schema,
        2,
    )
    .await?;
    let format = common.output;
    let failed =
        |what: &str, e: sqlx::Error| StartupError(format!("--database-url: {what} failed: {e}"));
    let now = Utc::now();
    let out = match &command {
        OutboxCommand::Replay { since, target, .. } => {
            let replayed = replay(&db, *since, target).await?;
            render_replay(&replayed, *since, format)
        }
        OutboxCommand::List {
            older_than, limit, ..
        } => {
            let rows = admin::stuck_rows(&db, *older_than, *limit)
                .await
                .map_err(|e| failed("listing outbox rows", e))?;
            render_list(&rows, now, format)
        }
        OutboxCommand::Backlog { .. } => {
            let topics = admin::topic_backlog(&db)
                .await
                .map_err(|e| failed("reading the outbox backlog", e))?;
            render_backlog(&topics, now, format)
        }
        OutboxCommand::Redrive { ids, all, .. } => {
            let which = if *all {
                Redrive::All
            } else {
                Redrive::Ids(ids.clone())
            };
            let mut tx = db.begin().await.map_err(|e| failed("BEGIN", e))?;
            let done = admin::redrive(&mut tx, &which)
                .await
                .map_err(|e| failed("re-driving outbox rows", e))?;
            tx.commit().await.map_err(|e| failed("COMMIT", e))?;
            let missed: Vec<uuid::Uuid> = ids
                .iter()
                .filter(|id| !done.iter().any(|r| r.id == **id))
                .copied()
                .collect();
            print!("{}", render_redrive(&done, format));
            if !missed.is_empty() {
                let missed: Vec<String> = missed.iter().map(ToString::to_string).collect();
                return Err(StartupError(format!(
                    "--id: no parked event with id {} (nothing done for it)",
                    missed.join(", ")
                )));
            }
            return Ok(());
        }
    };
    print!("{out}");
    Ok(())
}

/// What `outbox replay` re-sent: events per topic, and the seq range.
#[derive(Debug, Default)]
struct Replayed {
    per_topic: std::collections::BTreeMap<String, u64>,
    first_seq: Option<i64>,
    last_seq: Option<i64>,
}

/// Re-sends every retained event created at or after `since` to its stream, a page at
/// a time in `seq` order, with its original id and fields, while the schema's relays
/// are held back ([`m3o_events::relay::pause_relays`]): an event that is not yet
/// published follows every replayed one.
async fn replay(
    db: &sqlx::PgPool,
    since: DateTime<Utc>,
    target: &ReplayTarget,
) -> Result<Replayed, StartupError> {
    let client = startup::redis(&target.redis).await?;
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| StartupError(format!("--redis-url: {e}")))?;
    let failed =
        |what: &str, e: sqlx::Error| StartupError(format!("--database-url: {what} failed: {e}"));
    let mut paused = db
        .begin()
        .await
        .map_err(|e| failed("pausing the relays", e))?;
    m3o_events::relay::pause_relays(&mut paused)
        .await
        .map_err(|e| failed("pausing the relays", e))?;
    // Tests stop the process here: the relays held back, nothing re-sent yet.
    m3o_controllers::runtime::failpoint::stop_once("replay-relays-paused");
    let mut done = Replayed::default();
    let mut after = 0;
    loop {
        let page = admin::retained_page(&mut *paused, since, after)
            .await
            .map_err(|e| failed("reading the outbox", e))?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.event.seq;
        let mut pipe = redis::pipe();
        for row in &page {
            pipe.add_command(m3o_events::relay::xadd(
                &target.stream_prefix,
                target.stream_maxlen,
                &row.event,
                &row.payload,
                row.created_at,
            ));
        }
        pipe.query_async::<()>(&mut redis)
            .await
            .map_err(|e| StartupError(format!("--redis-url: XADD failed: {e}")))?;
        for row in &page {
            *done.per_topic.entry(row.event.topic.clone()).or_default() += 1;
        }
        done.first_seq.get_or_insert(page[0].event.seq);
        done.last_seq = Some(after);
        if (page.len() as i64) < admin::REPLAY_PAGE {
            break;
        }
    }
    // Ending the transaction lets the relays go on; its notification (sent at commit)
    // wakes them at once for what was committed meanwhile, rather than at their
    // fallback poll.
    sqlx::query("SELECT pg_notify($1, current_schema())")
        .bind(m3o_events::relay::NOTIFY_CHANNEL)
        .execute(&mut *paused)
        .await
        .map_err(|e| failed("resuming the relays", e))?;
    paused
        .commit()
        .await
        .map_err(|e| failed("resuming the relays", e))?;
    Ok(done)
}

fn render_replay(done: &Replayed, since: DateTime<Utc>, format: OutputFormat) -> String {
    let total: u64 = done.per_topic.values().sum();
    match format {
        OutputFormat::Json => format!(
            "{}\n",
            json!({
                "since": since.to_rfc3339(),
                "replayed": total,
                "topics": done.per_topic,
                "firstSeq": done.first_seq,
                "lastSeq": done.last_seq,
            })
        ),
        OutputFormat::Text => {
            let mut out = format!("replayed {total} retained events created since {since}");
            if let (Some(first), Some(last)) = (done.first_seq, done.last_seq) {
                out.push_str(&format!(" (seq {first}..={last})"));
            }
            out.push('\n');
            for (topic, n) in &done.per_topic {
                out.push_str(&format!("  {topic}: {n}\n"));
            }
            out
        }
    }
}

/// `1h2m`, `3m4s`, `5s`: how long ago `t` was, coarse enough to read at a glance.
fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn age_seconds(t: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (now - t).num_seconds().max(0)
}

/// Lays out `rows` (the first is the header) in columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn render_list(rows: &[StuckRow], now: DateTime<Utc>, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => {
            let items: Vec<_> = rows
                .iter()
                .map(|r| {
                    let mut item = event_json(&r.event);
                    item.extend([
                        ("state".into(), json!(r.state.as_str())),
                        ("attempts".into(), json!(r.attempts)),
                        ("lastError".into(), json!(r.last_error)),
                        ("createdAt".into(), json!(r.created_at)),
                        ("parkedAt".into(), json!(r.parked_at)),
                        ("ageSeconds".into(), json!(age_seconds(r.created_at, now))),
                    ]);
                    item
                })
                .collect();
            format!("{}\n", json!(items))
        }
        OutputFormat::Text if rows.is_empty() => "no parked or stuck outbox events\n".into(),
        OutputFormat::Text => {
            let header = [
                "ID",
                "SEQ",
                "TOPIC",
                "TYPE",
                "AGGREGATE",
                "STATE",
                "ATTEMPTS",
                "AGE",
                "LAST ERROR",
            ];
            let mut lines = vec![header.iter().map(|h| (*h).to_owned()).collect()];
            lines.extend(rows.iter().map(|r| {
                vec![
                    r.event.id.to_string(),
                    r.event.seq.to_string(),
                    r.event.topic.clone(),
                    r.event.event_type.clone(),
                    r.event.aggregate_id.clone(),
                    r.state.as_str().to_owned(),
                    r.attempts.to_string(),
                    age(r.created_at, now),
                    r.last_error.clone().unwrap_or_default(),
                ]
            }));
            table(&lines)
        }
    }
}

fn render_backlog(topics: &[TopicBacklog], now: DateTime<Utc>, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => {
            let items: Vec<_> = topics
                .iter()
                .map(|t| {
                    json!({
                        "topic": t.topic,
                        "pending": t.pending,
                        "oldestPendingAgeSeconds": t.oldest_pending.map(|o| age_seconds(o, now)),
                        "parked": t.parked,
                    })
                })
                .collect();
            format!("{}\n", json!(items))
        }
        OutputFormat::Text if topics.is_empty() => {
            "outbox empty: every event is published\n".into()
        }
        OutputFormat::Text => {
            let mut lines = vec![
                ["TOPIC", "PENDING", "OLDEST", "PARKED"]
                    .iter()
                    .map(|h| (*h).to_owned())
                    .collect::<Vec<_>>(),
            ];
            lines.extend(topics.iter().map(|t| {
                vec![
                    t.topic.clone(),
                    t.pending.to_string(),
                    t.oldest_pending.map_or_else(|| "-".into(), |o| age(o, now)),
                    t.parked.to_string(),
                ]
            }));
            table(&lines)
        }
    }
}

fn render_redrive(rows: &[EventRef], format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => {
            let items: Vec<_> = rows.iter().map(event_json).collect();
            format!("{}\n", json!({ "redriven": items }))
        }
        OutputFormat::Text => {
            let mut out: String = rows
                .iter()
                .map(|r| {
                    format!(
                        "re-drove {} (seq {}, {} {}, aggregate {})\n",
                        r.id, r.seq, r.topic, r.event_type, r.aggregate_id
                    )
                })
                .collect();
            out.push_str(&format!(
                "{} parked event(s) re-driven; the relay publishes them now\n",
                rows.len()
            ));
            out
        }
    }
}

/// The JSON fields naming an event, shared by every output.
fn event_json(event: &EventRef) -> serde_json::Map<String, serde_json::Value> {
    let mut item = serde_json::Map::new();
    item.extend([
        ("id".into(), json!(event.id)),
        ("seq".into(), json!(event.seq)),
        ("topic".into(), json!(event.topic)),
        ("type".into(), json!(event.event_type)),
        ("aggregate".into(), json!(event.aggregate_id)),
    ]);
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use m3o_events::outbox::admin::StuckState;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    #[test]
    fn ages_are_coarse() {
        assert_eq!(age(at(0), at(5)), "5s");
        assert_eq!(age(at(0), at(125)), "2m5s");
        assert_eq!(age(at(0), at(3 * 3600 + 120)), "3h2m");
        assert_eq!(age(at(0), at(2 * 86_400 + 3600)), "2d1h");
        assert_eq!(age(at(10), at(0)), "0s", "clock skew is not negative");
    }

    #[test]
    fn list_renders_columns_and_json() {
        let row = StuckRow {
            event: EventRef {
                id: uuid::Uuid::nil(),
                seq: 7,
                topic: "customers".into(),
                event_type: "EventTypeCreated".into(),
                aggregate_id: "c1".into(),
            },
            attempts: 3,
            last_error: Some("WRONGTYPE: Operation against a key".into()),
            created_at: at(0),
            parked_at: Some(at(1)),
            state: StuckState::Parked,
        };
        let text = render_list(std::slice::from_ref(&row), at(65), OutputFormat::Text);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  "), "{text}");
        assert!(
            lines[1].contains("  7    customers  EventTypeCreated  c1"),
            "{text}"
        );
        assert!(
            lines[1].ends_with("parked  3         1m5s  WRONGTYPE: Operation against a key"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render_list(&[row], at(65), OutputFormat::Json)).expect("json");
        assert_eq!(json[0]["state"], "parked");
        assert_eq!(json[0]["ageSeconds"], 65);
        assert_eq!(json[0]["type"], "EventTypeCreated");
    }
}
