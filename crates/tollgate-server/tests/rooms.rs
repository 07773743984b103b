//! The server crate's rooms import one way: a file imports only from its own room or the rooms
//! listed before it in `ROOMS`, and no files import each other in a circle. ARCHITECTURE.md says
//! what lives in each room; this test keeps the layout honest.
//!
//! Imports are read from the source text: every `crate::` and `super::` path outside comments
//! and test modules, resolved to the file of the deepest module it names.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A new room goes where its imports put it, and ARCHITECTURE.md says why.
const ROOMS: [&str; 15] = [
    "http",
    "telemetry",
    "config",
    "access",
    "upstream",
    "billing",
    "payments",
    "notify",
    "state",
    "edge",
    "dataplane",
    "management",
    "console",
    "ops",
    "app",
];

/// A source file: its module path (`["access", "keys"]`) and its text.
struct Source {
    module: Vec<String>,
    text: String,
}

fn sources(src: &Path) -> BTreeMap<String, Source> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let mut module: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let name = relative.to_string_lossy().into_owned();
            found.insert(name, Source { module, text });
        }
    }
    found
}

/// The text a file's production code is made of: no comments, no test module (which clippy's
/// `items_after_test_module` keeps last in its file).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that starts with `root::` (`crate` or `super`), group imports expanded:
/// `crate::a::{b, c::D}` gives `a::b` and `a::c::D`.
fn paths_from(text: &str, root: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let needle = format!("{root}::");
    let mut at = 0;
    while let Some(offset) = text[at..].find(&needle) {
        let start = at + offset;
        at = start + needle.len();
        let preceded_by_ident = start > 0
            && (bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        if preceded_by_ident {
            continue;
        }
        let (mut paths, _) = parse_path(text, at);
        found.append(&mut paths);
    }
    found
}

/// Parses a path (and any `{...}` group) from `at`; returns the paths and where it ended.
fn parse_path(text: &str, mut at: usize) -> (Vec<Vec<String>>, usize) {
    let bytes = text.as_bytes();
    let mut prefix = Vec::new();
    loop {
        let start = at;
        while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
            at += 1;
        }
        if at > start {
            prefix.push(text[start..at].to_string());
        }
        // `a::{...}`, or a group straight after the root: `crate::{a, b}`.
        let group = if text[at..].starts_with("::{") {
            Some(3)
        } else if text[at..].starts_with('{') {
            Some(1)
        } else {
            None
        };
        if let Some(skip) = group {
            at += skip;
            let mut paths = Vec::new();
            loop {
                while at < bytes.len() && (bytes[at].is_ascii_whitespace() || bytes[at] == b',') {
                    at += 1;
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    return (paths, at + 1);
                }
                let (inner, end) = parse_path(text, at);
                for tail in inner {
                    let mut path = prefix.clone();
                    path.extend(tail.into_iter().filter(|s| s != "self"));
                    paths.push(path);
                }
                // Skip an `as alias` and anything else up to the next item.
                at = end;
                while at < bytes.len() && bytes[at] != b',' && bytes[at] != b'}' {
                    at += 1;
                }
            }
        }
        if text[at..].starts_with("::") {
            at += 2;
            continue;
        }
        return (vec![prefix], at);
    }
}

/// The modules a file declares (`pub mod keys;`).
fn children(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let name = line
                .strip_prefix("pub mod ")
                .or(line.strip_prefix("mod "))?;
            Some(name.strip_suffix(';')?.to_string())
        })
        .collect()
}

/// File → the files it imports from.
fn imports(sources: &BTreeMap<String, Source>) -> BTreeMap<String, BTreeSet<String>> {
    let by_module: BTreeMap<&[String], &str> = sources
        .iter()
        .map(|(name, s)| (s.module.as_slice(), name.as_str()))
        .collect();
    let resolve = |path: &[String]| -> Option<&str> {
        (0..=path.len())
            .rev()
            .find_map(|n| by_module.get(&path[..n]).copied())
    };
    let mut graph = BTreeMap::new();
    for (name, source) in sources {
        let code = code(&source.text);
        let mut targets = BTreeSet::new();
        for path in paths_from(&code, "crate") {
            targets.extend(resolve(&path));
        }
        // `super` is the parent of the file's module (of a `mod.rs`, its directory's parent).
        let parent = &source.module[..source.module.len().saturating_sub(1)];
        for path in paths_from(&code, "super") {
            let full: Vec<String> = parent.iter().cloned().chain(path).collect();
            targets.extend(resolve(&full));
        }
        // A `mod.rs` reaches its children by their bare names (`accounts::router()`).
        for child in children(&code) {
            for path in paths_from(&code, &child) {
                let full: Vec<String> = source
                    .module
                    .iter()
                    .cloned()
                    .chain([child.clone()])
                    .chain(path)
                    .collect();
                targets.extend(resolve(&full));
            }
        }
        targets.remove(name.as_str());
        let targets = targets.into_iter().map(str::to_string).collect();
        graph.insert(name.clone(), targets);
    }
    graph
}

