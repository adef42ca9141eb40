//! No import cycle between the files of `controllers/src` (ARCHITECTURE.md: the
//! direction is `kind -> platform/store/status -> entry types`). A file's imports are
//! the `crate::` and `super::` paths outside comments and test modules; a path names
//! the deepest module file it reaches. Edges to the crate root (`lib.rs`) are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path ("platform/sync", "" for lib.rs) -> source without comments and tests.
fn sources(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            sources(&path, &format!("{prefix}{name}/"), out);
            continue;
        }
        let Some(stem) = name.strip_suffix(".rs") else {
            continue;
        };
        let module = match stem {
            "lib" => String::new(),
            "mod" => prefix.trim_end_matches('/').to_owned(),
            stem => format!("{prefix}{stem}"),
        };
        let text = std::fs::read_to_string(&path).expect("read file");
        let code = text
            .split("#[cfg(test)]\nmod ")
            .next()
            .unwrap_or_default()
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        out.insert(module, code);
    }
}

/// The module files `code` (of `module`) imports.
fn imports(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let deepest = |path: &str| {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("/"))
            .find(|m| modules.contains(m))
    };
    let parent = module.rsplit_once('/').map_or("", |(p, _)| p);
    let mut found = BTreeSet::new();
    for (root, base) in [("crate::", ""), ("super::", parent)] {
        for (at, _) in code.match_indices(root) {
            let rest = &code[at + root.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '{'))
                .unwrap_or(rest.len());
            let path = &rest[..end];
            let (head, group) = match path.split_once('{') {
                Some((head, _)) => {
                    let group = rest[end..].split('}').next().unwrap_or_default();
                    (head, Some(format!("{}{group}", &path[head.len() + 1..])))
                }
                None => (path, None),
            };
            let head = format!("{base}/{}", head.trim_end_matches(':').replace("::", "/"));
            let mut targets = vec![head.clone()];
            for item in group.iter().flat_map(|g| g.split(',')) {
                let item = item.split(" as ").next().unwrap_or_default().trim();
                targets.push(format!("{head}/{}", item.replace("::", "/")));
            }
            for target in targets {
                if let Some(m) = deepest(&target).filter(|m| m != module) {
                    found.insert(m);
                }
            }
        }
    }
    found
}

/// A cycle through `from`, if any (depth-first).
fn cycle(
    from: &str,
    edges: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|m| m == from) {
        let mut found = path[at..].to_vec();
        found.push(from.to_owned());
        return Some(found);
    }
    if done.contains(from) {
        return None;
    }
    path.push(from.to_owned());
    for next in edges.get(from).into_iter().flatten() {
        if let Some(found) = cycle(next, edges, path, done) {
            return Some(found);
        }
    }
    path.pop();
    done.insert(from.to_owned());
    None
}

#[test]
fn no_file_of_controllers_imports_itself_through_others() {
    let mut files = BTreeMap::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut files,
    );
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    assert!(modules.contains("platform/sync") && modules.contains("apikey/plan"));
    let edges: BTreeMap<String, BTreeSet<String>> = files
        .iter()
        .filter(|(m, _)| !m.is_empty())
        .map(|(m, code)| (m.clone(), imports(m, code, &modules)))
        .collect();
    // The checker sees real imports (so a cycle cannot hide from it).
    assert!(edges["platform/sync"].contains("platform/desired"));
    assert!(edges["apikey/reconcile"].contains("apikey/plan"));
    let mut done = BTreeSet::new();
    for module in edges.keys() {
        if let Some(found) = cycle(module, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", found.join(" -> "));
        }
    }
}
