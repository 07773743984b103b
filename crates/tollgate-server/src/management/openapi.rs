//! The OpenAPI 3.1 document (`/api/openapi.json`) and the Swagger UI that renders it
//! (`/api/docs`).
//!
//! Every operation is declared beside its handler (`#[utoipa::path]`) and registered with
//! `utoipa_axum::routes!`, which adds the route and its description together: a route cannot be
//! served undescribed. [`finish`] adds what belongs to the whole document: the auth schemes, the
//! errors every call can meet, the `Idempotency-Key` header, and the data-plane routes of the
//! running config. Error responses are built from the error catalogue, one per status, with an
//! example for each code, so the document cannot name a code Tollgate does not send.
//!
//! The Swagger UI is vendored (`assets/swagger-ui`, refreshed by `scripts/vendor-swagger-ui`) and
//! compiled into the binary: the page works with no network. (`utoipa-swagger-ui` downloads its
//! assets while building, which a machine without internet cannot do.)

use crate::config::{Config, RouteConfig};
use crate::http::error::HttpError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tollgate_core::{AccountId, ApiError, ErrorCode, KeyId, RequestId};
use tollgate_wire::envelope::{example_error, render_error, ErrorEnvelope, ErrorProfile};
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{Response as ApiResponse, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    Content, OpenApi as Document, PathItem, Ref, RefOr, Required, SecurityRequirement,
};
use utoipa::{OpenApi, PartialSchema, ToResponse};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate",
        description = "A metered API gateway: accounts with prepaid wallets, API keys, rate limits, \
            exact billing and one machine-readable error for every failure.\n\n\
            **Auth.** The management API takes the operator's admin token or an account's master \
            key as `Authorization: Bearer ...`; the data plane takes any active key. Click \
            *Authorize* and paste one.\n\n\
            **Errors.** Every error the management API answers is the envelope \
            `{\"error\": {type, code, message, request_id, details}}`; branch on `code`. Data-plane \
            routes render the same codes in the route's `error_profile`.\n\n\
            **Money** is exact: `nanos` (1 credit = 10⁹ nanos) and the same amount as a decimal \
            string in `credits`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "accounts", description = "Customers of the API, each with one wallet."),
        (name = "keys", description = "API keys: scopes, IP allowlists, expiry, spend caps, rotation."),
        (name = "billing", description = "Credits, balance and the double-entry ledger."),
        (name = "plans", description = "Subscriptions to configured plans, credit packs, and the included units calls draw on before the wallet."),
        (name = "webhooks", description = "Endpoints that receive signed events (balance low, top-ups, keys), their delivery logs, and the balance alert."),
        (name = "export", description = "Usage export to the operator's billing systems (Stripe, OpenMeter, Lago, a signed webhook): each sink's standing, its parked records, and the accounts' customer ids."),
        (name = "holds", description = "Reservations of credit, settled or released exactly once."),
        (name = "usage", description = "The data-plane request log and its totals."),
        (name = "audit", description = "The hash-chained log of every management change."),
        (name = "operations", description = "Health, readiness, metrics and this document."),
        (name = "data plane", description = "Calls proxied to the configured upstream APIs."),
    ),
    components(
        schemas(ErrorEnvelope),
        responses(
            Status400, Status401, Status402, Status403, Status404, Status409, Status413,
            Status414, Status422, Status429, Status431, Status500, Status503
        )
    )
)]
struct ApiDoc;

/// The document's skeleton: info, tags and the shared components, before any path.
pub fn skeleton() -> Document {
    ApiDoc::openapi()
}

/// The component name of each error status's response.
fn status_name(status: u16) -> &'static str {
    match status {
        400 => "BadRequest",
        401 => "Unauthorized",
        402 => "PaymentRequired",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        413 => "PayloadTooLarge",
        414 => "UriTooLong",
        422 => "UnprocessableEntity",
        429 => "TooManyRequests",
        431 => "HeadersTooLarge",
        500 => "InternalServerError",
        502 => "BadGateway",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "Error",
    }
}

macro_rules! error_responses {
    ($($marker:ident = $status:literal;)*) => {
        $(
            #[doc = concat!("The management API's ", stringify!($status), " response, for `#[utoipa::path]`.")]
            pub struct $marker;

            impl<'r> ToResponse<'r> for $marker {
                fn response() -> (&'r str, RefOr<ApiResponse>) {
                    let response = error_response($status, ErrorProfile::Native, management_codes);
                    (status_name($status), response.into())
                }
            }
        )*
    };
}

