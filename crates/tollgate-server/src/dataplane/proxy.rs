//! The data plane: match a route, authenticate, forward to the upstream, stream the answer back.
//!
//! Bodies stream both ways: the request body is forwarded as it arrives (counted against the
//! size limit as it goes), and the upstream's response body, SSE included, leaves chunk by chunk
//! as it arrives. Upstream responses of every status are passed through as they are; only errors
//! Tollgate originates use the envelope.

use crate::access::keys::{admit_key, find_key};
use crate::access::limits;
use crate::access::limits::QuotaItem;
use crate::access::limits::{Estimate, LimitSlot, Standings};
use crate::billing::allowances::{self, CallUnits, NotReserved, PlanOf, Quota};
use crate::billing::ledger::{HoldRefused, HoldSpec};
use crate::billing::meter::usage_row;
use crate::billing::meter::{Billing, CostRule, MeteredBody, Metering, Outcome};
use crate::billing::refusal::refused_error;
use crate::config::{HoldRule, RouteAuth, RouteConfig};
use crate::dataplane::models;
use crate::dataplane::models::ModelsCall;
use crate::edge::idempotency::HoldDeadline;
use crate::http::body::{cause, read_error, BodyStalled};
use crate::http::error::HttpError;
use crate::http::error::{method_not_allowed, payload_too_large, validation};
use crate::http::headers::{is_hop_by_hop, path_escape, presented_secret};
use crate::http::headers::{RequestIdHeader, ANTHROPIC_REQUEST_ID};
use crate::state::AppState;
use crate::upstream::Route;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tollgate_core::metering::{Endpoint, TokenUsage};
use tollgate_core::plan::Meter;
use tollgate_core::pricing::TokenPrices;
use tollgate_core::{access, ErrorCode};
use tollgate_core::{Nanos, RequestId};
use tollgate_store::{HoldSource, KeyRecord};

/// Headers some frameworks read as the request's real method: a metered call could pass as a
/// GET (priced flat) and run as a POST.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers that could make an upstream answer a metered call with part of its answer, or none
/// (206, 304), while doing the work: the meter needs the whole answer.
const PARTIAL_ANSWERS: [&str; 6] = [
    "range",
    "if-range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
];

/// The upstream's own request ID is kept under this name; `x-request-id` is Tollgate's.
const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// The fallback handler: every path that is not Tollgate's own goes through here.
pub async fn proxy(State(state): State<AppState>, request: Request) -> Response {
    if let Some(found) = path_escape(request.uri().path()) {
        // An upstream that normalises paths would turn `/svc/../internal` into `/internal`,
        // outside the route's prefix, with the route's credentials.
        return HttpError::new(
            ErrorCode::BadRequest,
            format!(
                "The path contains {found}, which could reach outside the route's prefix; Tollgate does not forward it. Send the path without dot-segments or encoded separators."
            ),
        )
        .into_response();
    }
    let Some(route) = state.routes.resolve(request.uri().path()) else {
        return HttpError::new(
            ErrorCode::NotFound,
            format!(
                "No route for {} {}.",
                request.method(),
                request.uri().path()
            ),
        )
        .into_response();
    };
    let profile = route.config.error_profile;
    if !route.config.methods.contains(request.method()) {
        return method_not_allowed(request.method(), &route.config.methods)
            .in_profile(profile)
            .into_response();
    }
    // Set once the caller is known; every error from then on releases its hold and is logged.
    let mut billing: Option<Billing> = None;
    let mut timings = Timings::default();
    let forwarded = match route.config.auth {
        RouteAuth::Key => forward(&state, route, request, &mut billing, &mut timings).await,
        RouteAuth::None => forward_public(&state, route, request, &mut timings).await,
    };
    let mut response = match forwarded {
        Ok(response) => response,
        Err(error) => {
            if let Some(billing) = billing.take() {
                billing.finish(Outcome::refused(&error.error));
            }
            error.in_profile(profile).into_response()
        }
    };
    // The request-ID layer reads the profile to add Anthropic's `request-id` header.
    response.extensions_mut().insert(profile);
    if let Some(value) = timings.header() {
        // Appended: an upstream's own `Server-Timing` stays.
        response.headers_mut().append(
            http::header::HeaderName::from_static("server-timing"),
            value,
        );
    }
    response
}

