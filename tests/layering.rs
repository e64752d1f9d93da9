//! The product's modules form layers, and no import runs back up: each top-level module
//! of `src/` may use only the modules of the layers below its own (ARCHITECTURE.md,
//! "Layers"). Read from the source itself, so a new `use crate::…` that closes a cycle
//! fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// From the bottom up; a module may use those of lower layers, and its own.
const LAYERS: &[&[&str]] = &[
    &["domain", "metrics", "shutdown", "supervise"],
    &["config", "cli"],
    &["telemetry", "templates"],
    &["store", "queue", "channels"],
    &["enrich", "batch", "outbox", "seed"],
    &["ingest", "scheduler", "worker", "hooks"],
    &["app"],
    &["api"],
    &["roles"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::name` references in `text` (in `use` lines and paths alike).
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    // `use crate::{a, b::c}`
    for (i, _) in text.match_indices("crate::{") {
        let rest = &text[i + "crate::{".len()..];
        let group = &rest[..rest.find('}').unwrap_or(rest.len())];
        for part in group.split(',') {
            let name: String = part
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn no_module_of_the_product_uses_one_of_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, names)| names.iter().map(move |n| (*n, i)))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative.components().next().expect("a component");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(&own) = layer_of.get(module.as_str()) else {
            wrong.push(format!(
                "{module}: not in a layer (add it to LAYERS and ARCHITECTURE.md)"
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read");
        for used in uses(&text) {
            if used == module {
                continue;
            }
            match layer_of.get(used.as_str()) {
                Some(&theirs) if theirs < own => {}
                Some(_) => wrong.push(format!("{} uses crate::{used}", relative.display())),
                None => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that run up or sideways:\n{}",
        wrong.join("\n")
    );
}
