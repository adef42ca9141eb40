//! The human output of `inspect`.

use std::fmt::Write as _;

use super::{Report, conditions};
use crate::admin::Section;
use crate::admin::events::Delivery;

fn compact(value: &serde_json::Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Writes a titled section: a line per item, `empty` when there is none, or why the
/// section could not be read.
fn list<T>(
    out: &mut String,
    title: &str,
    section: &Section<Vec<T>>,
    empty: &str,
    line: impl Fn(&T) -> String,
) {
    let _ = writeln!(out, "{title}");
    match section {
        Section::Read(items) if items.is_empty() => {
            let _ = writeln!(out, "  {empty}");
        }
        Section::Read(items) => {
            for item in items {
                let _ = writeln!(out, "  {}", line(item));
            }
        }
        Section::Unavailable { error } => {
            let _ = writeln!(out, "  unavailable: {error}");
        }
    }
}

/// The human output.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {}/{} (generation {})",
        r.kind,
        r.namespace,
        r.name,
        r.generation.unwrap_or_default()
    );
    let _ = writeln!(out, "  spec:   {}", compact(&r.spec));
    let mut status = r.status.clone();
    if let Some(map) = status.as_object_mut() {
        map.remove("conditions");
    }
    let _ = writeln!(out, "  status: {}", compact(&status));
    for (ty, st, reason, message) in conditions(&r.status) {
        let _ = writeln!(out, "    {ty:<15} {st:<6} {reason:<22} {message}");
    }
    list(&mut out, "postgres:", &r.postgres, "(no row)", compact);
    list(
        &mut out,
        "etcd:",
        &r.etcd,
        "(no keys derived from it)",
        |e| {
            let owner = e
                .owner
                .as_ref()
                .map(|o| format!(" ({o})"))
                .unwrap_or_default();
            let mut line = format!("{:<8} {}{owner}", e.verdict.as_str(), e.key);
            if e.verdict.is_drift() {
                let show = |v: &Option<serde_json::Value>| v.as_ref().map_or("-".into(), compact);
                let _ = write!(line, "\n           desired: {}", show(&e.desired));
                let _ = write!(line, "\n           actual:  {}", show(&e.actual));
            }
            line
        },
    );
    match &r.secret {
        Some(Section::Read(s)) => {
            let what = match (&s.recorded_key_id, &s.recorded_prefix) {
                (Some(id), Some(prefix)) => {
                    format!(" (its key hashes to the recorded hash of key {id}, {prefix}...)")
                }
                _ => String::new(),
            };
            let _ = writeln!(out, "secret:\n  {:<8} {}{what}", s.verdict.as_str(), s.name);
        }
        Some(Section::Unavailable { error }) => {
            let _ = writeln!(out, "secret:\n  unavailable: {error}");
        }
        None => {}
    }
    let title = "events on the stream (newest first):";
    list(&mut out, title, &r.stream, "(none)", |e| {
        format!(
            "{} {:<32} {}  id={}",
            e.created, e.event_type, e.detail, e.id
        )
    });
    let title = "events in the outbox (newest first):";
    list(&mut out, title, &r.outbox, "(none)", |e| {
        let state = match e.delivery {
            Delivery::Published => "published".to_owned(),
            Delivery::Pending => format!("pending (attempts {})", e.attempts),
            Delivery::Parked => format!(
                "PARKED (attempts {}): {}",
                e.attempts,
                e.last_error.as_deref().unwrap_or("")
            ),
        };
        let created = e
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        format!(
            "#{:<6} {created} {:<32} {state}  {}  id={}",
            e.seq, e.event_type, e.detail, e.id
        )
    });
    if r.problems.is_empty() {
        let _ = writeln!(out, "verdict: in sync");
    } else {
        let _ = writeln!(out, "verdict: {} problem(s)", r.problems.len());
        for p in &r.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}