/// How long each phase of a proxied request took, for the `Server-Timing` header (`auth`,
/// `limits`, `units`, `hold`, `upstream`, in milliseconds); phases a request did not reach are absent.
#[derive(Debug, Default)]
struct Timings(String);

impl Timings {
    /// Appends `phase` as it is written in the header, so the header is one string built once.
    fn since(&mut self, phase: &'static str, started: std::time::Instant) {
        use std::fmt::Write;
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        let separator = if self.0.is_empty() { "" } else { ", " };
        let _ = write!(self.0, "{separator}{phase};dur={millis:.3}");
    }

    fn header(&self) -> Option<http::HeaderValue> {
        (!self.0.is_empty())
            .then(|| http::HeaderValue::from_str(&self.0).ok())
            .flatten()
    }
}

/// What an LLM request asks for, read from its JSON body.
pub struct LlmRequest {
    pub endpoint: Endpoint,
    pub prices: TokenPrices,
    /// The most output it may generate: the body's own cap, or the route's default, which was
    /// then written into the body (so the upstream cannot generate more than the hold covers).
    pub max_tokens: u64,
    /// Input tokens estimated from the body (four bytes a token, rounded up).
    pub input_estimate: u64,
    /// The body as forwarded: re-serialised from what Tollgate parsed, so the upstream reads
    /// exactly what the meter priced.
    pub body: Bytes,
    /// The client did not ask for the stream's usage chunk, which Tollgate asked for itself.
    pub hide_usage_chunk: bool,
}

/// What a call on a key route is, for pricing.
enum Call<'r> {
    /// Priced like a plain request: the flat price (or the route's per-unit rule).
    Plain,
    /// A POST to one of an LLM route's metered endpoints.
    Llm(Endpoint, &'r BTreeMap<String, TokenPrices>),
    /// A POST to an endpoint of an LLM route Tollgate cannot meter, charged this configured price.
    Unmetered(Nanos),
}

/// Classifies a call on `route`: every POST under an LLM route is either one of its API's
/// metered endpoints, or charged the configured price, or refused (403) before it is forwarded.
fn classify<'r>(
    route: &'r RouteConfig,
    method: &http::Method,
    path: &str,
) -> Result<Call<'r>, HttpError> {
    let Some((api, models)) = route.pricing.llm.as_ref() else {
        return Ok(Call::Plain);
    };
    if method != http::Method::POST {
        return Ok(Call::Plain);
    }
    let rest = path.strip_prefix(route.prefix.as_str()).unwrap_or_default();
    if let Some(endpoint) = api.endpoint(rest) {
        return Ok(Call::Llm(endpoint, models));
    }
    match route.pricing.other_endpoints {
        Some(price) => Ok(Call::Unmetered(price)),
        None => Err(tollgate_core::ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "Tollgate cannot meter POST {path} on this route, so it does not forward it. Metered endpoints: {}.",
                api.endpoints().join(", ")
            ),
        )
        .with_detail("endpoint", path.to_string())
        .into()),
    }
}

