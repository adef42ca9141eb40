//! Crash injection for tests of crash safety: `M3O_FAILPOINTS=name[,name...]` makes
//! the process abort (as a SIGKILL would) when it reaches a named point. Inert unless
//! the variable is set; production deployments never set it.

use std::sync::OnceLock;

fn enabled() -> &'static [String] {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("M3O_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Panics inside the reconcile of one object, when `reconcile-panic=<object>` is
/// enabled (`<object>` as the runner names it: `Kind/namespace/name`). Tests of panic
/// containment use it: the panic must stay with that object.
pub fn panic_for(object: &str) {
    let point = format!("reconcile-panic={object}");
    if enabled().contains(&point) {
        panic!("failpoint {point} reached");
    }
}

/// Aborts the process if the failpoint `name` is enabled.
pub fn hit(name: &str) {
    if enabled().iter().any(|p| p == name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}
