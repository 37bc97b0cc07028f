//! The node's files are layers, and no file uses a file above it: pure cores, then the
//! shared facts, the peer calls, the api, the loops, the daemon that wires them, and the
//! in-process cluster on top. A new module must be given its place here.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

/// Each top-level module of `node/src` and its layer; a module may use only modules of a
/// lower layer (so the files cannot use each other in a circle).
const LAYERS: &[(&str, u32)] = &[
    ("access", 0),
    ("config", 0),
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

fn walk(dir: &Path, top: Option<&str>, found: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let module = top.map_or(name.clone(), str::to_string);
        if path.is_dir() {
            walk(&path, Some(&module), found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push((module, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn no_file_uses_a_file_above_it() {
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), None, &mut files);
    let mut checked = 0;
    for (module, text) in &files {
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