async fn forward(
    state: &AppState,
    route: &Route,
    request: Request,
    billing: &mut Option<Billing>,
    timings: &mut Timings,
) -> Result<Response, HttpError> {
    let started = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let client = state.client_ip(&parts.headers, &parts.extensions);
    let cached = find_key(&state.keys, &*state.store, presented_secret(&parts.headers)).await;
    let cached = cached.inspect_err(|_| timings.since("auth", started))?;
    let key = cached.record.clone();
    let now = state.clock.now();
    // From here the account is known: every outcome, a refusal included, gets a usage row.
    *billing = Some(Billing::new(
        state.ledger.clone(),
        state.clock.clone(),
        usage_row(&parts, &key, &route.config.prefix, now),
        state.config.usage_log,
    ));
    let admitted = admit_key(&cached, now, client);
    timings.since("auth", started);
    admitted?;
    // The limits layer gives every request a slot; until the limits are decided below, an error
    // shows where the caller stands without consuming anything.
    let slot = parts
        .extensions
        .get::<LimitSlot>()
        .cloned()
        .unwrap_or_default();
    slot.set(Standings::Identified(limits::demands_for(
        &state.config,
        Some(&route.config),
        &cached,
        Estimate::default(),
    )));
    if !access::grants_group(&key.scopes, &route.config.group) {
        return Err(HttpError::from(
            tollgate_core::ApiError::new(
                ErrorCode::InsufficientScope,
                format!(
                    "This key's scopes do not include the route group '{}'. Use a key with that scope.",
                    route.config.group
                ),
            )
            .with_detail("required_scope", route.config.group.clone()),
        ));
    }
    // The account's plan: a lapsed subscription stops the call before anything is counted.
    let plan = PlanOf::find(&state.config.plans, cached.subscription.as_deref());
    if let Some(plan) = &plan {
        if let Some(until) = plan.standing(now)? {
            slot.warn(format!(
                "subscription past_due; calls stop at {} unless it is paid",
                until.to_rfc3339()
            ));
        }
    }
    let limit = state.config.max_body_bytes;
    check_declared_length(&parts.headers, limit)?;
    if let Some((api, models)) = &route.config.pricing.llm {
        let rest = parts
            .uri
            .path()
            .strip_prefix(route.config.prefix.as_str())
            .unwrap_or_default();
        if let Some(call) = ModelsCall::read(&parts.method, rest) {
            state.admit_identified(&slot, Estimate::default()).await?;
            let response = models::answer(call, *api, models.keys(), &route.config.group, &key)?;
            if let Some(billing) = billing.take() {
                billing.finish(Outcome::free(response.status().as_u16()));
            }
            return Ok(response);
        }
    }

    let pricing = &route.config.pricing;
    let body_limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let call = classify(&route.config, &parts.method, parts.uri.path())?;
    let (body, llm) = match call {
        Call::Plain | Call::Unmetered(_) => (body, None),
        Call::Llm(endpoint, models) => {
            let (model, llm) = read_llm_request(
                endpoint,
                models,
                body,
                body_limit,
                pricing.default_max_tokens,
            )
            .await?;
            check_model_scope(&key, &route.config.group, &model)?;
            if let Some(billing) = billing.as_mut() {
                billing.set_model(&model);
            }
            (Body::from(llm.body.clone()), Some(llm))
        }
    };

    // The worst case this call may use: what token policies reserve and, priced, what the
    // hold may be.
    let tokens = llm.as_ref().map(|llm| TokenUsage {
        input: llm.input_estimate,
        cached_input: 0,
        output: llm.max_tokens,
    });
    let mut hold_amount = match (&call, pricing.hold, &llm) {
        (Call::Unmetered(price), _, _) => *price,
        (_, _, Some(llm)) if llm.endpoint.is_free() => Nanos::ZERO,
        (_, HoldRule::MaxHold(amount), _) => amount,
        (_, HoldRule::MaxTokens, Some(llm)) => tokens.as_ref().map_or(pricing.flat, |t| {
            tollgate_core::pricing::add(pricing.flat, llm.prices.cost(t))
        }),
        (_, HoldRule::Flat | HoldRule::MaxTokens, _) => pricing.flat,
    };
    // The plan's discount on the route group lowers the hold and, at the end, the charge.
    let discount = plan.map_or(0, |p| p.plan.discount_for(&route.config.group));
    if discount > 0 {
        hold_amount = tollgate_core::pricing::discounted(hold_amount, discount);
        if let Some(billing) = billing.as_mut() {
            billing.set_discount(discount);
        }
    }
    let estimate = Estimate {
        tokens: tokens.map_or(0, |t| t.input + t.output),
        cost_nanos: u64::try_from(hold_amount.0).unwrap_or(0),
    };
    let started = std::time::Instant::now();
    let demands = state.admit_identified(&slot, estimate).await;
    timings.since("limits", started);
    let demands = demands?;
    if let Some(billing) = billing.as_mut() {
        billing.set_reservation(state.limiter.clone(), demands);
    }
    // An idempotent request's hold ends with its claim, so a retry that takes the claim over
    // never races a first run that could still charge.
    let ttl = match parts.extensions.get::<HoldDeadline>() {
        Some(HoldDeadline(deadline)) => (*deadline - state.clock.now())
            .to_std()
            .unwrap_or_default()
            .min(state.config.request_hold_ttl),
        None => state.config.request_hold_ttl,
    };
    if let Some(plan) = plan {
        let started = std::time::Instant::now();
        let paid = allowances::pay_fee(
            &state.ledger,
            plan,
            key.account_id,
            now,
            &state.config.currency,
        )
        .await
        .inspect_err(|_| timings.since("units", started));
        paid?;
        let reserved = allowances::reserve(
            &state.store,
            CallUnits {
                plan,
                account: key.account_id,
                group: &route.config.group,
                request: parts
                    .extensions
                    .get::<RequestId>()
                    .copied()
                    .unwrap_or_else(RequestId::new),
                tokens: estimate.tokens,
                worst_cost: hold_amount,
                at: now,
                expires_at: now
                    .checked_add_signed(chrono::Duration::from_std(ttl).unwrap_or_default())
                    .unwrap_or(now),
            },
        )
        .await;
        timings.since("units", started);
        match reserved {
            Ok(None) => {}
            Ok(Some(reserved)) => {
                slot.set_quotas(reserved.quotas.iter().map(|q| quota_item(q, now)).collect());
                if let (Some(quota), true) = (reserved.quotas.first(), reserved.soft_excess > 0) {
                    slot.warn(format!(
                        "allowance '{}' used up; this call goes {} {} over it",
                        quota.name,
                        reserved.soft_excess,
                        quota.meter.as_str()
                    ));
                }
                if let Some(held) = reserved.held {
                    hold_amount = held.wallet_hold;
                    if let Some(billing) = billing.as_mut() {
                        billing.set_units(held);
                    }
                }
            }
            Err(NotReserved::Exhausted(error, quotas)) => {
                slot.set_quotas(quotas.iter().map(|q| quota_item(q, now)).collect());
                return Err(error.into());
            }
            Err(NotReserved::Store(e)) => return Err(e.into()),
        }
    }
    if hold_amount > Nanos::ZERO {
        let started = std::time::Instant::now();
        let hold = state
            .ledger
            .open(HoldSpec {
                account: key.account_id,
                key: Some(key.id),
                key_cap: key.monthly_spend_cap,
                account_debt: cached.account_debt,
                amount: hold_amount,
                ttl,
                source: HoldSource::Request,
                request_id: parts.extensions.get::<RequestId>().copied(),
                metadata: serde_json::Value::Object(Default::default()),
            })
            .await;
        timings.since("hold", started);
        let hold = hold.map_err(|refused| {
            if let HoldRefused::InsufficientBalance {
                required,
                available,
            } = &refused
            {
                let request_id = parts.extensions.get::<RequestId>().copied();
                state
                    .notifier
                    .depleted(key.account_id, *required, *available, request_id);
            }
            let error = refused_error(refused, hold_amount, &state.config.currency);
            match &llm {
                Some(llm) if llm.endpoint.generates() => lower_cap_hint(error, llm),
                _ => error,
            }
        })?;
        if let Some(billing) = billing.as_mut() {
            billing.set_hold(hold);
        }
    }

    let mut parts = parts;
    if pricing.is_metered() {
        // The meter reads the answer: ask for it uncompressed (an answer compressed anyway is
        // decoded for the meter alone), and let no header turn one method into another.
        parts.headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        for name in METHOD_OVERRIDES.iter().chain(&PARTIAL_ANSWERS) {
            parts.headers.remove(*name);
        }
    }
    // The body was re-serialised, so its length is ours.
    let length = llm.as_ref().map(|llm| llm.body.len());
    let response = send_upstream(state, route, parts, body, length, timings).await?;
    let (mut parts, body) = response.into_parts();
    parts.headers = passable_response_headers(&parts.headers, &state.config.request_id_header);
    let status = parts.status.as_u16();
    let Some(billing) = billing.take() else {
        return Ok(Response::from_parts(parts, Body::new(body)));
    };
    if !parts.status.is_success() {
        // The upstream's failure (or redirect) passes through as it is, and costs nothing.
        billing.finish(Outcome::released(status, Some(status)));
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    let is_sse = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let encoding = parts.headers.get(http::header::CONTENT_ENCODING).cloned();
    let rule = match (&call, &llm) {
        (Call::Unmetered(price), _) => CostRule::Fixed {
            cost: *price,
            units: None,
        },
        (_, Some(llm)) if llm.endpoint.is_free() => CostRule::Fixed {
            cost: Nanos::ZERO,
            units: None,
        },
        (_, llm) => CostRule::for_response(
            pricing,
            llm.as_ref().map(|l| (l.prices, l.input_estimate)),
            &parts.headers,
        ),
    };
    // The usage chunk is cut out only of a plain-text stream; a compressed one passes whole.
    let hide_usage_chunk =
        is_sse && encoding.is_none() && llm.as_ref().is_some_and(|l| l.hide_usage_chunk);
    if hide_usage_chunk {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    // An encoding that is not even text is one the meter cannot decode.
    let encoding = encoding
        .as_ref()
        .map(|v| v.to_str().unwrap_or("unreadable"));
    let metering = Metering::new(billing, rule, pricing, status, is_sse, encoding);
    Ok(Response::from_parts(
        parts,
        Body::new(MeteredBody::start(body, metering, hide_usage_chunk).await),
    ))
}

/// A route with `auth = "none"`: straight to the upstream, with no key, limit, hold or usage row.
async fn forward_public(
    state: &AppState,
    route: &Route,
    request: Request,
    timings: &mut Timings,
) -> Result<Response, HttpError> {
    let limit = state.config.max_body_bytes;
    check_declared_length(request.headers(), limit)?;
    let (parts, body) = request.into_parts();
    let response = send_upstream(state, route, parts, body, None, timings).await?;
    let (mut parts, body) = response.into_parts();
    parts.headers = passable_response_headers(&parts.headers, &state.config.request_id_header);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Sends the request on to the route's upstream and waits for its response headers; the
/// upstream's own failures become 502/504 envelopes. `length` replaces `Content-Length` when the
/// body was rewritten.
async fn send_upstream(
    state: &AppState,
    route: &Route,
    parts: http::request::Parts,
    body: Body,
    length: Option<usize>,
    timings: &mut Timings,
) -> Result<http::Response<Incoming>, HttpError> {
    let limit = state.config.max_body_bytes;
    let body_limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let rest = parts
        .uri
        .path()
        .strip_prefix(route.config.prefix.as_str())
        .unwrap_or_default();
    let uri = upstream_uri(&route.config.upstream, rest, parts.uri.query())?;
    let mut upstream_request = http::Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(Limited::new(body, body_limit))
        .map_err(|e| {
            HttpError::new(
                ErrorCode::BadRequest,
                format!("Cannot forward this request: {e}."),
            )
        })?;
    let headers = upstream_request.headers_mut();
    *headers = forwardable_request_headers(&parts.headers);
    if let Some(length) = length {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    if let Some(RequestIdHeader(id)) = parts.extensions.get::<RequestIdHeader>() {
        headers.insert(state.config.request_id_header.clone(), id.clone());
    }
    if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        append_forwarded_for(headers, *peer);
    }
    for (name, value) in &route.config.upstream_headers {
        headers.insert(name.clone(), value.clone());
    }

    let forwarded = std::time::Instant::now();
    let answered =
        tokio::time::timeout(route.config.timeout, route.client.request(upstream_request)).await;
    state
        .metrics
        .upstream(&route.config.prefix, forwarded.elapsed());
    timings.since("upstream", forwarded);
    match answered {
        Err(_elapsed) => Err(HttpError::new(
            ErrorCode::UpstreamTimeout,
            format!(
                "The upstream did not answer within {} ms. Nothing was charged.",
                route.config.timeout.as_millis()
            ),
        )),
        // The client's body, not the upstream, failed the call.
        Ok(Err(e))
            if cause::<LengthLimitError>(&e).is_some() || cause::<BodyStalled>(&e).is_some() =>
        {
            Err(read_error(&e, limit))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, upstream = %route.config.upstream, "upstream request failed");
            let reason = if e.is_connect() {
                "could not be reached"
            } else {
                "broke the connection"
            };
            Err(HttpError::new(
                ErrorCode::UpstreamError,
                format!("The upstream {reason}. Nothing was charged; retry shortly."),
            ))
        }
        Ok(Ok(response)) => Ok(response),
    }
}

/// 403 `model_not_allowed` unless the key's scopes allow the model on the route's group.
fn check_model_scope(key: &KeyRecord, group: &str, model: &str) -> Result<(), HttpError> {
    if access::grants_model(&key.scopes, group, model) {
        return Ok(());
    }
    let allowed = access::models_granted(&key.scopes, group);
    Err(HttpError::from(
        tollgate_core::ApiError::new(
            ErrorCode::ModelNotAllowed,
            format!(
                "This key may not use the model '{model}' on '{group}'; it may use: {}.",
                allowed.join(", ")
            ),
        )
        .with_detail("model", model)
        .with_detail("allowed_models", allowed)
        .with_detail("required_scope", format!("{group}:{model}")),
    ))
}

/// Reads an LLM request's JSON body for its model and output cap, and makes the body the
/// upstream gets one the meter can price:
/// - an output cap (the endpoint's own field) set to `default_max_tokens` when the body has
///   none, so the upstream cannot generate more than the hold covers;
/// - on OpenAI streams, `stream_options.include_usage` always on: without it the stream reports
///   no usage. A client that did not ask for it does not get the usage chunk
///   ([`LlmRequest::hide_usage_chunk`]).
///
/// The body is forwarded as re-serialised from what was parsed, so a body the meter and the
/// upstream could read differently (duplicate keys, say) cannot reach the upstream.
async fn read_llm_request(
    endpoint: Endpoint,
    models: &BTreeMap<String, TokenPrices>,
    body: Body,
    limit: usize,
    default_max_tokens: u64,
) -> Result<(String, LlmRequest), HttpError> {
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Err(read_error(&*e, limit as u64)),
    };
    parse_llm_request(endpoint, models, &bytes, default_max_tokens)
}

/// [`read_llm_request`] once the body is read: the model, and the request as it will be held
/// for and forwarded.
/// serde_json's marker for a raw value (its `raw_value` feature is on in the build): an object
/// with this key is written back as the raw text of its value, not as JSON, so a body using it
/// could be forwarded as something other than what was read and priced.
const RAW_VALUE_KEY: &str = "$serde_json::private::RawValue";

/// Whether the key appears anywhere (serde_json's nesting limit bounds the recursion).
fn holds_raw_value_key(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Object(map) => {
            map.contains_key(RAW_VALUE_KEY) || map.values().any(holds_raw_value_key)
        }
        serde_json::Value::Array(items) => items.iter().any(holds_raw_value_key),
        _ => false,
    }
}

