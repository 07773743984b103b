//! The rate-limit headers of a response: the legacy `X-RateLimit-*` trio for the policy closest
//! to refusing, and the IETF fields (`RateLimit-Policy`, `RateLimit`) listing every policy.

use http::HeaderMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the caller stands with the rate limits that applied to a call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// `X-RateLimit-Limit`: what the tightest policy admits at once.
    pub limit: Option<u64>,
    /// `X-RateLimit-Remaining`.
    pub remaining: Option<u64>,
    /// `X-RateLimit-Reset`: when the tightest policy is whole again.
    pub reset: Option<SystemTime>,
    /// Every policy, from `RateLimit-Policy` and `RateLimit`, matched by name.
    pub policies: Vec<PolicyStanding>,
}

/// One policy of the IETF fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyStanding {
    pub name: String,
    /// `q`: the quota per window.
    pub quota: Option<u64>,
    /// `w`: the window.
    pub window: Option<Duration>,
    /// `r`: what is left.
    pub remaining: Option<u64>,
    /// `t`: until the quota is whole again.
    pub reset_after: Option<Duration>,
}

impl RateLimit {
    /// The headers' rate-limit state; `None` if the response has none.
    pub fn from_headers(headers: &HeaderMap) -> Option<RateLimit> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let number = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let mut policies: Vec<PolicyStanding> = Vec::new();
        for (name, params) in text("ratelimit-policy").map(items).unwrap_or_default() {
            policies.push(PolicyStanding {
                name,
                quota: param(&params, "q"),
                window: param(&params, "w").map(Duration::from_secs),
                ..PolicyStanding::default()
            });
        }
        for (name, params) in text("ratelimit").map(items).unwrap_or_default() {
            let at = match policies.iter().position(|p| p.name == name) {
                Some(at) => at,
                None => {
                    policies.push(PolicyStanding {
                        name,
                        ..PolicyStanding::default()
                    });
                    policies.len() - 1
                }
            };
            policies[at].remaining = param(&params, "r");
            policies[at].reset_after = param(&params, "t").map(Duration::from_secs);
        }
        let limit = RateLimit {
            limit: number("x-ratelimit-limit"),
            remaining: number("x-ratelimit-remaining"),
            reset: number("x-ratelimit-reset").map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            policies,
        };
        (limit != RateLimit::default()).then_some(limit)
    }

    /// How long until a call would be admitted again, seen at `now`: zero while any quota is
    /// left, else the longest wait among the policies with nothing left.
    pub fn wait_at(&self, now: SystemTime) -> Duration {
        let exhausted = self
            .policies
            .iter()
            .filter(|p| p.remaining == Some(0))
            .filter_map(|p| p.reset_after)
            .max();
        if let Some(wait) = exhausted {
            return wait;
        }
        match (self.remaining, self.reset) {
            (Some(0), Some(reset)) => reset.duration_since(now).unwrap_or_default(),
            _ => Duration::ZERO,
        }
    }
}

/// The items of a structured-field list (RFC 9651): `"name";k=v;k=v, token;k=v`.
fn items(list: &str) -> Vec<(String, Vec<(String, String)>)> {
    list.split(',')
        .filter_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next()?.trim_matches('"').to_string();
            if name.is_empty() {
                return None;
            }
            let params = parts
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            Some((name, params))
        })
        .collect()
}

fn param(params: &[(String, String)], key: &str) -> Option<u64> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn both_header_families_are_read_and_matched_by_policy() {
        let limit = RateLimit::from_headers(&headers(&[
            ("x-ratelimit-limit", "10"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1001"),
            (
                "ratelimit-policy",
                "\"per-key\";q=60;w=60, \"per-account\";q=600;w=60",
            ),
            ("ratelimit", "\"per-key\";r=0;t=4, \"per-account\";r=99;t=1"),
        ]))
        .unwrap();
        assert_eq!(limit.limit, Some(10));
        assert_eq!(limit.remaining, Some(0));
        assert_eq!(limit.reset, Some(UNIX_EPOCH + Duration::from_secs(1001)));
        assert_eq!(
            limit.policies[0],
            PolicyStanding {
                name: "per-key".into(),
                quota: Some(60),
                window: Some(Duration::from_secs(60)),
                remaining: Some(0),
                reset_after: Some(Duration::from_secs(4)),
            }
        );
        assert_eq!(limit.policies[1].remaining, Some(99));
        assert_eq!(
            limit.wait_at(UNIX_EPOCH + Duration::from_secs(1000)),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn the_legacy_reset_alone_gives_the_wait_and_no_headers_give_none() {
        let limit = RateLimit::from_headers(&headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1010"),
        ]))
        .unwrap();
        assert_eq!(
            limit.wait_at(UNIX_EPOCH + Duration::from_secs(1000)),
            Duration::from_secs(10)
        );
        assert_eq!(
            limit.wait_at(UNIX_EPOCH + Duration::from_secs(2000)),
            Duration::ZERO
        );
        assert_eq!(RateLimit::from_headers(&HeaderMap::new()), None);
    }
}
