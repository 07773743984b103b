//! The error envelope in each profile. **API Boundary:** these shapes are what clients parse;
//! change them only additively.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tollgate_core::{ApiError, ErrorCode, RequestId};

/// How a route renders the errors Tollgate originates. The status is the same in every profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorProfile {
    /// `{"error":{type,code,message,request_id,details}}`; also what OpenAI SDKs parse.
    #[default]
    Native,
    /// OpenAI's exact shape: `{"error":{message,type,param,code}}`.
    Openai,
    /// Anthropic's shape: `{"type":"error","error":{type,message},"request_id"}`.
    Anthropic,
    /// RFC 9457 problem details (`application/problem+json`) with `code` and `request_id`.
    Problem,
}

impl ErrorProfile {
    pub const ALL: [ErrorProfile; 4] = [
        ErrorProfile::Native,
        ErrorProfile::Openai,
        ErrorProfile::Anthropic,
        ErrorProfile::Problem,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorProfile::Native => "native",
            ErrorProfile::Openai => "openai",
            ErrorProfile::Anthropic => "anthropic",
            ErrorProfile::Problem => "problem",
        }
    }
}

pub struct RenderedError {
    pub content_type: &'static str,
    pub body: Value,
}

/// Renders `err` in `profile`. The one function that shapes error bodies.
pub fn render_error(
    profile: ErrorProfile,
    err: &ApiError,
    request_id: &RequestId,
) -> RenderedError {
    let info = err.code.info();
    let request_id = request_id.to_string();
    match profile {
        ErrorProfile::Native => {
            let mut error = Map::new();
            error.insert("type".into(), info.kind.into());
            error.insert("code".into(), err.code.as_str().into());
            error.insert("message".into(), err.message.clone().into());
            error.insert("request_id".into(), request_id.into());
            error.insert("details".into(), Value::Object(err.details.clone()));
            if !err.field_errors.is_empty() {
                error.insert("field_errors".into(), json!(err.field_errors));
            }
            RenderedError {
                content_type: "application/json",
                body: json!({ "error": error }),
            }
        }
        ErrorProfile::Openai => RenderedError {
            content_type: "application/json",
            body: json!({
                "error": {
                    "message": err.message,
                    "type": info.kind,
                    "param": err.field_errors.keys().next(),
                    "code": err.code.as_str(),
                }
            }),
        },
        ErrorProfile::Anthropic => RenderedError {
            content_type: "application/json",
            body: json!({
                "type": "error",
                "error": { "type": info.kind, "message": err.message },
                "request_id": request_id,
            }),
        },
        ErrorProfile::Problem => {
            let mut problem = Map::new();
            problem.insert(
                "type".into(),
                format!("urn:tollgate:error:{}", err.code).into(),
            );
            problem.insert("title".into(), info.meaning.into());
            problem.insert("status".into(), info.status.into());
            problem.insert("detail".into(), err.message.clone().into());
            problem.insert("code".into(), err.code.as_str().into());
            problem.insert("request_id".into(), request_id.into());
            if !err.details.is_empty() {
                problem.insert("details".into(), Value::Object(err.details.clone()));
            }
            if !err.field_errors.is_empty() {
                problem.insert("field_errors".into(), json!(err.field_errors));
            }
            RenderedError {
                content_type: "application/problem+json",
                body: Value::Object(problem),
            }
        }
    }
}

/// The whole of `docs/errors.md`: the catalogue plus one rendered example per profile.
pub fn errors_doc() -> String {
    let mut doc = tollgate_core::error::catalogue_markdown();
    let languages: Vec<String> = crate::Language::ALL
        .iter()
        .map(|l| format!("`{}`", l.tag()))
        .collect();
    doc.push_str(&format!(
        "\n## Languages\n\n\
         `message` follows the request's `Accept-Language` (the highest `q` first) where a \
         translation exists: {}. Another language, or none asked, gets English. Every error \
         response says which it used in `Content-Language`. English messages are written where the \
         error arises and carry its specifics (amounts, ids, limits); a translated message is that \
         language's message for the code (`crates/tollgate-wire/messages/<tag>.toml`), and the \
         specifics stay in `details`. `code`, `type` and `details` are never translated.\n",
        languages.join(", ")
    ));
    doc.push_str(
        "\n## Profiles\n\n\
         Each route picks an `error_profile`; the management API uses `native`. The same error has \
         the same status in every profile. Here is one `rate_limited` error in each:\n",
    );
    // The example is the limiter's own refusal, so its message is one a client really gets.
    let policy = tollgate_core::ratelimit::Policy {
        name: "key-rpm".into(),
        scope: tollgate_core::ratelimit::Scope::Key,
        unit: tollgate_core::ratelimit::Unit::Requests,
        limit: 60,
        window: std::time::Duration::from_secs(60),
        burst: 1,
        on_limiter_failure: Default::default(),
    };
    let example = policy.refusal(1, std::time::Duration::from_millis(22_400));
    let request_id = example_request_id();
    for profile in ErrorProfile::ALL {
        let rendered = render_error(profile, &example, &request_id);
        let body = serde_json::to_string_pretty(&rendered.body).unwrap_or_default();
        doc.push_str(&format!(
            "\n### `{}` (`{}`)\n\n```json\n{body}\n```\n",
            profile.as_str(),
            rendered.content_type
        ));
    }
    doc
}

