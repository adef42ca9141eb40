//! Sharding by label, as Flux and Argo CD do it: `--shard-selector` is a Kubernetes
//! label selector applied to every watch, so each operator release reconciles its own
//! slice of the fleet. The objects of one customer must carry the same shard label
//! (the Customer's decides); a Subscription or ApiKey whose Customer is in another
//! shard says so in status instead of being provisioned.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::core::{Expression, Selector, SelectorExt};
use m3o_crds::Customer;

use crate::report::blocker::Blocker;
use crate::report::status::reasons;

/// A dependent (Subscription, ApiKey) may be provisioned by this shard only when its
/// Customer is in it too: a customer's objects are reconciled by one shard. Part of the
/// dependents' gate, [`crate::pipeline::dependent::gate`].
pub fn admits_customer(shard: Option<&Shard>, customer: &Customer) -> Result<(), Blocker> {
    match shard {
        Some(shard) if !shard.contains(customer.labels()) => Err(Blocker::new(
            reasons::CUSTOMER_IN_OTHER_SHARD,
            format!(
                "Customer {} is not in this operator's shard ({}); give this object the Customer's shard label",
                customer.name_any(),
                shard.as_str()
            ),
        )),
        _ => Ok(()),
    }
}

/// A parsed `--shard-selector`.
#[derive(Clone, Debug)]
pub struct Shard {
    raw: String,
    canonical: String,
    selector: Selector,
}

impl Shard {
    /// Parses a label selector in the API server's syntax: comma-separated `k=v`,
    /// `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (mut expressions, mut canonical) = (Vec::new(), Vec::new());
        for requirement in split_requirements(raw)? {
            let (expression, spelled) = parse_requirement(&requirement)?;
            expressions.push(expression);
            canonical.push(spelled);
        }
        if expressions.is_empty() {
            return Err("empty label selector".into());
        }
        canonical.sort();
        canonical.dedup();
        Ok(Self {
            raw: raw.trim().to_owned(),
            canonical: canonical.join(","),
            selector: Selector::from_iter(expressions),
        })
    }

    /// One spelling per selector (sorted requirements, `==` as `=`, sorted sets): what
    /// names this shard's writer fence.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// The selector as watches send it to the API server.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// True when an object with these labels belongs to this shard.
    pub fn contains(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

/// Splits on commas outside parentheses; an empty requirement is an error, as the API
/// server has it.
fn split_requirements(raw: &str) -> Result<Vec<String>, String> {
    if raw.trim().is_empty() {
        return Ok(Vec::new());
    }
    let (mut parts, mut current, mut depth) = (Vec::new(), String::new(), 0u32);
    for c in raw.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| {
            let p = p.trim();
            (!p.is_empty())
                .then(|| p.to_owned())
                .ok_or_else(|| "empty requirement (a stray comma)".to_owned())
        })
        .collect()
}

/// A label name or value segment: alphanumeric at both ends, `-_.` inside, <= 63.
fn is_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn label_key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let valid = match k.split_once('/') {
        Some((prefix, name)) => {
            prefix.len() <= 253
                && prefix.split('.').all(|part| {
                    is_name(part)
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                })
                && is_name(name)
        }
        None => is_name(k),
    };
    valid
        .then(|| k.to_owned())
        .ok_or_else(|| format!("invalid label key {k:?}"))
}

/// A label value: empty, or a name segment.
fn label_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    (v.is_empty() || is_name(v))
        .then(|| v.to_owned())
        .ok_or_else(|| format!("invalid label value {v:?}"))
}

/// One requirement, and its canonical spelling (`k=v`, `k!=v`, `k in (a,b)` with sorted
/// values, `k`, `!k`), so that spellings of one selector name one shard.
fn parse_requirement(r: &str) -> Result<(Expression, String), String> {
    let set = |s: &str| -> Result<Vec<String>, String> {
        let inner = s
            .trim()
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("expected (values) in {r:?}"))?;
        let mut values = inner
            .split(',')
            .map(|v| {
                label_value(v).and_then(|v| {
                    (!v.is_empty())
                        .then_some(v)
                        .ok_or_else(|| format!("empty value in {r:?}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        values.sort();
        values.dedup();
        Ok(values)
    };
    if let Some(k) = r.strip_prefix('!') {
        let k = label_key(k)?;
        return Ok((Expression::DoesNotExist(k.clone()), format!("!{k}")));
    }
    if let Some((k, v)) = r.split_once("!=") {
        let (k, v) = (label_key(k)?, label_value(v)?);
        return Ok((
            Expression::NotEqual(k.clone(), v.clone()),
            format!("{k}!={v}"),
        ));
    }
    if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
        let (k, v) = (label_key(k)?, label_value(v)?);
        return Ok((Expression::Equal(k.clone(), v.clone()), format!("{k}={v}")));
    }
    for (op, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((k, v)) = r.split_once(op) {
            let (k, values) = (label_key(k)?, set(v)?);
            let canonical = format!("{k}{op}({})", values.join(","));
            let values = values.into_iter().collect();
            let expression = if notin {
                Expression::NotIn(k, values)
            } else {
                Expression::In(k, values)
            };
            return Ok((expression, canonical));
        }
    }
    let k = label_key(r)?;
    Ok((Expression::Exists(k.clone()), k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let a = Shard::parse("m3o.com/shard=a").expect("parse");
        assert!(a.contains(&labels(&[("m3o.com/shard", "a")])));
        assert!(!a.contains(&labels(&[("m3o.com/shard", "b")])));
        assert!(!a.contains(&labels(&[])));
        let set = Shard::parse("m3o.com/shard in (a, b),tier!=free").expect("parse");
        assert!(set.contains(&labels(&[("m3o.com/shard", "b")])));
        assert!(!set.contains(&labels(&[("m3o.com/shard", "b"), ("tier", "free")])));
        let unlabelled = Shard::parse("!m3o.com/shard").expect("parse");
        assert!(unlabelled.contains(&labels(&[])));
        assert!(Shard::parse("m3o.com/shard notin (a)").is_ok());
        assert_eq!(a.as_str(), "m3o.com/shard=a");
    }

    #[test]
    fn spellings_of_one_selector_have_one_canonical_form() {
        let canonical = |raw: &str| Shard::parse(raw).expect(raw).canonical().to_owned();
        assert_eq!(
            canonical("k==a,tier in (b, a)"),
            canonical("tier in (a,b), k=a")
        );
        assert_ne!(canonical("k=a"), canonical("k=b"));
        assert_eq!(canonical("k=a"), "k=a");
    }

    #[test]
    fn bad_selectors_are_errors() {
        for bad in [
            "",
            " , ",
            "k in (a",
            "k in a)",
            "bad key=1",
            "k notin a",
            "k=v=w",
            "k=a b",
            "a=b,,c=d",
            "a=b,",
            "k in ()",
            "UPPER.example/k=v",
            &format!("{}=v", "k".repeat(64)),
        ] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
