//! What Tollgate tells an account about itself: the event types, an endpoint's filter over them,
//! and an event's body, which is fixed when the event is made so every delivery attempt sends
//! the same bytes under the same `webhook-id`.

use crate::clock::rfc3339;
use crate::{AccountId, EventId, Nanos};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

macro_rules! event_types {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        /// Every event Tollgate sends; `docs/webhooks.md` describes each one's `data`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType { $( $(#[$doc])* $variant, )* }

        impl EventType {
            pub const ALL: &'static [EventType] = &[ $( EventType::$variant, )* ];

            pub const fn as_str(self) -> &'static str {
                match self { $( EventType::$variant => $name, )* }
            }

            pub fn parse(text: &str) -> Option<EventType> {
                match text { $( $name => Some(EventType::$variant), )* _ => None }
            }
        }
    };
}

event_types! {
    /// The settled balance fell below the account's low-balance amount.
    BalanceLow = "balance.low",
    /// A paid call was refused for want of credit: the first such refusal of an episode.
    BalanceDepleted = "balance.depleted",
    /// After `balance.low` or `balance.depleted`, credit came back to at least the low-balance
    /// amount (or, with none set, above what was refused).
    BalanceRecovered = "balance.recovered",
    /// A key's spend this month reached 80 % or 100 % of its monthly cap.
    KeySpendThreshold = "key.spend_threshold",
    /// A key was revoked.
    KeyRevoked = "key.revoked",
    /// A key expires within 7 days.
    KeyExpiring = "key.expiring",
    /// A card top-up was credited.
    TopUpSucceeded = "topup.succeeded",
    /// A card top-up's payment failed.
    TopUpFailed = "topup.failed",
    /// A top-up was refunded, wholly or in part.
    TopUpRefunded = "topup.refunded",
    /// The card holder disputed a top-up's payment.
    DisputeOpened = "dispute.opened",
    /// The account's subscription is past due.
    SubscriptionPastDue = "subscription.past_due",
    /// A plan allowance's used units reached 80 % or 100 % of the period's grant.
    AllowanceThreshold = "allowance.threshold",
    /// A plan allowance's units are whole again: a new period began, or the operator reset it.
    AllowanceReset = "allowance.reset",
    /// A test delivery, sent to one endpoint when its owner asks.
    Ping = "webhook.ping",
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which events an endpoint receives: all of them, or those listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    All,
    Only(Vec<EventType>),
}

impl EventFilter {
    /// `["*"]` (or nothing) is every event; otherwise each name must be an event type.
    pub fn parse(names: &[String]) -> Result<EventFilter, String> {
        if names.is_empty() || names.iter().any(|n| n == "*") {
            return Ok(EventFilter::All);
        }
        let mut types = Vec::with_capacity(names.len());
        for name in names {
            let Some(kind) = EventType::parse(name) else {
                return Err(name.clone());
            };
            if !types.contains(&kind) {
                types.push(kind);
            }
        }
        types.sort();
        Ok(EventFilter::Only(types))
    }

    /// Whether the event goes to an endpoint with this filter. A test ping goes only to the
    /// endpoint it was asked for, never by a filter.
    pub fn admits(&self, kind: EventType) -> bool {
        match self {
            _ if kind == EventType::Ping => false,
            EventFilter::All => true,
            EventFilter::Only(types) => types.contains(&kind),
        }
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            EventFilter::All => vec!["*".into()],
            EventFilter::Only(types) => types.iter().map(|t| t.as_str().to_string()).collect(),
        }
    }
}

/// One event, ready to deliver: `body` is the exact JSON every attempt sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: EventId,
    pub account: AccountId,
    pub kind: EventType,
    pub created_at: DateTime<Utc>,
    pub body: String,
}

impl Event {
    /// The Standard Webhooks shape: `{"type", "timestamp", "data"}`, with the account's id in
    /// `data`.
    pub fn new(account: AccountId, kind: EventType, at: DateTime<Utc>, mut data: Value) -> Event {
        if let Value::Object(fields) = &mut data {
            fields.insert("account_id".into(), json!(account.to_string()));
        }
        let body = json!({
            "type": kind.as_str(),
            "timestamp": rfc3339(at),
            "data": data,
        })
        .to_string();
        Event {
            id: EventId::new(),
            account,
            kind,
            created_at: at,
            body,
        }
    }
}

/// An amount as events carry it, as the API writes money: exact nanos, the decimal string of
/// credits and the currency.
pub fn amount(nanos: Nanos, currency: &str) -> Value {
    json!({
        "nanos": nanos.0,
        "credits": nanos.to_string(),
        "currency": currency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_reads_names_and_refuses_unknown_ones() {
        assert_eq!(EventFilter::parse(&[]), Ok(EventFilter::All));
        assert_eq!(
            EventFilter::parse(&["balance.low".into(), "*".into()]),
            Ok(EventFilter::All)
        );
        let only = EventFilter::parse(&["topup.succeeded".into(), "balance.low".into()]).unwrap();
        assert!(only.admits(EventType::BalanceLow));
        assert!(!only.admits(EventType::KeyRevoked));
        assert!(!only.admits(EventType::Ping));
        assert!(!EventFilter::All.admits(EventType::Ping));
        assert_eq!(only.names(), vec!["balance.low", "topup.succeeded"]);
        assert_eq!(
            EventFilter::parse(&["balance.lo".into()]),
            Err("balance.lo".into())
        );
        for kind in EventType::ALL {
            assert_eq!(EventType::parse(kind.as_str()), Some(*kind));
        }
    }

    #[test]
    fn an_event_body_is_the_standard_shape_with_exact_amounts() {
        let account = AccountId::new();
        let at = DateTime::parse_from_rfc3339("2026-12-06T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let event = Event::new(
            account,
            EventType::BalanceLow,
            at,
            json!({"balance": amount(Nanos(4_990_000_001), "USD")}),
        );
        let body: Value = serde_json::from_str(&event.body).unwrap();
        assert_eq!(body["type"], "balance.low");
        assert_eq!(body["timestamp"], "2026-12-06T10:00:00Z");
        assert_eq!(body["data"]["account_id"], account.to_string());
        assert_eq!(body["data"]["balance"]["nanos"], 4_990_000_001i64);
        assert_eq!(body["data"]["balance"]["credits"], "4.990000001");
        assert_eq!(body["data"]["balance"]["currency"], "USD");
        assert_eq!(amount(Nanos(0), "USD")["credits"], "0");
    }
}