error_responses! {
    Status400 = 400;
    Status401 = 401;
    Status402 = 402;
    Status403 = 403;
    Status404 = 404;
    Status409 = 409;
    Status413 = 413;
    Status414 = 414;
    Status422 = 422;
    Status429 = 429;
    Status431 = 431;
    Status500 = 500;
    Status503 = 503;
}

/// The errors Tollgate itself may answer a data-plane call with.
const DATA_PLANE_ERRORS: [u16; 16] = [
    400, 401, 402, 403, 404, 405, 409, 413, 414, 422, 429, 431, 500, 502, 503, 504,
];

/// Codes only the data plane answers with (they concern models and upstreams).
fn management_codes(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::ModelNotFound
            | ErrorCode::ModelNotAllowed
            | ErrorCode::UpstreamError
            | ErrorCode::UpstreamTimeout
    )
}

/// The response for an error status: every code of that status, each with an example body in
/// `profile`, plus the headers an error carries.
fn error_response(
    status: u16,
    profile: ErrorProfile,
    include: fn(ErrorCode) -> bool,
) -> ApiResponse {
    let codes: Vec<ErrorCode> = ErrorCode::ALL
        .iter()
        .copied()
        .filter(|code| code.info().status == status && include(*code))
        .collect();
    let description = codes
        .iter()
        .map(|code| format!("`{code}`: {}", code.info().meaning))
        .collect::<Vec<_>>()
        .join("\n\n");
    let sample = ApiError::new(ErrorCode::InternalError, "");
    let content_type = render_error(profile, &sample, &Default::default()).content_type;
    let mut content = Content::new(Some(match profile {
        ErrorProfile::Native => RefOr::Ref(Ref::from_schema_name("ErrorEnvelope")),
        other => ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(format!(
                "The `{}` error shape; see docs/errors.md.",
                other.as_str()
            )))
            .into(),
    }));
    for code in &codes {
        let example = ExampleBuilder::new()
            .summary(code.info().meaning)
            .value(Some(example_error(*code, profile)))
            .build();
        content
            .examples
            .insert(code.as_str().to_string(), example.into());
    }
    let mut response = ResponseBuilder::new()
        .description(description)
        .content(content_type, content)
        .header(
            "x-request-id",
            string_header("The request's ID, also in the body."),
        );
    if codes
        .iter()
        .any(|code| code.info().retryable && status != 500)
    {
        response = response.header(
            "retry-after",
            string_header("Seconds to wait before retrying."),
        );
    }
    response.build()
}

fn string_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .description(Some(description))
        .build()
}

/// Completes the document for the running config: auth schemes, the errors and headers common to
/// every management call, and one path per data-plane route.
pub fn finish(mut doc: Document, config: &Config) -> Document {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "admin_token",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("tga_...")
                .description(Some(
                    "The operator's admin token (`TOLLGATE_ADMIN_TOKEN`; the demo prints it).",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("tg_live_...")
                .description(Some(
                    "An API key. The management API takes master keys; the data plane any active key.",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        "api_key_header",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "x-api-key",
            "An API key in `X-Api-Key`, as Anthropic's SDKs send it.",
        ))),
    );

    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with(&config.api_prefix) || path.starts_with("/api/docs") {
            continue;
        }
        let documents_itself = path == "/api/openapi.json";
        for (method, operation) in operations_mut(item) {
            if documents_itself {
                continue;
            }
            constrain_query(path, operation);
            let claims_key = matches!(method, HttpMethod::Post | HttpMethod::Patch);
            add_common_errors(operation, operation.request_body.is_some(), claims_key);
            if claims_key {
                add_parameter(operation, idempotency_key());
            }
        }
    }

    for route in &config.routes {
        let profile = route.error_profile;
        for status in DATA_PLANE_ERRORS {
            let name = data_plane_error_name(status, profile);
            components
                .responses
                .entry(name)
                .or_insert_with(|| error_response(status, profile, |_| true).into());
        }
        doc.paths
            .paths
            .insert(format!("{}/{{path}}", route.prefix), data_plane_path(route));
    }
    doc
}

/// Errors any authenticated management call can meet, whatever it does: a bad query string or
/// header (400), and for a call that takes an `Idempotency-Key`, the same key still running
/// (409) or used for another request (422).
fn add_common_errors(operation: &mut Operation, has_body: bool, claims_key: bool) {
    let mut statuses = vec![400, 401, 414, 429, 431, 500, 503];
    if has_body {
        statuses.push(413);
    }
    if claims_key {
        statuses.extend([409, 422]);
    }
    for status in statuses {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(status_name(status))));
    }
}

