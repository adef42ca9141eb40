//! The YAML fixtures of the plan and build tests, under `controllers/tests/fixtures/`:
//! each file is a list of cases, each case the objects as `kubectl apply` takes them
//! and what the decision must be.

use std::path::Path;

use serde::de::DeserializeOwned;

/// The cases of a fixture file.
pub fn cases<T: DeserializeOwned>(file: &str) -> Vec<T> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let parse = || -> Result<Vec<T>, serde_yaml::Error> {
        // `<<: *anchor` states a case as a change of another.
        let mut value: serde_yaml::Value = serde_yaml::from_str(&text)?;
        value.apply_merge()?;
        serde_yaml::from_value(value)
    };
    parse().unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// `base` with the fields of `overlay` set over it (a JSON merge patch), for a case that
/// states an object as a change of another.
pub fn merged<T: serde::Serialize + DeserializeOwned>(base: &T, overlay: &serde_json::Value) -> T {
    let mut value = serde_json::to_value(base).expect("serialisable");
    merge(&mut value, overlay);
    serde_json::from_value(value).expect("still valid after the overlay")
}

fn merge(target: &mut serde_json::Value, overlay: &serde_json::Value) {
    match (target, overlay) {
        (serde_json::Value::Object(t), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, o) => *t = o.clone(),
    }
}

/// Asserts that case `case` was blocked for `reason`, with a message containing `message`.
pub fn assert_blocked(
    case: &str,
    blocker: &crate::report::blocker::Blocker,
    reason: Option<&str>,
    message: Option<&str>,
) {
    assert_eq!(Some(blocker.reason), reason, "{case}: {}", blocker.message);
    let part = message.unwrap_or_default();
    assert!(
        blocker.message.contains(part),
        "{case}: {}",
        blocker.message
    );
}
