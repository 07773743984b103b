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
        if ["routes", "rate_limits", "plans", "packs"].contains(&section.as_str()) {
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
    assert!(docs.contains("| `default_plan` |"));
    for field in [
        "name",
        "period",
        "anchor",
        "time_zone",
        "grace",
        "allowances",
        "meter",
        "routes",
        "units",
        "overage",
        "rollover",
        "windows",
        "price",
        "discounts",
        "rate_limits",
        "stripe_prices",
        "valid_for",
    ] {
        assert!(
            docs.contains(&format!("| `{field}` |")),
            "docs/config.md lacks plans' {field}"
        );
    }
    assert!(docs.contains("### `[payments.stripe]`"));
    let stripe = serde_json::to_value(tollgate_server::config::RawStripe::default()).unwrap();
    for field in stripe.as_object().unwrap().keys() {
        assert!(
            docs.contains(&format!("| `{field}` |")),
            "docs/config.md lacks payments.stripe.{field}"
        );
    }
    assert!(docs.contains("### `[[export.sinks]]`"));
    let sink: tollgate_server::config::RawSink =
        toml::from_str("name = \"s\"\nkind = \"lago\"\nurl = \"http://h\"").unwrap();
    for field in serde_json::to_value(sink)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
    {
        assert!(
            docs.contains(&format!("| `{field}` |")),
            "docs/config.md lacks export.sinks.{field}"
        );
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

/// The table in config.md that says what a policy admits is what the limiter does: each row is
/// played on a fresh subject, sending as soon as it is admitted.
#[test]
fn config_md_rate_limit_examples_are_what_the_limiter_does() {
    use std::time::Duration;
    use tollgate_core::ratelimit::{Policy, Scope, Unit};
    let docs = read("docs/config.md");
    let table = docs
        .split("<!-- rate-limit examples: checked by crates/tollgate-server/tests/tidy.rs -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- end of rate-limit examples -->").next())
        .expect("docs/config.md has the rate-limit examples table");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| limit"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    assert!(rows.len() >= 3, "{table}");
    let shown = |d: Duration| match d.as_millis() {
        ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
        ms => format!("{ms} ms"),
    };
    for row in rows {
        let policy = Policy {
            name: "example".into(),
            scope: Scope::Key,
            unit: Unit::Requests,
            limit: row[0].parse().unwrap(),
            window: humantime::parse_duration(row[1]).unwrap(),
            burst: row[2].parse().unwrap(),
            on_limiter_failure: Default::default(),
        };
        // Send as soon as admitted, for three windows; note when each was admitted.
        let mut tat = None;
        let mut now = Duration::ZERO;
        let mut admitted = Vec::new();
        let mut first_wait = None;
        while now < 3 * policy.window {
            let (standing, next) = policy.decide(tat, now, 1);
            if standing.admitted {
                tat = next;
                admitted.push(now);
            } else {
                first_wait.get_or_insert(standing.retry_after);
                now += standing.retry_after;
            }
        }
        let at_once = admitted.iter().take_while(|t| t.is_zero()).count();
        let most = (0..admitted.len())
            .map(|i| {
                admitted[i..]
                    .iter()
                    .take_while(|t| **t < admitted[i] + policy.window)
                    .count()
            })
            .max()
            .unwrap();
        let found = [
            at_once.to_string(),
            shown(first_wait.unwrap()),
            most.to_string(),
        ];
        assert_eq!(
            [row[3], row[4], row[5]],
            found.each_ref().map(String::as_str),
            "docs/config.md rate-limit example {row:?}"
        );
    }
}

/// Every TOML example in config.md is a valid config as written.
#[test]
fn config_md_toml_examples_load() {
    let docs = read("docs/config.md");
    let blocks: Vec<&str> = docs
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 2, "docs/config.md has its TOML examples");
    for block in blocks {
        let loaded =
            tollgate_server::config::Config::load(block, std::iter::empty::<(&str, &str)>());
        assert!(
            loaded.is_ok(),
            "docs/config.md example:\n{block}\n{:?}",
            loaded.err()
        );
    }
}
