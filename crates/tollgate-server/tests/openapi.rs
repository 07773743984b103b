//! The OpenAPI document: the demo's is `docs/openapi.json` exactly, every route the server answers
//! is in it (and nothing it does not answer), every error it names has an example, and the Swagger
//! UI's files are served from the binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{spawn_app, spawn_app_with, ADMIN_TOKEN};
use expect_test::expect_file;
use serde_json::Value;
use std::net::SocketAddr;
use tollgate_core::{ErrorCode, KeyId};
use tollgate_server::app::demo::{Demo, DemoOptions};

const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

async fn document(http: &reqwest::Client, url: &str) -> (String, Value) {
    let response = http
        .get(format!("{url}/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.unwrap();
    let doc = serde_json::from_str(&text).unwrap();
    (text, doc)
}

#[tokio::test]
async fn the_demo_serves_docs_openapi_json() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(DemoOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.path().to_path_buf(),
        config: None,
    })
    .await
    .unwrap();
    let url = format!("http://{}", demo.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(demo.run_until_stopped(async {
        stopped.await.ok();
    }));

    let (text, doc) = document(&reqwest::Client::new(), &url).await;
    assert_eq!(doc["openapi"], "3.1.0");
    expect_file!["../../../docs/openapi.json"].assert_eq(&text);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A concrete path for a templated one: ids of the right kind that do not exist.
fn concrete(path: &str) -> String {
    let id = if path.contains("/keys/") {
        KeyId::new().to_string()
    } else if path.contains("/holds/") {
        tollgate_core::HoldId::new().to_string()
    } else if path.contains("/requests/") {
        tollgate_core::RequestId::new().to_string()
    } else {
        tollgate_core::AccountId::new().to_string()
    };
    path.replace("{id}", &id)
        .replace("{asset}", "swagger-ui.css")
        .replace("{path}", "chat/completions")
}

/// Whether the router had nothing for this method and path: the fallback's 404 ("No route for")
/// or axum's 405.
async fn unrouted(response: reqwest::Response) -> bool {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    status == 405 || (status == 404 && message.starts_with("No route for"))
}

#[tokio::test]
async fn every_route_the_server_answers_is_documented_and_every_documented_route_is_answered() {
    // No rate limits: the probe sends hundreds of requests on a clock that does not move.
    let app = spawn_app_with(|raw, _| raw.rate_limits = Some(Vec::new())).await;
    let (_, doc) = document(&app.http, &app.url).await;
    let paths = doc["paths"].as_object().unwrap();

    // Each configured data-plane route is documented.
    for route in &app.state.config.routes {
        assert!(
            paths.contains_key(&format!("{}/{{path}}", route.prefix)),
            "{} is not documented",
            route.prefix
        );
    }

    let mut answered = 0;
    for (path, item) in paths {
        for method in METHODS {
            let url = format!("{}{}", app.url, concrete(path));
            let request = app
                .http
                .request(method.to_uppercase().parse().unwrap(), &url)
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body("{}");
            let response = request.send().await.unwrap();
            let status = response.status();
            let headers = format!("{:?}", response.headers());
            let routed = !unrouted(response).await;
            let documented = item.get(method).is_some();
            assert_eq!(
                routed, documented,
                "{method} {path}: routed {routed} ({status} {headers}), documented {documented}"
            );
            answered += usize::from(routed);
        }
    }
    // The management API, operations, the docs and three routes of five methods each.
    assert!(answered >= 30 + 15, "only {answered} operations answered");

    // A path that is in no router and no route falls through to the fallback.
    let response = app
        .http
        .get(format!("{}/api/v1/nothing-here", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(unrouted(response).await);
}

#[test]
fn routes_are_registered_only_with_their_documentation() {
    // `routes!` adds a route and its OpenAPI operation together; a bare `.route(` would serve a
    // path the document does not show.
    let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 20, "the walk found only {files:?}");
    // The console's pages are HTML for a browser, not API operations: its room routes them
    // directly and the document leaves them out.
    let console = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/console");
    for path in files.into_iter().filter(|p| !p.starts_with(&console)) {
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().map(str::trim_start) {
            for call in [".route(", ".route_service(", ".nest_service("] {
                assert!(
                    !line.starts_with(call),
                    "{} registers a route with `{call}`; use `.routes(routes!(handler))`",
                    path.display()
                );
            }
        }
    }
}

#[tokio::test]
async fn every_error_response_has_an_example_per_code_and_every_operation_is_described() {
    let app = spawn_app().await;
    let (_, doc) = document(&app.http, &app.url).await;

    let responses = doc["components"]["responses"].as_object().unwrap();
    let mut codes_shown = std::collections::BTreeSet::new();
    for (name, response) in responses {
        let content = response["content"].as_object().unwrap();
        assert_eq!(content.len(), 1, "{name}");
        let (_, media) = content.iter().next().unwrap();
        let examples = media["examples"].as_object().unwrap();
        assert!(!examples.is_empty(), "{name} has no example");
        for (code, example) in examples {
            let value = &example["value"];
            // Native and OpenAI nest the code in `error`, problem details have it on top, and
            // Anthropic's shape carries only the type.
            let shown = value["error"]["code"]
                .as_str()
                .or(value["code"].as_str())
                .or(value["error"]["type"].as_str())
                .unwrap_or_default();
            assert!(!shown.is_empty(), "{name}/{code}: {value}");
            codes_shown.insert(code.clone());
        }
        assert!(response["headers"]["x-request-id"].is_object(), "{name}");
    }
    for code in ErrorCode::ALL {
        assert!(codes_shown.contains(code.as_str()), "{code} has no example");
    }

    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    for scheme in ["admin_token", "api_key", "api_key_header"] {
        assert!(schemes.contains_key(scheme), "{scheme}");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let at = format!("{method} {path}");
            assert!(operation["operationId"].is_string(), "{at}");
            assert!(operation["tags"][0].is_string(), "{at}");
            assert!(
                operation["summary"].is_string() || operation["description"].is_string(),
                "{at} is not described"
            );
            if path.starts_with("/api/v1") {
                assert!(operation["security"].is_array(), "{at} names no auth");
                for status in ["401", "429", "500"] {
                    assert!(operation["responses"][status].is_object(), "{at} {status}");
                }
            }
        }
    }
}

#[tokio::test]
async fn the_swagger_ui_is_served_from_the_binary() {
    let app = spawn_app().await;
    let page = app
        .http
        .get(format!("{}/api/docs", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    // Every file the page loads is this server's own.
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "favicon-32x32.png",
    ] {
        assert!(html.contains(&format!("/api/docs/{asset}")), "{asset}");
        let response = app
            .http
            .get(format!("{}/api/docs/{asset}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        assert!(response.bytes().await.unwrap().len() > 100, "{asset}");
    }
    assert!(
        !html.contains("https://"),
        "the page must not load anything remote"
    );
    assert!(html.contains("validatorUrl: null"));

    let missing = app
        .http
        .get(format!("{}/api/docs/nope.js", app.url))
        .send()
        .await
        .unwrap();
    common::expect_error(missing, 404, "not_found").await;
}