pub fn parse_llm_request(
    endpoint: Endpoint,
    models: &BTreeMap<String, TokenPrices>,
    bytes: &[u8],
    default_max_tokens: u64,
) -> Result<(String, LlmRequest), HttpError> {
    let mut json: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        HttpError::new(
            ErrorCode::BadRequest,
            format!("The request body is not valid JSON: {e}."),
        )
    })?;
    if holds_raw_value_key(&json) {
        return Err(HttpError::new(
            ErrorCode::BadRequest,
            format!("The request body uses the reserved key \"{RAW_VALUE_KEY}\"."),
        ));
    }
    let Some(object) = json.as_object_mut() else {
        return Err(HttpError::new(
            ErrorCode::BadRequest,
            "The request body must be a JSON object.",
        ));
    };
    let Some(model) = object.get("model").and_then(serde_json::Value::as_str) else {
        return Err(validation(
            "model",
            "is required: the model to call, as a string",
        ));
    };
    let model = model.to_string();
    let Some(prices) = models.get(&model).copied() else {
        return Err(HttpError::new(
            ErrorCode::ModelNotFound,
            format!(
                "This route does not serve the model '{model}'. Available: {}.",
                models.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
        .with_detail(
            "available_models",
            models.keys().cloned().collect::<Vec<_>>(),
        ));
    };
    // A background response answers at once, before any usage exists, and is fetched later with
    // a GET: nothing Tollgate could meter.
    if endpoint == Endpoint::Responses
        && object
            .get("background")
            .and_then(serde_json::Value::as_bool)
            == Some(true)
    {
        return Err(tollgate_core::ApiError::new(
            ErrorCode::Forbidden,
            "Background responses report their usage only later, so Tollgate cannot meter them. Send the request without \"background\": true.",
        )
        .with_detail("field", "background")
        .into());
    }
    // The output cap: the largest of the endpoint's fields that are set (an upstream may read
    // any of them), or else the route's default, written into the first.
    let fields = endpoint.max_tokens_fields();
    let mut max_tokens = None;
    for field in fields {
        if let Some(n) = whole_number(object, field)? {
            max_tokens = Some(max_tokens.map_or(n, |m: u64| m.max(n)));
        }
    }
    let max_tokens = match (fields.first(), max_tokens) {
        (None, _) => 0,
        (Some(_), Some(n)) => n,
        (Some(field), None) => {
            object.insert((*field).to_string(), default_max_tokens.into());
            default_max_tokens
        }
    };
    // Several choices (`n`, and legacy completions' `best_of`) each generate up to the cap.
    let mut choices = 1;
    for field in endpoint.choice_fields() {
        if let Some(n) = whole_number(object, field)? {
            choices = choices.max(n);
        }
    }
    let max_tokens = max_tokens.saturating_mul(choices);
    let streams = match object.get("stream") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(streams)) => *streams,
        Some(_) => return Err(validation("stream", "must be true or false")),
    };
    let mut hide_usage_chunk = false;
    if streams && endpoint.needs_usage_option() {
        let options = object
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        if !options.is_object() {
            *options = serde_json::json!({});
        }
        if let Some(options) = options.as_object_mut() {
            let asked = options.insert("include_usage".into(), true.into());
            hide_usage_chunk = asked != Some(serde_json::Value::Bool(true));
        }
    }
    let body = Bytes::from(json.to_string());
    Ok((
        model,
        LlmRequest {
            endpoint,
            prices,
            max_tokens,
            input_estimate: (body.len() as u64).div_ceil(4),
            body,
            hide_usage_chunk,
        },
    ))
}

