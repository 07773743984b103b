//! Problems found in a config, collected with their paths (`routes[1].upstream: ...`) so an
//! operator sees every mistake at once. Shared by both steps of reading.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

/// Every problem found in a config, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the config:",
            if n == 1 { "" } else { "s" }
        )?;
        for problem in &self.0 {
            if problem.path.is_empty() {
                writeln!(f, "  - {}", problem.message)?;
            } else {
                writeln!(f, "  - {}: {}", problem.path, problem.message)?;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct Problems {
    found: Vec<ConfigProblem>,
    /// Fields that did not read and were left out or stood in for: reported once, when read.
    unread: std::collections::BTreeSet<String>,
}

impl Problems {
    /// Records a problem, unless it is about a field already reported as unread (its default or
    /// stand-in value is not the operator's).
    pub(crate) fn push(&mut self, path: &str, message: impl Into<String>) {
        if self.unread.contains(path) {
            return;
        }
        self.found.push(ConfigProblem {
            path: path.to_string(),
            message: message.into(),
        });
    }
    /// Records a field that did not read.
    pub(crate) fn unread(&mut self, path: &str, message: String) {
        self.push(path, message);
        self.unread.insert(path.to_string());
    }
    pub(crate) fn len(&self) -> usize {
        self.found.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }
    pub(crate) fn into_errors(self) -> ConfigErrors {
        ConfigErrors(self.found)
    }
}

/// A duration as config writes them ("10s", "24h"), if it is one and not zero.
pub(crate) fn positive_duration(text: &str) -> Option<std::time::Duration> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
}
