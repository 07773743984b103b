//! The audit log's hash chain: each entry's hash covers its own fields and the previous entry's
//! hash, so changing, inserting or deleting an entry breaks every link after it, and [`verify`]
//! names the first broken one. A separately kept head (the last entry's number and hash) catches
//! entries deleted from the end.
//!
//! The chain proves the log was not edited by someone who could not also rewrite every later
//! entry and the head; anchoring the head elsewhere (printing it, shipping it off the machine)
//! is what makes that rewrite detectable too.

use chrono::{DateTime, SubsecRound, Utc};
use sha2::{Digest, Sha256};

/// The hash before the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// One entry, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// 1, 2, 3...: position in the chain.
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// `admin`, or the id of the key that made the change.
    pub actor: String,
    /// What was done, e.g. `key.revoke`.
    pub action: String,
    /// The id of what it was done to.
    pub target: String,
    pub request_id: String,
    /// JSON of the object before and after the change, where it matters.
    pub before: Option<String>,
    pub after: Option<String>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

impl AuditEntry {
    /// The hash this entry must carry, given its fields and `prev_hash`.
    pub fn expected_hash(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(self.prev_hash);
        hash.update(self.seq.to_be_bytes());
        hash.update(self.at.timestamp_millis().to_be_bytes());
        // Length-prefixed, so no two different field lists hash alike.
        for field in [
            Some(self.actor.as_str()),
            Some(self.action.as_str()),
            Some(self.target.as_str()),
            Some(self.request_id.as_str()),
            self.before.as_deref(),
            self.after.as_deref(),
        ] {
            match field {
                None => hash.update([0u8]),
                Some(text) => {
                    hash.update([1u8]);
                    hash.update((text.len() as u64).to_be_bytes());
                    hash.update(text.as_bytes());
                }
            }
        }
        hash.finalize().into()
    }

    /// Seals a new entry onto a chain whose last entry is `(seq, hash)` (`None`: the first).
    pub fn seal(mut self, last: Option<(u64, [u8; 32])>) -> AuditEntry {
        let (seq, prev) = last.unwrap_or((0, GENESIS));
        // Stores keep milliseconds; the hash covers what they keep.
        self.at = self.at.trunc_subsecs(3);
        self.seq = seq + 1;
        self.prev_hash = prev;
        self.hash = self.expected_hash();
        self
    }
}

/// The first link that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at entry {seq}: {reason}")]
pub struct BrokenLink {
    pub seq: u64,
    pub reason: String,
}

/// Walks the chain in order and checks every link, then the head. Returns the number of
/// entries checked.
pub fn verify<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
    head: Option<(u64, [u8; 32])>,
) -> Result<u64, BrokenLink> {
    let mut checker = Checker::default();
    for entry in entries {
        checker.check(entry)?;
    }
    checker.finish(head)
}

/// [`verify`] one page at a time, for logs too long to hold at once.
#[derive(Debug, Clone)]
pub struct Checker {
    last_seq: u64,
    last_hash: [u8; 32],
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            last_seq: 0,
            last_hash: GENESIS,
        }
    }
}

impl Checker {
    pub fn check(&mut self, entry: &AuditEntry) -> Result<(), BrokenLink> {
        let broken = |seq, reason: &str| BrokenLink {
            seq,
            reason: reason.to_string(),
        };
        let expected = self.last_seq + 1;
        if entry.seq > expected {
            return Err(broken(expected, "this entry is missing (deleted)"));
        }
        if entry.seq < expected {
            return Err(broken(
                entry.seq,
                "this entry is out of sequence (inserted)",
            ));
        }
        if entry.prev_hash != self.last_hash {
            return Err(broken(
                entry.seq,
                "its link to the entry before does not match (an entry was changed, inserted or \
                 deleted before it)",
            ));
        }
        if entry.hash != entry.expected_hash() {
            return Err(broken(
                entry.seq,
                "its contents do not match its hash (it was modified)",
            ));
        }
        self.last_seq = entry.seq;
        self.last_hash = entry.hash;
        Ok(())
    }

    pub fn finish(&self, head: Option<(u64, [u8; 32])>) -> Result<u64, BrokenLink> {
        let (head_seq, head_hash) = head.unwrap_or((0, GENESIS));
        if head_seq > self.last_seq {
            return Err(BrokenLink {
                seq: self.last_seq + 1,
                reason: format!(
                    "the log ends at entry {} but its head says {head_seq} (entries were deleted \
                     from the end)",
                    self.last_seq
                ),
            });
        }
        if head_seq < self.last_seq || head_hash != self.last_hash {
            return Err(BrokenLink {
                seq: self.last_seq,
                reason: "the last entry does not match the log's head (it was appended or \
                         changed outside Tollgate)"
                    .to_string(),
            });
        }
        Ok(self.last_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut entries: Vec<AuditEntry> = Vec::new();
        for i in 0..n {
            let entry = AuditEntry {
                seq: 0,
                at: Utc
                    .timestamp_millis_opt(1_800_000_000_000 + i as i64)
                    .unwrap(),
                actor: "admin".into(),
                action: "key.revoke".into(),
                target: format!("key_{i}"),
                request_id: format!("req_{i}"),
                before: Some(format!("{{\"status\":\"active\",\"n\":{i}}}")),
                after: None,
                prev_hash: GENESIS,
                hash: GENESIS,
            };
            let last = entries.last().map(|e| (e.seq, e.hash));
            entries.push(entry.seal(last));
        }
        entries
    }

    fn head(entries: &[AuditEntry]) -> Option<(u64, [u8; 32])> {
        entries.last().map(|e| (e.seq, e.hash))
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let entries = chain(5);
        assert_eq!(verify(&entries, head(&entries)), Ok(5));
        assert_eq!(verify(&[], None), Ok(0));
    }

    #[test]
    fn a_modified_entry_is_named() {
        let mut entries = chain(5);
        let h = head(&entries);
        entries[2].before = Some("{\"status\":\"revoked\",\"n\":2}".into());
        let broken = verify(&entries, h).unwrap_err();
        assert_eq!(broken.seq, 3);
        assert!(broken.reason.contains("modified"));
    }

    #[test]
    fn a_deleted_entry_is_named() {
        let mut entries = chain(5);
        let h = head(&entries);
        entries.remove(1);
        assert_eq!(verify(&entries, h).unwrap_err().seq, 2);
    }

    #[test]
    fn an_entry_rewritten_with_a_fresh_hash_breaks_the_next_link() {
        let mut entries = chain(5);
        let h = head(&entries);
        entries[1].actor = "key_attacker".into();
        entries[1].hash = entries[1].expected_hash();
        let broken = verify(&entries, h).unwrap_err();
        assert_eq!(broken.seq, 3);
        assert!(broken.reason.contains("link"));
    }

    #[test]
    fn an_inserted_entry_is_named() {
        let mut entries = chain(3);
        let h = head(&entries);
        let mut forged = entries[1].clone();
        forged.action = "credits.grant".into();
        entries.insert(2, forged);
        assert_eq!(verify(&entries, h).unwrap_err().seq, 2);
    }

    #[test]
    fn entries_cut_from_the_end_or_added_behind_the_head_are_caught() {
        let mut entries = chain(4);
        let h = head(&entries);
        entries.pop();
        let broken = verify(&entries, h).unwrap_err();
        assert_eq!(broken.seq, 4);
        assert!(broken.reason.contains("deleted from the end"));

        let entries = chain(4);
        let stale_head = Some((3, entries[2].hash));
        assert_eq!(verify(&entries, stale_head).unwrap_err().seq, 4);
    }
}