/// A body field that, if set, must be a whole number (a count of tokens or choices): anything
/// else is refused, never read as absent.
fn whole_number(
    object: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<u64>, HttpError> {
    match object.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| validation(field, "must be a whole number, 0 or more")),
    }
}

/// A hold on an LLM call is mostly its output cap: a refusal for want of credit says so, and
/// which field lowers it.
fn lower_cap_hint(mut error: HttpError, llm: &LlmRequest) -> HttpError {
    // A smaller hold helps only a refusal about the hold's size.
    if !matches!(
        error.error.code,
        ErrorCode::InsufficientBalance | ErrorCode::KeyQuotaExceeded
    ) {
        return error;
    }
    let field = llm
        .endpoint
        .max_tokens_fields()
        .first()
        .copied()
        .unwrap_or("max_tokens");
    error.error.message.push_str(&format!(
        " The hold covers {} output tokens at most; a lower '{field}' in the request lowers it.",
        llm.max_tokens
    ));
    error.with_detail("max_tokens", llm.max_tokens)
}

/// 413 before any work when `Content-Length` is over the limit (a streamed body is checked again
/// as it is read).
fn check_declared_length(headers: &HeaderMap, limit: u64) -> Result<(), HttpError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit => Err(payload_too_large(limit)),
        _ => Ok(()),
    }
}

