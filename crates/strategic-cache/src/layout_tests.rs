//! Facts about the source tree, checked as tests so that the map in `lib.rs` stays true.

use std::path::{Path, PathBuf};

/// The library's source files, relative to `src/`.
fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path.strip_prefix(base).expect("under src/").to_path_buf());
            }
        }
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&base, &base, &mut out);
    out.sort();
    out
}

/// The `# Layout` section of `lib.rs`'s documentation.
fn layout() -> String {
    let lib = include_str!("lib.rs");
    let start = lib
        .find("//! # Layout")
        .expect("lib.rs has a Layout section");
    let rest = &lib[start + 1..];
    let end = rest.find("//! # ").map_or(rest.len(), |i| i);
    rest[..end].to_owned()
}

/// Every module of the library is named in `lib.rs`'s Layout section: a file as `` `name` ``
/// (or as a linked item of it), a folder as `` `name/` ``.
#[test]
fn the_layout_names_every_module() {
    let layout = layout();
    let mut missing = Vec::new();
    for file in sources() {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let name = match stem {
            "lib" => continue,
            "mod" => format!(
                "`{}/`",
                file.parent().and_then(|p| p.to_str()).unwrap_or_default()
            ),
            _ => format!("`{stem}`"),
        };
        let linked = format!("[`{stem}`]");
        if !layout.contains(&name) && !layout.contains(&linked) {
            missing.push(file.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "not named in lib.rs's Layout: {missing:?}"
    );
}

/// No source file is longer than 700 lines before its tests (`#[cfg(test)]`).
#[test]
fn no_file_is_over_700_lines_before_its_tests() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    for file in sources() {
        let text = std::fs::read_to_string(base.join(&file)).expect("a readable source");
        let lines = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .count();
        if lines > 700 {
            long.push(format!("{} ({lines})", file.display()));
        }
    }
    assert!(long.is_empty(), "over 700 lines before the tests: {long:?}");
}
