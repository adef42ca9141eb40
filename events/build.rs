//! Compiles every `proto/<topic>/events.proto` with prost-build.
//!
//! Each topic's proto must declare `package <topic>;` so the generated file is
//! `$OUT_DIR/<topic>.rs`, which `src/lib.rs` includes in `pub mod <topic>`.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let mut topics: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let dir = entry?.path();
        let file = dir.join("events.proto");
        if !file.is_file() {
            continue;
        }
        let topic = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("topic directory {} is not UTF-8", dir.display()))?
            .to_owned();
        println!("cargo:rerun-if-changed={}", dir.display());
        println!("cargo:rerun-if-changed={}", file.display());
        topics.push((topic, file));
    }
    topics.sort();
    if topics.is_empty() {
        return Err("no proto/<topic>/events.proto found".into());
    }

    let files: Vec<&PathBuf> = topics.iter().map(|(_, f)| f).collect();
    let mut config = prost_build::Config::new();
    // BTreeMap makes `map<>` fields encode in key order: the same event always has the
    // same bytes (stable tests, stable payloads for anyone hashing them).
    config.btree_map(["."]);
    config.compile_protos(&files, &[root])?;

    // A proto whose package differs from its directory would silently produce a module
    // under another name; fail the build instead.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for (topic, file) in &topics {
        let generated = out_dir.join(format!("{topic}.rs"));
        if !generated.is_file() {
            return Err(format!(
                "{} must declare `package {topic};` (expected {})",
                file.display(),
                generated.display()
            )
            .into());
        }
    }
    Ok(())
}
