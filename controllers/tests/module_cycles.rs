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

/// The deepest module file of `modules` that `path` ("a/b/item") reaches.
fn deepest(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("/"))
        .find(|m| modules.contains(m))
}

/// Every `name::a::b` path in `code` that starts a path (not the tail of another one),
/// as "a/b"; `name` alone (a call or a type) counts as "".
fn paths_after<'a>(code: &'a str, name: &str) -> Vec<&'a str> {
    let needle = format!("{name}::");
    let mut out = Vec::new();
    for (at, _) in code.match_indices(&needle) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at + needle.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        out.push(rest[..end].trim_end_matches(':'));
    }
    out
}

/// The module files `code` (of `module`) imports: `crate::` and `super::` paths (and
/// their `{...}` groups), paths through a module brought into scope by `use` (by its
/// name or its `as` alias), and paths into the module's own children (`child::item`).
fn imports(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let parent = module.rsplit_once('/').map_or("", |(p, _)| p);
    let mut found = BTreeSet::new();
    // Module names in scope in this file -> the module they name.
    let mut scope: BTreeMap<String, String> = BTreeMap::new();
    for child in modules {
        let prefix = if module.is_empty() {
            String::new()
        } else {
            format!("{module}/")
        };
        if let Some(name) = child.strip_prefix(&prefix).filter(|n| !n.contains('/')) {
            scope.insert(name.to_owned(), child.clone());
        }
    }
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
            // (target, the name it is known by in this file, if it is a `use` of a module)
            let mut targets = Vec::new();
            match &group {
                Some(group) => {
                    for item in group.split(',') {
                        let (item, alias) = match item.split_once(" as ") {
                            Some((i, a)) => (i.trim(), Some(a.trim())),
                            None => (item.trim(), None),
                        };
                        let target = match item {
                            "self" => head.clone(),
                            item => format!("{head}/{}", item.replace("::", "/")),
                        };
                        let name = alias
                            .or_else(|| target.rsplit('/').next())
                            .map(str::to_owned);
                        targets.push((target, name));
                    }
                }
                None => {
                    let alias = rest[end..]
                        .trim_start()
                        .strip_prefix("as ")
                        .and_then(|a| a.split(|c: char| !(c.is_alphanumeric() || c == '_')).next());
                    let name = alias.or_else(|| head.rsplit('/').next());
                    targets.push((head.clone(), name.map(str::to_owned)));
                }
            }
            for (target, name) in targets {
                let Some(m) = deepest(&target, modules) else {
                    continue;
                };
                if let Some(name) = name.filter(|_| m == target.trim_start_matches('/')) {
                    scope.insert(name, m.clone());
                }
                if m != module {
                    found.insert(m);
                }
            }
        }
    }
    for (name, target) in &scope {
        for path in paths_after(code, name) {
            let full = format!("{target}/{}", path.replace("::", "/"));
            if let Some(m) = deepest(&full, modules).filter(|m| m != module) {
                found.insert(m);
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

/// Every module file of `controllers/src` and the module files it imports.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = BTreeMap::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut files,
    );
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    assert!(modules.contains("platform/sync") && modules.contains("apikey/plan"));
    files
        .iter()
        .filter(|(m, _)| !m.is_empty())
        .map(|(m, code)| (m.clone(), imports(m, code, &modules)))
        .collect()
}

#[test]
fn no_file_of_controllers_imports_itself_through_others() {
    let edges = import_graph();
    // The checker sees real imports (so a cycle cannot hide from it): `use` paths, paths
    // through a module brought into scope, and a parent's paths into its children.
    assert!(edges["platform/sync"].contains("platform/desired"));
    assert!(edges["apikey/reconcile"].contains("apikey/plan"));
    assert!(edges["apikey"].contains("apikey/reconcile"));
    let mut done = BTreeSet::new();
    for module in edges.keys() {
        if let Some(found) = cycle(module, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", found.join(" -> "));
        }
    }
}

/// The shared layers (the etcd config, the Postgres store) take what they need as
/// arguments: they never import a kind, or the context that wires everything.
#[test]
fn the_shared_layers_import_no_kind_and_no_context() {
    let edges = import_graph();
    let upward = |m: &str| {
        ["customer", "subscription", "apikey"]
            .iter()
            .any(|kind| m == *kind || m.starts_with(&format!("{kind}/")))
            || m == "runtime/context"
    };
    let mut found = Vec::new();
    for (module, imported) in &edges {
        if module.starts_with("platform") || module.starts_with("store") {
            found.extend(
                imported
                    .iter()
                    .filter(|m| upward(m))
                    .map(|m| format!("{module} -> {m}")),
            );
        }
    }
    assert!(found.is_empty(), "imports upward: {found:?}");
}
