//! Tidy: the docs stay true to the code. Each check names the file to fix.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use tollgate_server::config::{RawConfig, RawRoute, ENV_OVERRIDES};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn architecture_md_maps_every_crate() {
    let architecture = read("ARCHITECTURE.md");
    for entry in std::fs::read_dir(repo().join("crates")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            architecture.contains(&format!("`crates/{name}`")),
            "ARCHITECTURE.md has no codemap entry for crates/{name}"
        );
    }
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = read("README.md");
    let command = readme
        .lines()
        .find(|l| l.starts_with("cargo test"))
        .expect("README.md gives a test command starting with `cargo test`");
    let command = command.split('#').next().unwrap().trim();
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run does not run `{command}`"
    );
}

#[test]
fn config_md_documents_every_field_and_override() {
    let docs = read("docs/config.md");
    for (variable, _, _) in ENV_OVERRIDES {
        assert!(
            docs.contains(&format!("`{variable}`")),
            "docs/config.md lacks {variable}"
        );
    }
    let sections = serde_json::to_value(RawConfig::default()).unwrap();
    for (section, fields) in sections.as_object().unwrap() {
        if section == "routes" || section == "rate_limits" {
            // Arrays of tables, documented as such.
            assert!(docs.contains(&format!("## `[[{section}]]`")));
            continue;
        }
        assert!(
            docs.contains(&format!("## `[{section}]`")),
            "docs/config.md lacks [{section}]"
        );
        for field in fields.as_object().unwrap().keys() {
            assert!(
                docs.contains(&format!("| `{field}` |")),
                "docs/config.md lacks {section}.{field}"
            );
        }
    }
    let route: RawRoute =
        toml::from_str("prefix = \"/a\"\nupstream = \"http://h\"\ngroup = \"g\"").unwrap();
    for field in serde_json::to_value(route)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
    {
        assert!(
            docs.contains(&format!("| `{field}` |")),
            "docs/config.md lacks routes.{field}"
        );
    }
}
