//! The few calls Tollgate makes to Stripe's API, and the events it reads back.
//!
//! Events are read into minimal structs, only the fields Tollgate uses, so an account on another
//! API version (which adds, renames or expands other fields) still works. Requests are
//! form-encoded as Stripe's API expects; every create carries an `Idempotency-Key`, so a retried
//! create makes nothing twice.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// The most of Stripe's answer that is read.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Why a call to Stripe did not give an answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Not reached, or no answer within the timeout: nothing is known to have happened.
    #[error("Stripe did not answer: {0}")]
    Unreachable(String),
    /// Stripe answered with an error (`code`: Stripe's, such as `authentication_required`).
    #[error("Stripe refused the call ({status}): {message}")]
    Refused {
        status: u16,
        code: Option<String>,
        message: String,
    },
    #[error("Stripe's answer could not be read: {0}")]
    Unreadable(String),
}

/// A Checkout session as created.
#[derive(Debug, Clone, Deserialize)]
pub struct CreatedSession {
    pub id: String,
    pub url: String,
}

/// A PaymentIntent as created off-session.
#[derive(Debug, Clone, Deserialize)]
pub struct CreatedIntent {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub amount_received: i64,
    pub currency: String,
}

/// What a new Checkout session is for.
pub struct SessionRequest<'a> {
    /// The top-up's id: the session's `client_reference_id`, metadata and idempotency key.
    pub topup: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub product: &'a str,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    pub expires_at: i64,
}

/// An off-session charge of a saved card (an automatic top-up).
pub struct IntentRequest<'a> {
    pub topup: &'a str,
    pub idempotency_key: &'a str,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub customer: &'a str,
    pub payment_method: &'a str,
}

/// A page of the event list.
#[derive(Debug, Deserialize)]
pub struct EventPage {
    pub data: Vec<serde_json::Value>,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Clone)]
