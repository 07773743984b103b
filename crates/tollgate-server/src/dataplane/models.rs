//! `GET …/models` and `GET …/models/{id}` on an LLM route, answered from the route's own price
//! table rather than the upstream's list: a model Tollgate has no price for would be refused
//! (404 `model_not_found`) anyway, so the list shows exactly what the caller's key can use. The
//! shapes are the OpenAI and Anthropic APIs' own, so their SDKs' `models.list()` and
//! `models.retrieve()` work unchanged. Free, and never forwarded.

use crate::http::error::HttpError;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tollgate_core::metering::LlmApi;
use tollgate_core::{access, ApiError, ErrorCode};
use tollgate_store::KeyRecord;

/// A request for the model list or one model, by the path after the route's prefix.
pub enum ModelsCall<'p> {
    List,
    One(&'p str),
}

impl<'p> ModelsCall<'p> {
    /// `…/models` or `…/models/{id}`, read with GET; anything else is not one.
    pub fn read(method: &http::Method, rest: &'p str) -> Option<Self> {
        if method != http::Method::GET {
            return None;
        }
        let mut segments = rest.rsplit('/');
        match (segments.next()?, segments.next()) {
            ("models", _) => Some(ModelsCall::List),
            (id, Some("models")) if !id.is_empty() => Some(ModelsCall::One(id)),
            _ => None,
        }
    }
}

/// The answer, for a key that passed the route's scope check: the route's models that the key's
/// scopes allow.
pub fn answer<'m>(
    call: ModelsCall<'_>,
    api: LlmApi,
    models: impl Iterator<Item = &'m String>,
    group: &str,
    key: &KeyRecord,
) -> Result<Response, HttpError> {
    let usable: Vec<&String> = models
        .filter(|model| access::grants_model(&key.scopes, group, model))
        .collect();
    match call {
        ModelsCall::List => {
            let data: Vec<Value> = usable.iter().map(|m| model_object(api, m)).collect();
            Ok(Json(match api {
                LlmApi::OpenAi => json!({"object": "list", "data": data}),
                LlmApi::Anthropic => json!({
                    "data": data,
                    "has_more": false,
                    "first_id": usable.first(),
                    "last_id": usable.last(),
                }),
            })
            .into_response())
        }
        ModelsCall::One(id) => match usable.iter().find(|m| m.as_str() == id) {
            Some(model) => Ok(Json(model_object(api, model)).into_response()),
            None => {
                let available: Vec<String> = usable.iter().map(|m| m.to_string()).collect();
                Err(ApiError::new(
                    ErrorCode::ModelNotFound,
                    format!(
                        "No model '{id}' here for this key. Available: {}.",
                        available.join(", ")
                    ),
                )
                .with_detail("model", id.to_string())
                .with_detail("available_models", available)
                .into())
            }
        },
    }
}

fn model_object(api: LlmApi, id: &str) -> Value {
    match api {
        LlmApi::OpenAi => {
            json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"})
        }
        LlmApi::Anthropic => json!({
            "type": "model",
            "id": id,
            "display_name": id,
            "created_at": "1970-01-01T00:00:00Z",
        }),
    }
}
