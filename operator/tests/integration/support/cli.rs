//! Running command-line tools (kubectl, helm) the way a user does.

use std::process::{Output, Stdio};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Runs `program args` with `stdin`, returning its output (never panics on failure).
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} on PATH (hack/env.sh puts it there): {e}"));
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    child.wait_with_output().await.expect("wait")
}

/// Standard output and error together, for assertions and failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs and asserts success; returns standard output.
pub async fn ok(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(program, args, stdin).await;
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `m3o-operator ARGS` (ignoring any DATABASE_URL of the environment), asserts that
/// it fails with exactly one line on standard error, and returns that line.
pub async fn operator_error_line<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .args(args)
        .env_remove("DATABASE_URL")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    lines[0].to_owned()
}
