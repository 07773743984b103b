//! Typed ids: a short prefix naming the kind, then a ULID (sortable by creation time).
//! An id of one kind cannot be passed where another is expected, and a malformed one cannot exist.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex};
use ulid::{Generator, Ulid};

/// One generator for the process, so ids made in the same millisecond still sort in the order
/// they were made (a plain ULID's random part would order them at random): "newest first" is
/// exact on a node.
static GENERATOR: LazyLock<Mutex<Generator>> = LazyLock::new(|| Mutex::new(Generator::new()));

fn next_ulid() -> Ulid {
    let mut generator = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    // Fails only past 2^80 ids in one millisecond; a fresh random ULID is as good then.
    generator.generate().unwrap_or_else(|_| Ulid::new())
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Ulid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn new() -> Self {
                Self(next_ulid())
            }

            /// Parses `<prefix><ULID>`; `None` for anything else.
            pub fn parse(text: &str) -> Option<Self> {
                let ulid = text.strip_prefix($prefix)?;
                // Ulid::from_string accepts lowercase too; ids are canonical uppercase only.
                if ulid.bytes().any(|b| b.is_ascii_lowercase()) {
                    return None;
                }
                Ulid::from_string(ulid).ok().map(Self)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(text: &str) -> Result<Self, InvalidId> {
                Self::parse(text).ok_or(InvalidId { expected: $prefix })
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                id_schema($prefix)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// An id in OpenAPI: its prefix, then 26 characters of Crockford base32 (a ULID).
#[cfg(feature = "openapi")]
fn id_schema(prefix: &str) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!("^{prefix}[0-9A-HJKMNP-TV-Z]{{26}}$")))
        .examples([format!("{prefix}01JD3ZK6Q9X8V7T5R4N2M0P1AB")])
        .into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id: expected '{expected}' followed by a 26-character ULID")]
pub struct InvalidId {
    pub expected: &'static str,
}

prefixed_id!(
    /// An account (a customer of the API), holder of one wallet and its keys.
    AccountId,
    "acct_"
);
prefixed_id!(
    /// An API key's public id (never its secret).
    KeyId,
    "key_"
);
prefixed_id!(
    /// The id Tollgate gives every request it answers.
    RequestId,
    "req_"
);

prefixed_id!(
    /// A reservation of credit: made before a paid call, settled or released exactly once.
    HoldId,
    "hold_"
);
prefixed_id!(
    /// A card top-up: an amount of credits an account buys, from checkout to credit.
    TopUpId,
    "topup_"
);
prefixed_id!(
    /// One running Tollgate process on a shared store: the owner of its credit leases.
    NodeId,
    "node_"
);
prefixed_id!(
    /// A URL an account receives webhooks at.
    EndpointId,
    "we_"
);
prefixed_id!(
    /// One notification: its `webhook-id`, the same on every delivery attempt (the Standard
    /// Webhooks `msg_` form).
    EventId,
    "msg_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_one_after_another_sort_in_that_order_even_within_a_millisecond() {
        let ids: Vec<RequestId> = (0..10_000).map(|_| RequestId::new()).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        let texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert!(
            texts.windows(2).all(|pair| pair[0] < pair[1]),
            "the text sorts alike"
        );
    }

    #[test]
    fn round_trips_and_rejects_other_kinds() {
        let id = AccountId::new();
        let text = id.to_string();
        assert!(text.starts_with("acct_") && text.len() == 5 + 26);
        assert_eq!(AccountId::parse(&text), Some(id));
        assert_eq!(KeyId::parse(&text), None);
        assert_eq!(AccountId::parse("acct_nope"), None);
        assert_eq!(AccountId::parse(&text.to_lowercase()), None);
    }

    #[cfg(feature = "openapi")]
    #[test]
    fn the_schema_example_is_a_valid_id() {
        let schema = serde_json::to_value(<AccountId as utoipa::PartialSchema>::schema())
            .unwrap_or_default();
        let example = schema["examples"][0].as_str().unwrap_or_default();
        assert!(AccountId::parse(example).is_some(), "{schema}");
    }

    #[test]
    fn serde_uses_the_text_form() {
        let id = RequestId::new();
        let json = serde_json::to_string(&id).unwrap_or_default();
        assert_eq!(json, format!("\"{id}\""));
        let back: RequestId = serde_json::from_str(&json).unwrap_or_else(|_| RequestId::new());
        assert_eq!(back, id);
        assert!(serde_json::from_str::<RequestId>("\"key_01ARZ3NDEKTSV4RRFFQ69G5FAV\"").is_err());
    }
}