/// The native envelope's schema in the OpenAPI document. Bodies are shaped by [`render_error`];
/// this type only describes them, with `code` listing the whole catalogue.
#[cfg(feature = "openapi")]
pub struct ErrorEnvelope;

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ErrorEnvelope {}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ErrorEnvelope {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Type};
        let string = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
        };
        let codes = ErrorCode::ALL.iter().map(|c| c.as_str());
        let kinds: std::collections::BTreeSet<_> =
            ErrorCode::ALL.iter().map(|c| c.info().kind).collect();
        let field_messages =
            ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String));
        let error = ObjectBuilder::new()
            .property(
                "type",
                string("The error's family, as OpenAI SDKs read it.").enum_values(Some(kinds)),
            )
            .required("type")
            .property(
                "code",
                string("What went wrong; stable, one per failure mode (see docs/errors.md).")
                    .enum_values(Some(codes)),
            )
            .required("code")
            .property("message", string("A sentence for humans; never parse it."))
            .required("message")
            .property(
                "request_id",
                string("The request's ID, also in the `x-request-id` header."),
            )
            .required("request_id")
            .property(
                "details",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .description(Some(
                        "Machine-readable facts about this failure (a policy, an amount, a scope).",
                    )),
            )
            .required("details")
            .property(
                "field_errors",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .additional_properties(Some(AdditionalProperties::RefOr(field_messages.into())))
                    .description(Some(
                        "Only on `validation_error`: each invalid field and what is wrong with it.",
                    )),
            );
        ObjectBuilder::new()
            .description(Some(
                "Every error Tollgate originates on the management API: one envelope, one code.",
            ))
            .property("error", error)
            .required("error")
            .into()
    }
}

/// An example error body for `code` in `profile`, as the OpenAPI document shows it.
pub fn example_error(code: ErrorCode, profile: ErrorProfile) -> Value {
    let info = code.info();
    let mut err = ApiError::new(code, info.meaning);
    match code {
        ErrorCode::ValidationError => {
            let mut fields = std::collections::BTreeMap::new();
            fields.insert("name".to_string(), vec!["must not be empty".to_string()]);
            err = ApiError::validation(fields);
        }
        ErrorCode::RateLimited => err = err.with_detail("policy", "per-key"),
        _ => {}
    }
    render_error(profile, &err, &example_request_id()).body
}

fn example_request_id() -> RequestId {
    RequestId::parse("req_01JD3ZK6Q9X8V7T5R4N2M0P1AB").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, expect_file};
    use std::collections::BTreeMap;

    fn render_all(err: &ApiError) -> String {
        ErrorProfile::ALL
            .iter()
            .map(|p| {
                let r = render_error(*p, err, &example_request_id());
                format!("{} {} {}\n", p.as_str(), r.content_type, r.body)
            })
            .collect()
    }

    #[test]
    fn docs_errors_md_is_generated_from_the_catalogue() {
        expect_file!["../../../docs/errors.md"].assert_eq(&errors_doc());
    }

    #[test]
    fn invalid_api_key_in_every_profile() {
        let err = ApiError::new(ErrorCode::InvalidApiKey, "No API key was provided.");
        expect![[r#"
            native application/json {"error":{"code":"invalid_api_key","details":{},"message":"No API key was provided.","request_id":"req_01JD3ZK6Q9X8V7T5R4N2M0P1AB","type":"authentication_error"}}
            openai application/json {"error":{"code":"invalid_api_key","message":"No API key was provided.","param":null,"type":"authentication_error"}}
            anthropic application/json {"error":{"message":"No API key was provided.","type":"authentication_error"},"request_id":"req_01JD3ZK6Q9X8V7T5R4N2M0P1AB","type":"error"}
            problem application/problem+json {"code":"invalid_api_key","detail":"No API key was provided.","request_id":"req_01JD3ZK6Q9X8V7T5R4N2M0P1AB","status":401,"title":"No API key was sent, or it is malformed or unknown.","type":"urn:tollgate:error:invalid_api_key"}
        "#]]
        .assert_eq(&render_all(&err));
    }

    #[test]
    fn validation_error_in_every_profile() {
        let mut fields = BTreeMap::new();
        fields.insert("name".to_string(), vec!["must not be empty".to_string()]);
        let err = ApiError::validation(fields);
        expect![[r#"
            native application/json {"error":{"code":"validation_error","details":{},"field_errors":{"name":["must not be empty"]},"message":"1 invalid field: name: must not be empty.","request_id":"req_01JD3ZK6Q9X8V7T5R4N2M0P1AB","type":"invalid_request_error"}}
            openai application/json {"error":{"code":"validation_error","message":"1 invalid field: name: must not be empty.","param":"name","type":"invalid_request_error"}}
            anthropic application/json {"error":{"message":"1 invalid field: name: must not be empty.","type":"invalid_request_error"},"request_id":"req_01JD3ZK6Q9X8V7T5R4N2M0P1AB","type":"error"}
            problem application/problem+json {"code":"validation_error","detail":"1 invalid field: name: must not be empty.","field_errors":{"name":["must not be empty"]},"request_id":"req_01JD3ZK6Q9X8V7T5R4N2M0P1AB","status":400,"title":"The request was readable but some fields are missing or invalid.","type":"urn:tollgate:error:validation_error"}
        "#]]
        .assert_eq(&render_all(&err));
    }

    #[test]
    fn every_code_renders_with_its_code_and_request_id_where_the_profile_has_them() {
        for code in ErrorCode::ALL {
            let err = ApiError::new(*code, "m");
            let native = render_error(ErrorProfile::Native, &err, &example_request_id()).body;
            assert_eq!(native["error"]["code"], code.as_str());
            assert_eq!(
                native["error"]["request_id"],
                "req_01JD3ZK6Q9X8V7T5R4N2M0P1AB"
            );
            let problem = render_error(ErrorProfile::Problem, &err, &example_request_id()).body;
            assert_eq!(problem["status"], code.info().status);
        }
    }
}