pub struct StripeClient {
    base: String,
    secret_key: String,
    timeout: Duration,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl StripeClient {
    pub fn new(base: &str, secret_key: &str, timeout: Duration) -> StripeClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        StripeClient {
            base: base.trim_end_matches('/').to_string(),
            secret_key: secret_key.to_string(),
            timeout,
            http: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    pub async fn create_checkout_session(
        &self,
        request: &SessionRequest<'_>,
    ) -> Result<CreatedSession, StripeError> {
        let amount = request.amount_minor.to_string();
        let expires_at = request.expires_at.to_string();
        let form = [
            ("mode", "payment"),
            ("client_reference_id", request.topup),
            ("metadata[topup_id]", request.topup),
            ("payment_intent_data[metadata][topup_id]", request.topup),
            ("line_items[0][quantity]", "1"),
            ("line_items[0][price_data][currency]", request.currency),
            ("line_items[0][price_data][unit_amount]", &amount),
            (
                "line_items[0][price_data][product_data][name]",
                request.product,
            ),
            ("success_url", request.success_url),
            ("cancel_url", request.cancel_url),
            ("expires_at", &expires_at),
            // The card is kept for automatic top-ups, which charge it with nobody there.
            ("customer_creation", "always"),
            ("payment_intent_data[setup_future_usage]", "off_session"),
        ];
        self.post("/v1/checkout/sessions", &form, request.topup)
            .await
    }

    pub async fn create_payment_intent(
        &self,
        request: &IntentRequest<'_>,
    ) -> Result<CreatedIntent, StripeError> {
        let amount = request.amount_minor.to_string();
        let form = [
            ("amount", amount.as_str()),
            ("currency", request.currency),
            ("customer", request.customer),
            ("payment_method", request.payment_method),
            ("off_session", "true"),
            ("confirm", "true"),
            ("metadata[topup_id]", request.topup),
        ];
        self.post("/v1/payment_intents", &form, request.idempotency_key)
            .await
    }

    /// Events created at or after `since` (Unix seconds), oldest page last, after
    /// `starting_after` if given.
    pub async fn events(
        &self,
        since: i64,
        starting_after: Option<&str>,
    ) -> Result<EventPage, StripeError> {
        let mut query = vec![
            ("created[gte]", since.to_string()),
            ("limit", "100".to_string()),
        ];
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_string()));
        }
        let query = serde_urlencoded::to_string(&query)
            .map_err(|e| StripeError::Unreadable(e.to_string()))?;
        let request = http::Request::get(format!("{}/v1/events?{query}", self.base))
            .header(http::header::AUTHORIZATION, self.authorization())
            .body(Full::new(Bytes::new()))
            .map_err(|e| StripeError::Unreachable(e.to_string()))?;
        self.send(request).await
    }

    /// A subscription as it stands now (its events may arrive late and out of order).
    pub async fn subscription(&self, id: &str) -> Result<StripeSubscription, StripeError> {
        // Stripe's ids are `sub_` and letters and digits: anything else is not one of them.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(StripeError::Unreadable(format!(
                "'{id}' is not a subscription id"
            )));
        }
        let request = http::Request::get(format!("{}/v1/subscriptions/{id}", self.base))
            .header(http::header::AUTHORIZATION, self.authorization())
            .body(Full::new(Bytes::new()))
            .map_err(|e| StripeError::Unreachable(e.to_string()))?;
        self.send(request).await
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        form: &[(&str, &str)],
        idempotency_key: &str,
    ) -> Result<T, StripeError> {
        let body = serde_urlencoded::to_string(form)
            .map_err(|e| StripeError::Unreadable(e.to_string()))?;
        let request = http::Request::post(format!("{}{path}", self.base))
            .header(http::header::AUTHORIZATION, self.authorization())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header("idempotency-key", idempotency_key)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| StripeError::Unreachable(e.to_string()))?;
        self.send(request).await
    }

    fn authorization(&self) -> String {
        format!("Bearer {}", self.secret_key)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<T, StripeError> {
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| StripeError::Unreachable(e.to_string()))?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| StripeError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, StripeError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                StripeError::Unreachable(format!("no answer within {:?}", self.timeout))
            })??;
        if !status.is_success() {
            #[derive(Deserialize)]
            struct Failure {
                error: FailureDetail,
            }
            #[derive(Deserialize)]
            struct FailureDetail {
                #[serde(default)]
                message: String,
                code: Option<String>,
            }
            let (code, message) = serde_json::from_slice::<Failure>(&body)
                .map(|f| (f.error.code, f.error.message))
                .unwrap_or_else(|_| {
                    (
                        None,
                        String::from_utf8_lossy(&body).chars().take(200).collect(),
                    )
                });
            // Stripe's own trouble is as good as unreachable: nothing to act on, retry later.
            if status.is_server_error() {
                return Err(StripeError::Unreachable(format!("{status}: {message}")));
            }
            return Err(StripeError::Refused {
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| StripeError::Unreadable(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Events, read minimally

/// An event: its id, type and the object it is about (read per type below).
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: EventData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

// Which top-up an event is about is read from the raw object (its metadata, client reference or
// Stripe ids), by `service::topup_of`; these structs hold what each type's handling uses.

#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutSession {
    pub payment_status: String,
    #[serde(default, deserialize_with = "id_of")]
    pub payment_intent: Option<String>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    #[serde(default)]
    pub amount_received: i64,
    pub currency: String,
    pub last_payment_error: Option<PaymentError>,
    #[serde(default, deserialize_with = "id_of")]
    pub customer: Option<String>,
    #[serde(default, deserialize_with = "id_of")]
    pub payment_method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaymentError {
    pub code: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Refund {
    pub id: String,
    pub amount: i64,
    pub currency: String,
    #[serde(default, deserialize_with = "id_of")]
    pub payment_intent: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Charge {
    pub refunds: Option<RefundList>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RefundList {
    pub data: Vec<Refund>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Dispute {
    pub id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StripeSubscription {
    pub id: String,
    pub status: String,
    /// Unix seconds.
    pub start_date: i64,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    pub items: SubscriptionItems,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionItems {
    pub data: Vec<SubscriptionItem>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionItem {
    #[serde(deserialize_with = "id_of")]
    pub price: Option<String>,
}

/// An id field Stripe may send as the id or, expanded, as the object carrying it.
fn id_of<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::String(id)) => Some(id),
        Some(serde_json::Value::Object(object)) => object
            .get("id")
            .and_then(|id| id.as_str())
            .map(str::to_string),
        _ => None,
    })
}