/// The query parameters shared across listings, declared as the handlers check them: a typed
/// id's pattern, a page size of 1 to 500, a status code, the form of each listing's cursor.
fn constrain_query(path: &str, operation: &mut Operation) {
    for parameter in operation.parameters.iter_mut().flatten() {
        let RefOr::T(parameter) = parameter else {
            continue;
        };
        if !matches!(parameter.parameter_in, ParameterIn::Query) {
            continue;
        }
        let schema: RefOr<Schema> = match parameter.name.as_str() {
            "account_id" => AccountId::schema(),
            "key_id" => KeyId::schema(),
            "limit" => ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(crate::management::extract::MAX_PAGE))
                .into(),
            "status" if path.ends_with("/requests") => ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(100))
                .maximum(Some(599))
                .into(),
            "status" if path.ends_with("/accounts") => ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["active", "suspended"]))
                .into(),
            "group_by" => ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["day", "key", "route", "model"]))
                .into(),
            // A cursor is the last row's id (or sequence number) of the previous page.
            "cursor" if path.ends_with("/accounts") => AccountId::schema(),
            "cursor" if path.ends_with("/keys") => KeyId::schema(),
            "cursor" if path.ends_with("/requests") => RequestId::schema(),
            "cursor" if path.ends_with("/topups") => tollgate_core::TopUpId::schema(),
            "cursor" => ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]{1,19}$"))
                .into(),
            _ => continue,
        };
        parameter.schema = Some(schema);
    }
}

fn add_parameter(operation: &mut Operation, parameter: utoipa::openapi::path::Parameter) {
    operation
        .parameters
        .get_or_insert_with(Vec::new)
        .push(RefOr::T(parameter));
}

fn idempotency_key() -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255))
                // Printable ASCII, no space at either end (HTTP trims it away).
                .pattern(Some("^[!-~]([ -~]*[!-~])?$")),
        ))
        .description(Some(
            "Makes a retry safe: the same key with the same request returns the first outcome \
             (marked `idempotent-replayed: true`) instead of running again.",
        ))
        .build()
}

fn operations_mut(item: &mut PathItem) -> Vec<(HttpMethod, &mut Operation)> {
    [
        (HttpMethod::Get, item.get.as_mut()),
        (HttpMethod::Put, item.put.as_mut()),
        (HttpMethod::Post, item.post.as_mut()),
        (HttpMethod::Delete, item.delete.as_mut()),
        (HttpMethod::Patch, item.patch.as_mut()),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.map(|op| (method, op)))
    .collect()
}

/// The methods the proxy forwards, documented on every data-plane route.
const PROXIED_METHODS: [(HttpMethod, &str); 5] = [
    (HttpMethod::Get, "get"),
    (HttpMethod::Post, "post"),
    (HttpMethod::Put, "put"),
    (HttpMethod::Patch, "patch"),
    (HttpMethod::Delete, "delete"),
];