/// What breaks the rule: an import from a higher room, a room not in `ROOMS`, a circle.
fn violations(sources: &BTreeMap<String, Source>, rooms: &[&str]) -> Vec<String> {
    let rank = |name: &str| -> Option<usize> {
        let room = sources[name].module.first()?;
        rooms.iter().position(|r| r == room)
    };
    let mut found = Vec::new();
    for (name, source) in sources {
        if let Some(room) = source.module.first() {
            if !rooms.contains(&room.as_str()) {
                found.push(format!("{name}: the room `{room}` is not in ROOMS"));
            }
        }
    }
    let mut graph = imports(sources);
    // The crate root declares the rooms and re-exports for other crates; it is no room's import.
    graph.remove("lib.rs");
    for (from, targets) in &graph {
        for to in targets {
            if to == "lib.rs" {
                found.push(format!(
                    "{from} imports a re-export of lib.rs: import it from its room"
                ));
                continue;
            }
            if let (Some(a), Some(b)) = (rank(from), rank(to)) {
                if b > a {
                    found.push(format!(
                        "{from} imports {to}: `{}` is above `{}`",
                        rooms[b], rooms[a]
                    ));
                }
            }
        }
    }
    found.extend(circle(&graph).map(|c| format!("import circle: {}", c.join(" → "))));
    found
}

/// One circle in the graph, if there is any.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|n| n == node).unwrap();
                let mut circle = stack[from..].to_vec();
                circle.push(node.to_string());
                return Some(circle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, marks, stack) {
                return Some(circle);
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn rooms_import_one_way_and_files_import_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let sources = sources(&src);
    assert!(sources.len() > ROOMS.len(), "no sources under {src:?}");
    let found = violations(&sources, &ROOMS);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn every_room_opens_with_what_lives_there() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for room in ROOMS {
        let file = [format!("{room}/mod.rs"), format!("{room}.rs")]
            .into_iter()
            .map(|f| src.join(f))
            .find(|f| f.exists())
            .unwrap_or_else(|| panic!("ROOMS names `{room}`, which has no file"));
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("//! "),
            "{} must open with a `//!` sentence on what lives there and what must not",
            file.display()
        );
    }
}

/// The checker itself: it finds an import from a higher room, a circle, and an unplaced room,
/// and passes a layout that keeps the rule.
#[test]
fn the_check_finds_an_upward_import_and_a_circle() {
    let tree = |files: &[(&str, &str)]| -> BTreeMap<String, Source> {
        files
            .iter()
            .map(|(name, text)| {
                let mut module: Vec<String> = name
                    .trim_end_matches(".rs")
                    .split('/')
                    .map(str::to_string)
                    .collect();
                if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                    module.pop();
                }
                let source = Source {
                    module,
                    text: text.to_string(),
                };
                (name.to_string(), source)
            })
            .collect()
    };
    let rooms = ["low", "high"];
    let fine = tree(&[
        ("lib.rs", "pub mod low;\npub mod high;"),
        ("low/mod.rs", "pub mod a;\npub mod b;"),
        ("low/a.rs", "use crate::low::b::Thing;"),
        (
            "low/b.rs",
            "pub struct Thing;\n#[cfg(test)]\nmod tests {\n    use crate::high::Up;\n}",
        ),
        (
            "high.rs",
            "use crate::low::{a, b::Thing};\nuse crate::{low};\n// crate::nowhere::X in a comment",
        ),
    ]);
    assert_eq!(violations(&fine, &rooms), Vec::<String>::new());

    let upward = tree(&[
        ("low/mod.rs", "pub mod a;"),
        ("low/a.rs", "fn f(_: crate::high::Up) {}"),
        ("high.rs", "pub struct Up;"),
    ]);
    assert_eq!(
        violations(&upward, &rooms),
        ["low/a.rs imports high.rs: `high` is above `low`"]
    );

    let circular = tree(&[
        ("low/mod.rs", "pub mod a;\npub mod b;"),
        ("low/a.rs", "use super::b::B;\npub struct A;"),
        ("low/b.rs", "use crate::low::{self, a::A};\npub struct B;"),
    ]);
    assert_eq!(
        violations(&circular, &rooms),
        ["import circle: low/a.rs → low/b.rs → low/a.rs"]
    );

    let through_a_parent = tree(&[
        ("low/mod.rs", "pub mod a;\npub fn router() { a::routes() }"),
        ("low/a.rs", "pub fn routes() { crate::low::router() }"),
    ]);
    assert_eq!(
        violations(&through_a_parent, &rooms),
        ["import circle: low/a.rs → low/mod.rs → low/a.rs"]
    );

    let through_the_root = tree(&[
        ("lib.rs", "pub mod low;\npub use low::Thing;"),
        ("low/mod.rs", "pub struct Thing;"),
        ("high.rs", "use crate::Thing;"),
    ]);
    assert_eq!(
        violations(&through_the_root, &rooms),
        ["high.rs imports a re-export of lib.rs: import it from its room"]
    );

    let unplaced = tree(&[("loose.rs", "pub struct Loose;")]);
    assert_eq!(
        violations(&unplaced, &rooms),
        ["loose.rs: the room `loose` is not in ROOMS"]
    );
}
