//! Crash injection for tests of crash safety: `M3O_FAILPOINTS=name[,name...]` makes
//! the process abort (as a SIGKILL would) when it reaches a named point, or a task
//! end or panic (see [`is_enabled`]). Inert unless
//! the variable is set; production deployments never set it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

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
    if is_enabled(&point) {
        panic!("failpoint {point} reached");
    }
}

/// Never returns from the reconcile of one object, when `reconcile-hang=<object>` is
/// enabled: tests fill a lane with it (see [`crate::runtime::lanes`]).
pub async fn hang_for(object: &str) {
    let point = format!("reconcile-hang={object}");
    if is_enabled(&point) {
        tracing::error!(failpoint = %point, "failpoint reached: the reconcile hangs");
        std::future::pending::<()>().await;
    }
}

/// True if the failpoint `name` is enabled (for failures other than an abort, such as
/// a long-running task ending: `task-end:<task>`, `task-panic:<task>`).
pub fn is_enabled(name: &str) -> bool {
    enabled().iter().any(|p| p == name)
}

/// Aborts the process if the failpoint `name` is enabled.
pub fn hit(name: &str) {
    if is_enabled(name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}

/// Stops the whole process with SIGSTOP (a hung host: its connections stay open) the
/// first time it reaches `name`, if enabled; it goes on from here when continued.
pub fn stop_once(name: &str) {
    static STOPPED: AtomicBool = AtomicBool::new(false);
    if is_enabled(name) && !STOPPED.swap(true, Ordering::SeqCst) {
        tracing::error!(failpoint = name, "failpoint reached: stopping the process");
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &std::process::id().to_string()])
            .status();
        if let Err(err) = stopped {
            tracing::error!(%err, "failpoint: could not stop the process");
        }
    }
}
