//! `[export]`: the billing systems charged usage is sent to, validated.

use crate::config::problems::{positive_duration, Problems};
use crate::config::raw::{RawExport, RawSink, Secret};
use std::collections::BTreeSet;
use std::time::Duration;

/// What a sink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// Stripe Billing meter events.
    Stripe,
    /// OpenMeter's CloudEvents ingest.
    OpenMeter,
    /// Lago's batch events.
    Lago,
    /// Signed CloudEvents batches POSTed to the operator's receiver.
    Webhook,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Stripe => "stripe",
            SinkKind::OpenMeter => "openmeter",
            SinkKind::Lago => "lago",
            SinkKind::Webhook => "webhook",
        }
    }

    fn parse(text: &str) -> Option<SinkKind> {
        [
            SinkKind::Stripe,
            SinkKind::OpenMeter,
            SinkKind::Lago,
            SinkKind::Webhook,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// A quantity of a call's usage that a sink can bill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Meter {
    /// One per charged call.
    Requests,
    /// What the call charged, in credits (an exact decimal).
    Cost,
    InputTokens,
    CachedInputTokens,
    OutputTokens,
}

impl Meter {
    pub const ALL: [Meter; 5] = [
        Meter::Requests,
        Meter::Cost,
        Meter::InputTokens,
        Meter::CachedInputTokens,
        Meter::OutputTokens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Requests => "requests",
            Meter::Cost => "cost",
            Meter::InputTokens => "input_tokens",
            Meter::CachedInputTokens => "cached_input_tokens",
            Meter::OutputTokens => "output_tokens",
        }
    }

    pub fn parse(text: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.as_str() == text)
    }
}

/// Whose id names the customer in the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomerIds {
    /// The account id.
    Account,
    /// The id set per account through the API; a sink with none waits (parked as unmapped).
    Mapped,
}

#[derive(Debug, Clone)]
pub struct SinkSettings {
    pub name: String,
    pub kind: SinkKind,
    /// With no trailing slash.
    pub url: String,
    pub secret: Option<Secret>,
    /// Each meter sent, with its name in the sink, in meter order.
    pub meters: Vec<(Meter, String)>,
    pub customer: CustomerIds,
    pub max_age: Option<Duration>,
    pub batch_size: u32,
    pub timeout: Duration,
    pub source: String,
    pub event_type: String,
    pub totals_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub poll_interval: Duration,
    pub retention: Duration,
    pub sinks: Vec<SinkSettings>,
}

impl ExportSettings {
    pub fn sink(&self, name: &str) -> Option<&SinkSettings> {
        self.sinks.iter().find(|s| s.name == name)
    }
}

/// Stripe refuses meter events older than 35 days.
const STRIPE_MAX_AGE: Duration = Duration::from_secs(35 * 86_400);
/// Lago's batch endpoint takes at most 100 events; Stripe's meter events go one per call.
const LARGEST_BATCH: u32 = 10_000;

pub(super) fn validate_export(raw: &RawExport, p: &mut Problems) -> ExportSettings {
    let mut duration = |field: String, text: &str, example: &str| {
        positive_duration(text).unwrap_or_else(|| {
            p.push(
                &field,
                format!("must be a positive duration, e.g. \"{example}\""),
            );
            Duration::from_secs(1)
        })
    };
    let poll_interval = duration("export.poll_interval".into(), &raw.poll_interval, "1s");
    let retention = duration("export.retention".into(), &raw.retention, "90d");
    let mut names = BTreeSet::new();
    let sinks = raw
        .sinks
        .iter()
        .enumerate()
        .filter_map(|(i, sink)| {
            let at = format!("export.sinks[{i}]");
            if !names.insert(sink.name.clone()) {
                p.push(
                    &format!("{at}.name"),
                    format!("'{}' names two sinks", sink.name),
                );
            }
            validate_sink(sink, &at, p)
        })
        .collect();
    ExportSettings {
        poll_interval,
        retention,
        sinks,
    }
}

