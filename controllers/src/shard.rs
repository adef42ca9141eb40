//! Sharding by label, as Flux and Argo CD do it: `--shard-selector` is a Kubernetes
//! label selector applied to every watch, so each operator release reconciles its own
//! slice of the fleet. The objects of one customer must carry the same shard label
//! (the Customer's decides); a Subscription or ApiKey whose Customer is in another
//! shard says so in status instead of being provisioned.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::core::{Expression, Selector, SelectorExt};
use m3o_crds::Customer;

use crate::blocker::Blocker;
use crate::status::reasons;

/// A dependent (Subscription, ApiKey) may be provisioned by this shard only when its
/// Customer is in it too: a customer's objects are reconciled by one shard.
pub fn customer_gate(shard: Option<&Shard>, customer: &Customer) -> Result<(), Blocker> {
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
    selector: Selector,
}

impl Shard {
    /// Parses a label selector in the API server's syntax: comma-separated `k=v`,
    /// `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut expressions = Vec::new();
        for requirement in split_requirements(raw)? {
            expressions.push(parse_requirement(&requirement)?);
        }
        if expressions.is_empty() {
            return Err("empty label selector".into());
        }
        Ok(Self {
            raw: raw.trim().to_owned(),
            selector: Selector::from_iter(expressions),
        })
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

/// Splits on commas outside parentheses.
fn split_requirements(raw: &str) -> Result<Vec<String>, String> {
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
    Ok(parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect())
}

fn parse_requirement(r: &str) -> Result<Expression, String> {
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        let valid = !k.is_empty()
            && k.len() <= 317
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        valid
            .then(|| k.to_owned())
            .ok_or_else(|| format!("invalid label key {k:?}"))
    };
    let set = |s: &str| -> Result<Vec<String>, String> {
        let inner = s
            .trim()
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("expected (values) in {r:?}"))?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some(k) = r.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key(k)?));
    }
    if let Some((k, v)) = r.split_once("!=") {
        return Ok(Expression::NotEqual(key(k)?, v.trim().to_owned()));
    }
    if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
        return Ok(Expression::Equal(key(k)?, v.trim().to_owned()));
    }
    if let Some((k, v)) = r.split_once(" notin ") {
        return Ok(Expression::NotIn(key(k)?, set(v)?.into_iter().collect()));
    }
    if let Some((k, v)) = r.split_once(" in ") {
        return Ok(Expression::In(key(k)?, set(v)?.into_iter().collect()));
    }
    Ok(Expression::Exists(key(r)?))
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
    fn bad_selectors_are_errors() {
        for bad in ["", " , ", "k in (a", "k in a)", "bad key=1", "k notin a"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
