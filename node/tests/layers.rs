//! The node's files are layers, and no file uses a file above it: pure cores, then the
//! shared facts, the peer calls, the api, the loops, the daemon that wires them, and the
//! in-process cluster on top. A new module must be given its place here. Inside a module's
//! directory, its files use each other without a circle too.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

/// Each top-level module of `node/src` and its layer; a module may use only modules of a
/// lower layer (so the files cannot use each other in a circle).
const LAYERS: &[(&str, u32)] = &[
    ("access", 0),
    ("config", 0),
    ("files", 0),
    ("gate", 0),
    ("http", 0),
    ("transport", 0),
    ("view", 1),
    ("recovery", 1),
    ("round", 2),
    ("facts", 3),
    ("peers", 4),
    ("api", 5),
    ("loops", 6),
    ("daemon", 7),
    ("local", 8),
];

/// The modules a source file names through `crate::`.
fn uses(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String =
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// Every source file: its top-level module, its own name in that module's directory ("mod"
/// for the module's own file), and its text.
fn walk(dir: &Path, top: Option<&str>, found: &mut Vec<(String, String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let module = top.map_or(name.clone(), str::to_string);
        if path.is_dir() {
            walk(&path, Some(&module), found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let file = if top.is_none() || name == "mod" { "mod".to_string() } else { name };
            let text = std::fs::read_to_string(&path).unwrap();
            // A file's own tests (`#[cfg(test)] mod tests`, at its end) use the file itself.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default().to_string();
            found.push((module, file, code));
        }
    }
}

/// The names that follow `prefix` in `text`.
fn after(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String =
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        out.push(name);
    }
    out
}

#[test]
fn the_files_of_a_module_use_each_other_without_a_circle() {
    let mut files = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), None, &mut files);
    let mut by_module: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (module, file, text) in files {
        by_module.entry(module).or_default().push((file, text));
    }
    let mut edges_seen = 0;
    for (module, files) in &by_module {
        let names: Vec<&str> = files.iter().map(|(f, _)| f.as_str()).collect();
        let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (file, text) in files {
            let mut to: Vec<&str> = Vec::new();
            if file == "mod" {
                // The module's own file uses a child through `use child::…`.
                for prefix in ["use ", "pub use ", "pub(crate) use "] {
                    for n in after(text, prefix) {
                        if let Some(c) = names.iter().find(|c| **c == n && **c != "mod") {
                            to.push(c);
                        }
                    }
                }
            } else {
                let crate_path = format!("crate::{module}::");
                for n in after(text, "super::").into_iter().chain(after(text, &crate_path)) {
                    to.push(names.iter().find(|c| **c == n).copied().unwrap_or("mod"));
                }
            }
            to.retain(|t| *t != file);
            edges_seen += to.len();
            edges.insert(file, to);
        }
        // Depth-first search for a circle.
        fn visit<'a>(
            n: &'a str,
            edges: &BTreeMap<&'a str, Vec<&'a str>>,
            path: &mut Vec<&'a str>,
            done: &mut Vec<&'a str>,
            module: &str,
        ) {
            if done.contains(&n) {
                return;
            }
            assert!(
                !path.contains(&n),
                "node/src/{module}: files use each other in a circle: {path:?} -> {n}"
            );
            path.push(n);
            for m in edges.get(n).into_iter().flatten() {
                visit(m, edges, path, done, module);
            }
            path.pop();
            done.push(n);
        }
        let mut done = Vec::new();
        for n in &names {
            visit(n, &edges, &mut Vec::new(), &mut done, module);
        }
    }
    assert!(edges_seen > 5, "only {edges_seen} uses inside modules found");
}

#[test]
fn no_file_uses_a_file_above_it() {
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), None, &mut files);
    let mut checked = 0;
    for (module, _, text) in &files {
        if module == "lib" || module == "main" {
            continue;
        }
        let own = *layers.get(module.as_str()).unwrap_or_else(|| {
            panic!("node/src/{module} has no layer in tests/layers.rs; give it one")
        });
        for used in uses(text) {
            if used == *module {
                continue;
            }
            let theirs = *layers
                .get(used.as_str())
                .unwrap_or_else(|| panic!("{module} uses crate::{used}, which has no layer"));
            assert!(
                theirs < own,
                "{module} (layer {own}) uses crate::{used} (layer {theirs}): only lower layers"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} uses found: is the scan still reading the sources?");
}
