//! `m3o-operator usage`: the billing export. Read-only, from Postgres (`usage_daily`):
//! one customer (`--customer ID`, or the Customer `-n NS NAME`) or the fleet (`--all`),
//! a period's requests by key, API or day, as text, JSON or CSV. The fleet is read in
//! keyset pages of customers and printed as it is read, so memory stays bounded.

use std::io::Write;

use m3o_controllers::store::customers;
use m3o_controllers::usage::plan;
use sqlx::PgPool;
use uuid::Uuid;

use crate::cli::{UsageArgs, UsageBy, UsageFormat};
use crate::startup::{self, StartupError};

/// One line of the export: a customer's requests for one key, API or day.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct UsageLine {
    pub customer_id: Uuid,
    pub item: String,
    pub requests: i64,
}

impl UsageBy {
    /// The column name in the output.
    pub fn column(self) -> &'static str {
        match self {
            Self::Key => "key_id",
            Self::Api => "api",
            Self::Day => "day",
        }
    }

    /// The SQL expression grouped by (text, so one keyset type serves all three).
    fn expr(self) -> &'static str {
        match self {
            Self::Key => "key_id::text",
            Self::Api => "api",
            Self::Day => "to_char(day, 'YYYY-MM-DD')",
        }
    }
}

pub async fn run(args: UsageArgs) -> Result<(), StartupError> {
    let (first, next) = plan::period_days(&args.period).ok_or_else(|| {
        StartupError(format!(
            "--period {:?}: expected YYYY-MM, e.g. 2026-12",
            args.period
        ))
    })?;
    let db = startup::database(
        args.database.database_url.as_deref(),
        &args.database.database_schema,
        2,
    )
    .await?;
    let only = match (&args.customer, &args.name) {
        (Some(id), _) => Some(*id),
        (None, Some(name)) => Some(customer_by_name(&db, args.namespace.as_deref(), name).await?),
        (None, None) => None,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let write = |e: std::io::Error| StartupError(format!("writing the export: {e}"));
    header(&mut out, args.output, args.by).map_err(write)?;
    let mut after: Option<Uuid> = None;
    let mut first_line = true;
    loop {
        let page = read_page(&db, args.by, first, next, only, after, args.page_size).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.customer_id);
        for line in &page {
            print_line(&mut out, args.output, args.by, line, first_line).map_err(write)?;
            first_line = false;
        }
        if only.is_some() {
            break;
        }
    }
    footer(&mut out, args.output).map_err(write)?;
    out.flush().map_err(write)
}

async fn customer_by_name(
    db: &PgPool,
    namespace: Option<&str>,
    name: &str,
) -> Result<Uuid, StartupError> {
    let namespace = namespace.map_or_else(context_namespace, str::to_owned);
    let namespace = namespace.as_str();
    customers::live_by_k8s_ref(db, namespace, name)
        .await
        .map_err(|e| StartupError(format!("--database-url: {e}")))?
        .map(|row| row.id)
        .ok_or_else(|| {
            StartupError(format!(
                "Customer {namespace}/{name}: no live customer record (check -n and the name)"
            ))
        })
}

/// The kubeconfig context's namespace, as kubectl uses it (read from the file only:
/// the export needs no API server), else `default`.
fn context_namespace() -> String {
    kube::config::Kubeconfig::read()
        .ok()
        .and_then(|config| {
            let current = config.current_context.clone()?;
            config
                .contexts
                .into_iter()
                .find(|c| c.name == current)?
                .context?
                .namespace
        })
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// The lines of up to `page` customers after `after` (all of `only`'s when given).
async fn read_page(
    db: &PgPool,
    by: UsageBy,
    first: chrono::NaiveDate,
    next: chrono::NaiveDate,
    only: Option<Uuid>,
    after: Option<Uuid>,
    page: i64,
) -> Result<Vec<UsageLine>, StartupError> {
    let expr = by.expr();
    let sql = format!(
        "SELECT customer_id, {expr} AS item, sum(requests)::bigint AS requests FROM usage_daily \
         WHERE day >= $1 AND day < $2 AND customer_id IN ( \
           SELECT DISTINCT customer_id FROM usage_daily \
           WHERE day >= $1 AND day < $2 AND ($3::uuid IS NULL OR customer_id = $3) \
             AND ($4::uuid IS NULL OR customer_id > $4) ORDER BY customer_id LIMIT $5) \
         GROUP BY customer_id, item ORDER BY customer_id, item"
    );
    sqlx::query_as(&sql)
        .bind(first)
        .bind(next)
        .bind(only)
        .bind(after)
        .bind(page)
        .fetch_all(db)
        .await
        .map_err(|e| StartupError(format!("--database-url: reading usage_daily: {e}")))
}

fn header(out: &mut impl Write, format: UsageFormat, by: UsageBy) -> std::io::Result<()> {
    match format {
        UsageFormat::Text => writeln!(
            out,
            "{:<36}  {:<36}  {:>12}",
            "CUSTOMER",
            by.column().to_uppercase(),
            "REQUESTS"
        ),
        UsageFormat::Csv => writeln!(out, "customer_id,{},requests", by.column()),
        UsageFormat::Json => write!(out, "["),
    }
}

fn print_line(
    out: &mut impl Write,
    format: UsageFormat,
    by: UsageBy,
    line: &UsageLine,
    first: bool,
) -> std::io::Result<()> {
    match format {
        UsageFormat::Text => writeln!(
            out,
            "{:<36}  {:<36}  {:>12}",
            line.customer_id, line.item, line.requests
        ),
        UsageFormat::Csv => writeln!(
            out,
            "{},{},{}",
            line.customer_id,
            csv_field(&line.item),
            line.requests
        ),
        UsageFormat::Json => {
            let value = serde_json::json!({
                "customerId": line.customer_id,
                by.column(): line.item,
                "requests": line.requests,
            });
            write!(out, "{}{value}", if first { "" } else { "," })
        }
    }
}

fn footer(out: &mut impl Write, format: UsageFormat) -> std::io::Result<()> {
    match format {
        UsageFormat::Json => writeln!(out, "]"),
        _ => Ok(()),
    }
}

/// A CSV field (RFC 4180): quoted when it holds a comma, quote or line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("weather"), "weather");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn lines_print_in_each_format() {
        let line = UsageLine {
            customer_id: Uuid::nil(),
            item: "weather".into(),
            requests: 7,
        };
        let mut csv = Vec::new();
        header(&mut csv, UsageFormat::Csv, UsageBy::Api).expect("header");
        print_line(&mut csv, UsageFormat::Csv, UsageBy::Api, &line, true).expect("line");
        assert_eq!(
            String::from_utf8_lossy(&csv),
            "customer_id,api,requests\n00000000-0000-0000-0000-000000000000,weather,7\n"
        );
        let mut json = Vec::new();
        header(&mut json, UsageFormat::Json, UsageBy::Day).expect("header");
        print_line(&mut json, UsageFormat::Json, UsageBy::Day, &line, true).expect("line");
        print_line(&mut json, UsageFormat::Json, UsageBy::Day, &line, false).expect("line");
        footer(&mut json, UsageFormat::Json).expect("footer");
        let parsed: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(parsed[1]["day"], "weather");
        assert_eq!(parsed[1]["requests"], 7);
    }
}