fn upstream_uri(base: &Uri, rest: &str, query: Option<&str>) -> Result<Uri, HttpError> {
    let base_path = base.path().trim_end_matches('/');
    let path_and_query = match query {
        Some(q) => format!("{base_path}{rest}?{q}"),
        None if base_path.is_empty() && rest.is_empty() => "/".to_string(),
        None => format!("{base_path}{rest}"),
    };
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| {
        HttpError::new(
            ErrorCode::BadRequest,
            "The request path cannot be forwarded.",
        )
    })?);
    Uri::from_parts(parts).map_err(|_| {
        HttpError::new(
            ErrorCode::BadRequest,
            "The request path cannot be forwarded.",
        )
    })
}

/// Headers named in `Connection` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect()
}

/// The client's headers minus hop-by-hop ones, `Host` (set from the upstream URL) and the
/// client's Tollgate credentials, which never reach the upstream.
fn forwardable_request_headers(incoming: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        let drop = is_hop_by_hop(name)
            || listed.iter().any(|l| l == name.as_str())
            || name == http::header::HOST
            || name == http::header::AUTHORIZATION
            || name == "x-api-key";
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {ip}"),
        None => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", value);
    }
}

/// The upstream's headers minus hop-by-hop ones. Its own request ID is kept as
/// `x-upstream-request-id`, since the request-ID header carries Tollgate's.
fn passable_response_headers(incoming: &HeaderMap, request_id_header: &HeaderName) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if is_hop_by_hop(name) || listed.iter().any(|l| l == name.as_str()) {
            continue;
        }
        if name == request_id_header || name == ANTHROPIC_REQUEST_ID {
            out.append(UPSTREAM_REQUEST_ID, value.clone());
        } else {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The allowance's quota as the `RateLimit` fields show it.
fn quota_item(quota: &Quota, now: chrono::DateTime<chrono::Utc>) -> QuotaItem {
    QuotaItem {
        name: quota.name.clone(),
        limit: quota.limit,
        window_seconds: quota.window_seconds,
        unit: match quota.meter {
            Meter::Requests => "request",
            Meter::Tokens => "token",
            Meter::Cost => "nanocredit",
        },
        remaining: quota.remaining,
        reset_seconds: u64::try_from((quota.resets_at - now).num_seconds()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `llm_request` fuzz target: serde_json writes an object keyed by its raw-value
    /// marker back as bare text, so such a body would have been forwarded as invalid JSON.
    #[test]
    fn a_body_using_serde_jsons_raw_value_marker_is_refused() {
        let models = BTreeMap::from([(
            "m".to_string(),
            TokenPrices {
                input: Nanos(1),
                output: Nanos(1),
                cached_input: Nanos(1),
            },
        )]);
        let sent = r#"{"model":"m","messages":[{"role":"user","\u0024serde_json::private::RawValue":"hi"}]}"#;
        let refused = parse_llm_request(Endpoint::ChatCompletions, &models, sent.as_bytes(), 16)
            .err()
            .map(|e| e.error.code);
        assert_eq!(refused, Some(ErrorCode::BadRequest));
    }

    /// Found by the `llm_request` fuzz target: a number in a forwarded body drifted by one unit
    /// in the last place each time it was parsed and written again, so the upstream was not sent
    /// the value the client sent.
    #[test]
    fn a_forwarded_body_keeps_every_number_it_carries() {
        let prices = TokenPrices {
            input: Nanos(1),
            output: Nanos(1),
            cached_input: Nanos(1),
        };
        let models = BTreeMap::from([("m".to_string(), prices)]);
        let sent = r#"{"model":"m","input":"hi","x":1022222222222222222222222222222,"t":0.1,"u":1.7976931348623157e308}"#;
        let (_, first) =
            parse_llm_request(Endpoint::Responses, &models, sent.as_bytes(), 16).unwrap();
        let (_, again) = parse_llm_request(Endpoint::Responses, &models, &first.body, 16).unwrap();
        assert_eq!(first.body, again.body);
        let value = |body: &[u8], field: &str| {
            serde_json::from_slice::<serde_json::Value>(body).unwrap()[field].as_f64()
        };
        for field in ["x", "t", "u"] {
            assert_eq!(
                value(&first.body, field),
                value(sent.as_bytes(), field),
                "{field}"
            );
        }
    }

    #[test]
    fn joins_upstream_paths() {
        let base: Uri = "http://h:1/v1".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, "/chat", None).unwrap().to_string(),
            "http://h:1/v1/chat"
        );
        assert_eq!(
            upstream_uri(&base, "", Some("a=1")).unwrap().to_string(),
            "http://h:1/v1?a=1"
        );
        let root: Uri = "http://h:1".parse().unwrap();
        assert_eq!(
            upstream_uri(&root, "", None).unwrap().to_string(),
            "http://h:1/"
        );
        assert_eq!(
            upstream_uri(&root, "/x", Some("q")).unwrap().to_string(),
            "http://h:1/x?q"
        );
    }

    #[test]
    fn strips_hop_by_hop_and_credentials() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer tg_live_x"),
        );
        h.insert("x-api-key", HeaderValue::from_static("tg_live_x"));
        h.insert("host", HeaderValue::from_static("gateway"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let out = forwardable_request_headers(&h);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("content-type"));
    }
}