fn data_plane_path(route: &RouteConfig) -> PathItem {
    let mut item = PathItem::default();
    for (method, method_name) in PROXIED_METHODS {
        let mut operation = OperationBuilder::new()
            .tag("data plane")
            .operation_id(Some(format!("{}_{method_name}", route.group)))
            .summary(Some(format!("Proxied to the `{}` upstream", route.group)))
            .description(Some(format!(
                "Forwarded to the route's upstream with the key replaced by the upstream's \
                 credentials; the upstream's answer comes back unchanged, with Tollgate's \
                 request-ID and rate-limit headers. Needs a key whose scopes include `{group}`. \
                 Errors Tollgate originates are rendered in the `{profile}` profile.",
                group = route.group,
                profile = route.error_profile.as_str(),
            )))
            .parameter(
                ParameterBuilder::new()
                    .name("path")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            // What the proxy forwards: no dot-segment, no (encoded) slash,
                            // backslash or NUL, which could climb out of the route's prefix.
                            .pattern(Some(r"^(?!\.\.?$)[^/\\\x00]+$")),
                    ))
                    .description(Some(
                        "The rest of the upstream path, which may go on with more `/`-separated \
                         segments; none may be `.` or `..`, or hold an encoded `/`, `\\` or NUL.",
                    )),
            )
            .security(SecurityRequirement::new("api_key", Vec::<String>::new()))
            .security(SecurityRequirement::new(
                "api_key_header",
                Vec::<String>::new(),
            ))
            .response(
                "default",
                ResponseBuilder::new().description("The upstream's answer, unchanged."),
            )
            .build();
        if matches!(
            method,
            HttpMethod::Post | HttpMethod::Put | HttpMethod::Patch
        ) {
            // An LLM route reads the JSON it meters; any other route forwards any body.
            let (content_type, body) = match route.pricing.llm {
                None => ("*/*", Content::new(None::<RefOr<Schema>>)),
                Some(_) => (
                    "application/json",
                    Content::new(Some(ObjectBuilder::new().schema_type(Type::Object))),
                ),
            };
            operation.request_body = Some(RefOr::T(
                RequestBodyBuilder::new()
                    .description(Some("Passed to the upstream as sent."))
                    .content(content_type, body)
                    .build(),
            ));
        }
        for status in DATA_PLANE_ERRORS {
            let name = data_plane_error_name(status, route.error_profile);
            operation
                .responses
                .responses
                .insert(status.to_string(), Ref::from_response_name(name).into());
        }
        // Only the methods that claim a key (the proxy passes it on with the others).
        if matches!(method, HttpMethod::Post | HttpMethod::Patch) {
            add_parameter(&mut operation, idempotency_key());
        }
        set_operation(&mut item, method, operation);
    }
    item
}

/// Data-plane errors are shared per profile: `openai.TooManyRequests`.
fn data_plane_error_name(status: u16, profile: ErrorProfile) -> String {
    format!("{}.{}", profile.as_str(), status_name(status))
}

fn set_operation(item: &mut PathItem, method: HttpMethod, operation: Operation) {
    let slot = match method {
        HttpMethod::Get => &mut item.get,
        HttpMethod::Put => &mut item.put,
        HttpMethod::Post => &mut item.post,
        HttpMethod::Delete => &mut item.delete,
        HttpMethod::Patch => &mut item.patch,
        _ => return,
    };
    *slot = Some(operation);
}

// ---------------------------------------------------------------------------------------------
// Serving the document and the UI

/// The finished document, serialised once at startup.
#[derive(Clone)]
pub struct Published(Bytes);

impl Published {
    pub fn new(doc: &Document) -> anyhow::Result<Self> {
        Ok(Published(Bytes::from(doc.to_pretty_json()?)))
    }
}

/// The routes that serve the document and the UI; their state is the finished document.
pub fn routes() -> OpenApiRouter<Published> {
    OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page))
        .routes(routes!(docs_asset))
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document.", content_type = "application/json")),
)]
async fn openapi_json(State(Published(json)): State<Published>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// The Swagger UI, served from the binary.
#[utoipa::path(
    get,
    path = "/api/docs",
    tag = "operations",
    responses((status = 200, description = "The Swagger UI page.", content_type = "text/html")),
)]
async fn docs_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DOCS_PAGE,
    )
        .into_response()
}

/// The Swagger UI's script, style sheet and icon.
#[utoipa::path(
    get,
    path = "/api/docs/{asset}",
    tag = "operations",
    params(("asset" = String, Path, description = "`swagger-ui-bundle.js`, `swagger-ui.css` or `favicon-32x32.png`.")),
    responses(
        (status = 200, description = "The file."),
        (status = 404, response = Status404),
    ),
)]
async fn docs_asset(Path(asset): Path<String>) -> Result<Response, HttpError> {
    let (content_type, bytes): (&str, &'static [u8]) = match asset.as_str() {
        "swagger-ui-bundle.js" => ("text/javascript; charset=utf-8", SWAGGER_JS),
        "swagger-ui.css" => ("text/css; charset=utf-8", SWAGGER_CSS),
        "favicon-32x32.png" => ("image/png", FAVICON),
        _ => return Err(HttpError::not_found("documentation file")),
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        bytes,
    )
        .into_response())
}

const SWAGGER_JS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js");
const SWAGGER_CSS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui.css");
const FAVICON: &[u8] = include_bytes!("../../assets/swagger-ui/favicon-32x32.png");

/// `validatorUrl: null` keeps the page from asking swagger.io to validate the document: the page
/// makes no request beyond this server.
const DOCS_PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Tollgate API</title>
  <link rel="stylesheet" href="/api/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/api/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/api/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null,
      displayRequestDuration: true,
    });
  </script>
</body>
</html>
"##;