fn validate_sink(raw: &RawSink, at: &str, p: &mut Problems) -> Option<SinkSettings> {
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 64
        && raw
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        p.push(
            &format!("{at}.name"),
            "must be 1 to 64 letters, digits, '-' or '_'",
        );
    }
    let kind = SinkKind::parse(&raw.kind);
    if kind.is_none() {
        p.push(
            &format!("{at}.kind"),
            format!(
                "'{}' is not a sink kind (expected stripe, openmeter, lago or webhook)",
                raw.kind
            ),
        );
    }
    let url = raw.url.trim_end_matches('/').to_string();
    let url_ok = url
        .parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some());
    if !url_ok {
        p.push(&format!("{at}.url"), "must be an http(s) URL");
    }
    if raw.secret.is_none() {
        p.push(
            &format!("{at}.secret"),
            "is required: the sink's API key (or, for a webhook sink, its whsec_ secret)",
        );
    }
    if let (Some(SinkKind::Webhook), Some(secret)) = (kind, &raw.secret) {
        if tollgate_core::webhook::WebhookSecret::parse(&secret.0).is_err() {
            p.push(
                &format!("{at}.secret"),
                "must be a whsec_ secret (base64 after the prefix)",
            );
        }
    }
    let mut meters = Vec::new();
    for (meter, name) in &raw.meters {
        match Meter::parse(meter) {
            Some(m) if !name.is_empty() && name.len() <= 100 => meters.push((m, name.clone())),
            Some(_) => p.push(
                &format!("{at}.meters.{meter}"),
                "must be the meter's name in the sink: 1 to 100 characters",
            ),
            None => p.push(
                &format!("{at}.meters.{meter}"),
                "is not a meter (expected requests, cost, input_tokens, cached_input_tokens or output_tokens)",
            ),
        }
    }
    meters.sort();
    if raw.meters.is_empty() {
        p.push(&format!("{at}.meters"), "must name at least one meter");
    }
    let customer = match raw.customer.as_deref() {
        None if kind == Some(SinkKind::Stripe) => CustomerIds::Mapped,
        None | Some("account") => CustomerIds::Account,
        Some("mapped") => CustomerIds::Mapped,
        Some(other) => {
            p.push(
                &format!("{at}.customer"),
                format!("'{other}' is not a customer mapping (expected account or mapped)"),
            );
            CustomerIds::Account
        }
    };
    let max_age = match &raw.max_age {
        Some(text) => positive_duration(text).or_else(|| {
            p.push(
                &format!("{at}.max_age"),
                "must be a positive duration, e.g. \"35d\"",
            );
            None
        }),
        None if kind == Some(SinkKind::Stripe) => Some(STRIPE_MAX_AGE),
        None => None,
    };
    let largest = if kind == Some(SinkKind::Lago) {
        100
    } else {
        LARGEST_BATCH
    };
    if raw.batch_size == 0 || raw.batch_size > largest {
        p.push(
            &format!("{at}.batch_size"),
            format!("must be 1 to {largest}"),
        );
    }
    let timeout = positive_duration(&raw.timeout).unwrap_or_else(|| {
        p.push(
            &format!("{at}.timeout"),
            "must be a positive duration, e.g. \"10s\"",
        );
        Duration::from_secs(10)
    });
    if raw.totals_url.is_some() && kind != Some(SinkKind::Webhook) {
        p.push(
            &format!("{at}.totals_url"),
            "is for webhook sinks only: the other sinks are asked through their own API",
        );
    }
    Some(SinkSettings {
        name: raw.name.clone(),
        kind: kind?,
        url,
        secret: raw.secret.clone(),
        meters,
        customer,
        max_age,
        batch_size: raw.batch_size.clamp(1, largest),
        timeout,
        source: raw.source.clone(),
        event_type: raw.event_type.clone(),
        totals_url: raw
            .totals_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_string()),
    })
}
