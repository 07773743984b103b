//! The console's sign-in and sessions, over HTTP as a browser sends it: the cookie, what the
//! store keeps, timeouts on the test clock, revocation, cross-site forms and failed sign-ins.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{available, spawn_app, spawn_app_with, TestApp, ADMIN_TOKEN};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tollgate_core::Clock;
use tollgate_store::SessionStore;

/// A client that shows redirects instead of following them, and keeps no cookies of its own.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn sign_in(app: &TestApp, credential: &str) -> Response {
    browser()
        .post(format!("{}/console/sign-in", app.url))
        .header("sec-fetch-site", "same-origin")
        .form(&[("credential", credential)])
        .send()
        .await
        .unwrap()
}

/// Signs in and returns the `Cookie` header value the browser would send back.
async fn session_cookie(app: &TestApp, credential: &str) -> String {
    let response = sign_in(app, credential).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let set = response.headers()[SET_COOKIE].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

/// An operator's action through the management API (suspend, revoke), which must succeed.
async fn as_operator(app: &TestApp, path: &str) {
    let response = app.admin_post(path, json!({})).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
}

async fn page(app: &TestApp, cookie: Option<&str>) -> (StatusCode, String) {
    let mut request = browser().get(format!("{}/console/", app.url));
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

async fn signed_in(app: &TestApp, cookie: &str) -> bool {
    let (status, body) = page(app, Some(cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.contains("<h1>Overview</h1>"),
        !body.contains("<h1>Sign in</h1>")
    );
    body.contains("<h1>Overview</h1>")
}

#[tokio::test]
async fn a_master_key_signs_in_sees_its_balance_and_signing_out_ends_the_session_on_the_server() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;

    let (status, body) = page(&app, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<h1>Sign in</h1>"));

    let response = sign_in(&app, &account.master_key).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/console/");
    let set = response.headers()[SET_COOKIE].to_str().unwrap().to_string();
    // Served to 127.0.0.1, which browsers treat as secure: the strictest cookie there is.
    assert!(set.starts_with("__Host-tollgate_session="), "{set}");
    for attribute in ["Path=/", "HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(set.contains(attribute), "{set} lacks {attribute}");
    }
    assert!(!set.contains(&account.master_key));
    let cookie = set.split(';').next().unwrap().to_string();
    let secret = cookie.split_once('=').unwrap().1;

    // The store keeps the secret's hash, not the secret.
    let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let record = app.store.session(&hash).await.unwrap().unwrap();
    assert_eq!(record.key, Some(account.master_key_id));
    assert!(app.store.session(&[0; 32]).await.unwrap().is_none());

    let (status, body) = page(&app, Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<h1>Overview</h1>"), "{body}");
    let nanos = available(&app, &account.master_key).await;
    assert!(
        body.contains(&format!("data-nanos=\"{nanos}\"")),
        "the page shows the balance the API does ({nanos}): {body}"
    );
    assert!(!body.contains(&account.master_key));

    let response = browser()
        .post(format!("{}/console/sign-out", app.url))
        .header(COOKIE, &cookie)
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cleared = response.headers()[SET_COOKIE].to_str().unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    // A copy of the cookie kept by anyone is worth nothing now.
    assert!(!signed_in(&app, &cookie).await);
    assert!(app.store.session(&hash).await.unwrap().is_none());
}

#[tokio::test]
async fn the_admin_token_signs_in_as_the_operator() {
    let app = spawn_app().await;
    let cookie = session_cookie(&app, ADMIN_TOKEN).await;
    let (_, body) = page(&app, Some(&cookie)).await;
    assert!(body.contains("Signed in as the operator"), "{body}");
    assert!(!body.contains(ADMIN_TOKEN));
}

#[tokio::test]
async fn usage_keys_wrong_keys_and_revoked_keys_cannot_sign_in_and_are_never_echoed() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let (usage, _) = app.create_usage_key(&account.master_key, json!({})).await;
    let other = app.create_account("revoked").await;
    as_operator(
        &app,
        &format!("/api/v1/keys/{}/revoke", other.master_key_id),
    )
    .await;

    for credential in [
        usage.as_str(),
        other.master_key.as_str(),
        "tg_live_not_a_key",
        "not-the-admin-token",
    ] {
        let response = sign_in(&app, credential).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{credential}");
        assert!(response.headers().get(SET_COOKIE).is_none());
        let body = response.text().await.unwrap();
        assert!(body.contains("not a usable master key"), "{body}");
        assert!(!body.contains(credential), "the page echoes {credential}");
    }
}

#[tokio::test]
async fn revoking_the_key_or_suspending_the_account_ends_its_sessions_at_the_next_request() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    assert!(signed_in(&app, &cookie).await);
    as_operator(&app, &format!("/api/v1/accounts/{}/suspend", account.id)).await;
    assert!(!signed_in(&app, &cookie).await);

    let other = app.create_account("revoked").await;
    let cookie = session_cookie(&app, &other.master_key).await;
    assert!(signed_in(&app, &cookie).await);
    as_operator(
        &app,
        &format!("/api/v1/keys/{}/revoke", other.master_key_id),
    )
    .await;
    assert!(!signed_in(&app, &cookie).await);
}

#[tokio::test]
async fn a_session_ends_after_its_idle_timeout_and_after_its_absolute_timeout() {
    let app = spawn_app_with(|raw, _| {
        raw.console.idle_timeout = "30m".into();
        raw.console.absolute_timeout = "1h".into();
    })
    .await;
    let account = app.create_account("console").await;
    let minutes = |n| chrono::Duration::minutes(n);

    // Busy: each visit within the idle timeout keeps it, until an hour after sign-in.
    let cookie = session_cookie(&app, &account.master_key).await;
    for _ in 0..2 {
        app.clock.advance(minutes(25));
        assert!(signed_in(&app, &cookie).await);
    }
    app.clock.advance(minutes(11));
    assert!(!signed_in(&app, &cookie).await, "61 minutes after sign-in");

    // Idle: 30 minutes without a visit.
    let cookie = session_cookie(&app, &account.master_key).await;
    app.clock.advance(minutes(29));
    assert!(signed_in(&app, &cookie).await);
    app.clock.advance(minutes(30));
    assert!(!signed_in(&app, &cookie).await, "30 minutes idle");
}

#[tokio::test]
async fn a_form_posted_from_another_site_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    for (name, value) in [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
        ("origin", "https://attacker.example"),
    ] {
        let response = browser()
            .post(format!("{}/console/sign-out", app.url))
            .header(COOKIE, &cookie)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{name}: {value}");
        assert_eq!(response.headers()["x-tollgate-error"], "forbidden");
        assert!(signed_in(&app, &cookie).await, "{name}: {value} signed out");

        let response = browser()
            .post(format!("{}/console/sign-in", app.url))
            .header(name, value)
            .form(&[("credential", account.master_key.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{name}: {value}");
        assert!(response.headers().get(SET_COOKIE).is_none());
    }
}

#[tokio::test]
async fn every_console_answer_carries_a_strict_content_security_policy() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    for (path, with_cookie) in [
        ("/console/", false),
        ("/console/", true),
        ("/console/assets/console.css", false),
        ("/console", false),
    ] {
        let mut request = browser().get(format!("{}{path}", app.url));
        if with_cookie {
            request = request.header(COOKIE, &cookie);
        }
        let response = request.send().await.unwrap();
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "style-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
    }
    let response = browser()
        .get(format!("{}/console", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(response.headers()[LOCATION], "/console/");
    // The pages carry no inline script or style for the policy to forbid: every script is one
    // of the console's own files.
    let (_, body) = page(&app, Some(&cookie)).await;
    assert_only_own_scripts(&body);
}

/// Every `<script>` on a page loads one of the console's own files and has no inline code, and
/// no element has a `style` attribute.
fn assert_only_own_scripts(body: &str) {
    assert!(!body.contains("style=\""), "{body}");
    let scripts: Vec<&str> = body.split("<script").skip(1).collect();
    assert!(!scripts.is_empty(), "the pages load the console's script");
    for script in scripts {
        let (open, rest) = script.split_once('>').unwrap();
        assert!(
            open.trim_start().starts_with("src=\"/console/assets/"),
            "{open}"
        );
        assert!(rest.starts_with("</script>"), "inline code: {rest}");
    }
}

#[tokio::test]
async fn failed_sign_ins_from_one_address_are_limited_and_a_good_key_waits_too() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    for attempt in 0..10 {
        let response = sign_in(&app, "tg_live_guess").await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let response = sign_in(&app, "tg_live_guess").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // While the address is over, not even a right key is tried: guessing learns nothing.
    let response = sign_in(&app, &account.master_key).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().get(SET_COOKIE).is_none());
    // The limit refills: one attempt every 6 s.
    app.clock.advance(chrono::Duration::seconds(6));
    assert_eq!(
        sign_in(&app, &account.master_key).await.status(),
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn the_sweeper_forgets_sessions_that_timed_out_unused() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    let secret = cookie.split_once('=').unwrap().1.to_string();
    let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let kept = session_cookie(&app, &account.master_key).await;
    app.clock.advance(chrono::Duration::minutes(20));
    assert!(signed_in(&app, &kept).await);
    app.clock.advance(chrono::Duration::minutes(15));
    // The sweeper purges at start: a restarted node forgets the idle session, not the used one.
    let app = app.restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while app.store.session(&hash).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle session is still stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(signed_in(&app, &kept).await);
}

#[tokio::test]
async fn an_account_name_is_shown_as_text_never_as_markup() {
    let app = spawn_app().await;
    let account = app
        .create_account("<script>alert(1)</script><b style=\"x\">bold</b>")
        .await;
    let cookie = session_cookie(&app, &account.master_key).await;
    let (_, body) = page(&app, Some(&cookie)).await;
    assert!(
        body.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{body}"
    );
    assert!(!body.contains("<b "), "{body}");
    assert_only_own_scripts(&body);
}

/// The account's keys as the admin API lists them.
async fn api_keys(app: &TestApp, account: tollgate_core::AccountId) -> Vec<serde_json::Value> {
    let path = format!("/api/v1/keys?account_id={account}");
    let page = app.get_json(&path, ADMIN_TOKEN).await;
    page["data"].as_array().unwrap().clone()
}

/// The secret the "key created" page shows in its one read-only field.
fn shown_secret(body: &str) -> String {
    let start = body.find("value=\"tg_").expect("the page shows a secret") + "value=\"".len();
    let end = start + body[start..].find('"').unwrap();
    body[start..end].to_string()
}

async fn post_form(app: &TestApp, cookie: &str, path: &str, form: &[(&str, &str)]) -> Response {
    browser()
        .post(format!("{}{path}", app.url))
        .header(COOKIE, cookie)
        .header("sec-fetch-site", "same-origin")
        .form(form)
        .send()
        .await
        .unwrap()
}

async fn keys_page(app: &TestApp, cookie: &str) -> (StatusCode, String) {
    let response = browser()
        .get(format!("{}/console/keys", app.url))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

async fn echo(app: &TestApp, key: &str) -> StatusCode {
    app.get("/echo/hello")
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_key_made_in_the_console_is_the_apis_key_shown_once_and_revoked_there_too() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;

    let (status, body) = keys_page(&app, &cookie).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains(&format!("data-key=\"{}\"", account.master_key_id)),
        "{body}"
    );

    let response = post_form(
        &app,
        &cookie,
        "/console/keys",
        &[
            ("name", "from the console"),
            ("scopes", "echo"),
            ("allowed_ips", ""),
            ("expires_at", "2030-01-31T18:00"),
            ("monthly_spend_cap", "2.5"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = response.text().await.unwrap();
    let secret = shown_secret(&body);
    assert_eq!(echo(&app, &secret).await, StatusCode::OK);

    // What the API answers for it is what the form asked for.
    let made = api_keys(&app, account.id)
        .await
        .into_iter()
        .find(|k| k["name"] == "from the console")
        .unwrap();
    assert_eq!(made["scopes"], json!(["echo"]));
    assert_eq!(made["expires_at"], "2030-01-31T18:00:00Z");
    assert_eq!(made["monthly_spend_cap"]["credits"], "2.5");
    assert_eq!(made["kind"], "usage");
    // The change is in the audit log as the master key's, as it would be from the API.
    let audit = app.get_json("/api/v1/audit", ADMIN_TOKEN).await;
    let entry = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.create" && e["target"] == made["id"])
        .expect("audited");
    assert_eq!(entry["actor"], account.master_key_id.to_string());

    // Listed from now on, the secret never again.
    let (_, body) = keys_page(&app, &cookie).await;
    assert!(body.contains(made["id"].as_str().unwrap()));
    assert!(!body.contains(&secret));

    let id = made["id"].as_str().unwrap();
    let response = post_form(&app, &cookie, &format!("/console/keys/{id}/revoke"), &[]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(echo(&app, &secret).await, StatusCode::UNAUTHORIZED);
    let (_, body) = keys_page(&app, &cookie).await;
    assert!(body.contains(&format!(
        "action=\"/console/keys/{}/revoke\"",
        account.master_key_id
    )));
    assert!(
        !body.contains(&format!("action=\"/console/keys/{id}/revoke\"")),
        "{body}"
    );
}

#[tokio::test]
async fn another_accounts_key_cannot_be_revoked_from_the_console_nor_seen() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let other = app.create_account("other").await;
    let (other_usage, other_id) = app.create_usage_key(&other.master_key, json!({})).await;
    let cookie = session_cookie(&app, &account.master_key).await;

    let (_, body) = keys_page(&app, &cookie).await;
    assert!(!body.contains(&other_id.to_string()));
    for id in [
        other_id.to_string(),
        other.master_key_id.to_string(),
        "key_nonsense".into(),
    ] {
        let response = post_form(&app, &cookie, &format!("/console/keys/{id}/revoke"), &[]).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{id}");
        assert!(response.text().await.unwrap().contains("No such key."));
    }
    assert_eq!(echo(&app, &other_usage).await, StatusCode::OK);
}

#[tokio::test]
async fn a_bad_key_form_shows_the_apis_own_validation_message_and_creates_nothing() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    let before = api_keys(&app, account.id).await.len();
    for (field, value, message) in [
        ("scopes", "no-such-group", "is not a route group"),
        ("allowed_ips", "10.0.0.1/8", "has host bits set"),
        ("monthly_spend_cap", "a lot", "monthly_spend_cap"),
        ("expires_at", "tomorrow", "is not a date and time"),
        ("expires_at", "2001-01-01T00:00", "must be in the future"),
    ] {
        let response = post_form(
            &app,
            &cookie,
            "/console/keys",
            &[("name", "bad"), (field, value)],
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{field}={value}"
        );
        let body = response.text().await.unwrap();
        assert!(body.contains(message), "{field}={value}: {body}");
        assert!(!body.contains("value=\"tg_"), "{field}={value} made a key");
    }
    let after = api_keys(&app, account.id).await.len();
    assert_eq!(before, after);
}

#[tokio::test]
async fn the_keys_page_sends_anyone_but_a_signed_in_account_holder_to_the_overview() {
    let app = spawn_app().await;
    let operator = session_cookie(&app, ADMIN_TOKEN).await;
    let no_session = "__Host-tollgate_session=00";
    for cookie in [operator.as_str(), no_session] {
        let (status, _) = keys_page(&app, cookie).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{cookie}");
        let response = post_form(&app, cookie, "/console/keys", &[("name", "x")]).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{cookie}");
    }
}

async fn console_get(app: &TestApp, cookie: &str, path: &str) -> (StatusCode, String) {
    let response = browser()
        .get(format!("{}{path}", app.url))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

/// Makes a call with `key` on `path`; its request ID.
async fn call(app: &TestApp, key: &str, path: &str) -> String {
    let response = app.get(path).bearer_auth(key).send().await.unwrap();
    common::request_id(&response)
}

#[tokio::test]
async fn the_requests_page_lists_the_accounts_calls_and_finds_any_one_by_its_id() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let (echo_only, _) = app
        .create_usage_key(&account.master_key, json!({"scopes": ["echo"]}))
        .await;
    let paid = call(&app, &echo_only, "/echo/hello").await;
    // Refused for its scope after the key was found: a row, charged nothing.
    let refused = call(&app, &echo_only, "/v1/models").await;
    let other = app.create_account("other").await;
    let theirs = call(&app, &other.master_key, "/echo/hello").await;
    let cookie = session_cookie(&app, &account.master_key).await;

    let (status, body) = console_get(&app, &cookie, "/console/requests").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(&format!("data-request=\"{paid}\"")), "{body}");
    assert!(
        body.contains(&format!("data-request=\"{refused}\"")),
        "{body}"
    );
    assert!(!body.contains(&theirs), "another account's call is listed");
    assert!(
        body.contains("keeps requests for"),
        "the retention is stated"
    );

    // Found by its exact ID, by the search box or its own address, with what the API says.
    for path in [
        format!("/console/requests?id={paid}"),
        format!("/console/requests/{paid}"),
    ] {
        let (status, body) = console_get(&app, &cookie, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let api = app
            .get_json(&format!("/api/v1/requests/{paid}"), &account.master_key)
            .await;
        for money in ["hold", "cost"] {
            let nanos = api[money]["nanos"].as_i64().unwrap();
            assert!(
                body.contains(&format!("data-nanos=\"{nanos}\"")),
                "{money}: {body}"
            );
        }
        assert!(body.contains("GET /echo/hello"), "{body}");
    }
    let (status, body) = console_get(&app, &cookie, &format!("/console/requests/{refused}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("insufficient_scope"), "{body}");

    // Another account's ID, and an ID that names nothing, answer alike.
    for id in [
        theirs.as_str(),
        "req_01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "nonsense",
    ] {
        let (status, body) =
            console_get(&app, &cookie, &format!("/console/requests?id={id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}");
        assert!(
            body.contains("No request of this account has the ID"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn the_requests_page_pages_by_a_stable_cursor_keeping_its_filters() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let (key, key_id) = app.create_usage_key(&account.master_key, json!({})).await;
    let mut made = std::collections::BTreeSet::new();
    for _ in 0..60 {
        made.insert(call(&app, &key, "/echo/hello").await);
    }
    // Calls with the master key, which the key filter leaves out.
    for _ in 0..3 {
        call(&app, &account.master_key, "/echo/hello").await;
    }
    let cookie = session_cookie(&app, &account.master_key).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut path = format!("/console/requests?key_id={key_id}&status=200");
    let mut pages = 0;
    loop {
        let (status, body) = console_get(&app, &cookie, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        pages += 1;
        for part in body.split("data-request=\"").skip(1) {
            let id = part.split('"').next().unwrap().to_string();
            assert!(seen.insert(id.clone()), "{id} shown twice");
        }
        let Some(at) = body.find("rel=\"next\"") else {
            break;
        };
        let start = body[..at].rfind("href=\"").unwrap() + "href=\"".len();
        path = body[start..at]
            .split('"')
            .next()
            .unwrap()
            .replace("&#38;", "&");
        assert!(path.contains(&format!("key_id={key_id}")), "{path}");
        assert!(path.contains("status=200"), "{path}");
    }
    assert_eq!(pages, 2);
    assert_eq!(seen, made);
}

#[tokio::test]
async fn a_bad_requests_filter_says_what_is_wrong() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    // The API's own checks of `GET /requests`, and the form's reading of local times.
    for (query, message) in [
        ("key_id=nope", "key_id: is not a key id"),
        ("status=99", "status: must be an HTTP status, 100 to 599"),
        ("status=abc", "The filters could not be read"),
        ("status_class=6xx", "could not be read: unknown variant"),
        ("billing_status=free", "could not be read: unknown variant"),
        ("from=soon", "from: &#39;soon&#39; is not a date and time"),
        (
            "from=2026-12-02T00:00&to=2026-12-01T00:00",
            "The range ends before it starts.",
        ),
        ("colour=red", "unknown field `colour`"),
    ] {
        let (status, body) =
            console_get(&app, &cookie, &format!("/console/requests?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(body.contains(message), "{query}: {body}");
    }
}

/// The wallet page's rows: (seq, nanos, direction), following "Older movements" to the end.
async fn wallet_rows(app: &TestApp, cookie: &str) -> Vec<(i64, i64, String)> {
    let mut rows = Vec::new();
    let mut path = "/console/wallet".to_string();
    loop {
        let (status, body) = console_get(app, cookie, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        for row in body.split("<tr data-seq=\"").skip(1) {
            let seq = row.split('"').next().unwrap().parse().unwrap();
            let nanos = row.split("data-nanos=\"").nth(1).unwrap();
            let nanos = nanos.split('"').next().unwrap().parse().unwrap();
            let direction = row.split("class=\"direction-").nth(1).unwrap();
            rows.push((seq, nanos, direction.split('"').next().unwrap().to_string()));
        }
        let Some(at) = body.find("rel=\"next\"") else {
            return rows;
        };
        let start = body[..at].rfind("href=\"").unwrap() + "href=\"".len();
        path = body[start..at].split('"').next().unwrap().to_string();
    }
}

#[tokio::test]
async fn the_wallet_page_shows_every_movement_and_they_add_up_to_the_balance() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    for _ in 0..30 {
        call(&app, &account.master_key, "/echo/hello").await;
    }
    let granted = app
        .admin_post(
            &format!("/api/v1/accounts/{}/credits", account.id),
            json!({"amount": "1.5", "reason": "goodwill"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), StatusCode::OK);
    let cookie = session_cookie(&app, &account.master_key).await;
    let rows = wallet_rows(&app, &cookie).await;

    // Every entry the API lists, in the same order, across pages: nothing capped by date.
    let mut api = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = app
            .get_json(
                &format!("/api/v1/ledger?limit=500{cursor}"),
                &account.master_key,
            )
            .await;
        api.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    let seqs: Vec<i64> = rows.iter().map(|(seq, _, _)| *seq).collect();
    assert_eq!(seqs, api);
    assert!(rows.len() > 50, "the page is paged: {} rows", rows.len());

    // What came in minus what went out is what is spendable now.
    let net: i64 = rows
        .iter()
        .map(|(_, nanos, direction)| match direction.as_str() {
            "in" => *nanos,
            "out" => -*nanos,
            _ => 0,
        })
        .sum();
    assert_eq!(net, available(&app, &account.master_key).await);
}

#[tokio::test]
async fn the_operator_lists_accounts_and_suspends_and_reactivates_one_as_the_api_does() {
    let app = spawn_app().await;
    let account = app.create_account("suspend me").await;
    let operator = session_cookie(&app, ADMIN_TOKEN).await;
    let (status, body) = console_get(&app, &operator, "/console/accounts").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains(&format!("data-account=\"{}\"", account.id)),
        "{body}"
    );
    let nanos = available(&app, &account.master_key).await;
    assert!(body.contains(&format!("data-nanos=\"{nanos}\"")), "{body}");

    let suspend = format!("/console/accounts/{}/suspend", account.id);
    let response = post_form(&app, &operator, &suspend, &[]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(echo(&app, &account.master_key).await, StatusCode::FORBIDDEN);
    let api = app
        .get_json(&format!("/api/v1/accounts/{}", account.id), ADMIN_TOKEN)
        .await;
    assert_eq!(api["status"], "suspended");
    let audit = app.get_json("/api/v1/audit", ADMIN_TOKEN).await;
    assert!(
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "account.suspend" && e["actor"] == "admin"),
        "{audit}"
    );

    let reactivate = format!("/console/accounts/{}/reactivate", account.id);
    let response = post_form(&app, &operator, &reactivate, &[]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(echo(&app, &account.master_key).await, StatusCode::OK);
}

#[tokio::test]
async fn the_operators_pages_answer_an_account_holder_as_pages_that_do_not_exist() {
    let app = spawn_app().await;
    let account = app.create_account("holder").await;
    let other = app.create_account("other").await;
    let holder = session_cookie(&app, &account.master_key).await;
    let (status, body) = console_get(&app, &holder, "/console/accounts").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!body.contains(&other.id.to_string()));
    for action in ["suspend", "reactivate"] {
        for id in [account.id, other.id] {
            let path = format!("/console/accounts/{id}/{action}");
            let response = post_form(&app, &holder, &path, &[]).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }
    assert_eq!(echo(&app, &other.master_key).await, StatusCode::OK);
    // And the account holder's own pages send the operator to the overview.
    let operator = session_cookie(&app, ADMIN_TOKEN).await;
    for path in ["/console/keys", "/console/requests", "/console/wallet"] {
        let (status, _) = console_get(&app, &operator, path).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
    }
}

/// The usage page's bucket rows, `(label, requests, spend nanos)`, `None` for a bucket with no
/// data; and its total row's `(requests, spend nanos)`.
#[allow(clippy::type_complexity)]
fn usage_table(body: &str) -> (Vec<(String, Option<(u64, i64)>)>, (u64, i64)) {
    let buckets = body.split("<table class=\"buckets\">").nth(1).unwrap();
    let buckets = buckets.split("</table>").next().unwrap();
    let cells = |row: &str| -> Vec<String> {
        row.split("<td")
            .skip(1)
            .map(|cell| {
                let nanos = cell.split("data-nanos=\"").nth(1);
                match nanos {
                    Some(n) => n.split('"').next().unwrap().to_string(),
                    None => cell
                        .split('>')
                        .nth(1)
                        .unwrap()
                        .split('<')
                        .next()
                        .unwrap()
                        .to_string(),
                }
            })
            .collect()
    };
    let rows = buckets
        .split("<tr data-bucket=\"")
        .skip(1)
        .map(|row| {
            let label = row.split('"').next().unwrap().to_string();
            let cells = cells(row);
            let totals = (cells[1] != "no data")
                .then(|| (cells[1].parse().unwrap(), cells[3].parse().unwrap()));
            (label, totals)
        })
        .collect();
    let total = cells(buckets.split("<tr class=\"total\">").nth(1).unwrap());
    (rows, (total[0].parse().unwrap(), total[2].parse().unwrap()))
}

/// Usage in three zones over a daylight-saving change in one of them: calls made every 97
/// minutes from 31 October to 3 November 2026 UTC (New York falls back on 1 November, 06:00
/// UTC), then the usage page per hour and per day.
#[tokio::test]
async fn usage_buckets_add_up_to_the_rows_in_utc_in_a_half_hour_zone_and_across_a_dst_change() {
    use chrono::{DateTime, NaiveDate, TimeZone, Utc};
    for zone in ["UTC", "Asia/Kolkata", "America/New_York"] {
        let app = spawn_app_with(|raw, _| raw.console.time_zone = zone.into()).await;
        let tz: chrono_tz::Tz = zone.parse().unwrap();
        let start: DateTime<Utc> = "2026-10-31T00:05:00Z".parse().unwrap();
        app.clock.set(start);
        let account = app.create_account("usage").await;
        let mut made: Vec<DateTime<Utc>> = Vec::new();
        while app.clock.now() < "2026-11-03T12:00:00Z".parse::<DateTime<Utc>>().unwrap() {
            call(&app, &account.master_key, "/echo/hello").await;
            made.push(app.clock.now());
            app.clock.advance(chrono::Duration::minutes(97));
        }
        app.clock.set("2026-11-05T00:00:00Z".parse().unwrap());
        let cookie = session_cookie(&app, &account.master_key).await;
        let api = app
            .get_json("/api/v1/requests?limit=500", &account.master_key)
            .await;
        let charged: Vec<(DateTime<Utc>, i64)> = api["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["created_at"].as_str().unwrap().parse().unwrap(),
                    r["cost"]["nanos"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(charged.len(), made.len());

        let local_day = |at: &DateTime<Utc>| at.with_timezone(&tz).date_naive();
        let first = NaiveDate::from_ymd_opt(2026, 10, 31).unwrap();
        let last = NaiveDate::from_ymd_opt(2026, 11, 2).unwrap();
        let in_range: Vec<&(DateTime<Utc>, i64)> = charged
            .iter()
            .filter(|(at, _)| (first..=last).contains(&local_day(at)))
            .collect();
        let expected = (
            in_range.len() as u64,
            in_range.iter().map(|(_, n)| n).sum::<i64>(),
        );
        assert!(expected.0 > 40 && expected.1 > 0, "{zone}: {expected:?}");

        for step in ["hour", "day"] {
            let (status, body) = console_get(
                &app,
                &cookie,
                &format!("/console/usage?from=2026-10-31&to=2026-11-02&step={step}"),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{zone} {step}: {body}");
            assert!(body.contains(&format!("Times in {zone}")), "{body}");
            let (rows, total) = usage_table(&body);
            // The rows add up to the total row, which is what the request log holds.
            let summed = rows.iter().fold((0, 0), |(r, n), (_, t)| {
                let (tr, tn) = t.unwrap();
                (r + tr, n + tn)
            });
            assert_eq!(summed, total, "{zone} {step}");
            assert_eq!(total, expected, "{zone} {step}");
            if step == "day" {
                assert_eq!(rows.len(), 3, "{zone}");
                for (label, totals) in &rows {
                    let day: NaiveDate = label.parse().unwrap();
                    let of_day = in_range.iter().filter(|(at, _)| local_day(at) == day);
                    assert_eq!(totals.unwrap().0, of_day.count() as u64, "{zone} {label}");
                }
            } else {
                // New York's 1 November has 25 hours; the others' days have 24.
                let hours = if zone == "America/New_York" { 73 } else { 72 };
                assert_eq!(rows.len(), hours, "{zone}");
                let offset = tz
                    .from_utc_datetime(&start.naive_utc())
                    .format("%:z")
                    .to_string();
                assert!(rows[0].0.ends_with(&offset), "{zone}: {}", rows[0].0);
                for (label, totals) in &rows {
                    let of_hour = in_range.iter().filter(|(at, _)| {
                        at.with_timezone(&tz)
                            .format("%Y-%m-%d %H:00 %:z")
                            .to_string()
                            == *label
                    });
                    assert_eq!(totals.unwrap().0, of_hour.count() as u64, "{zone} {label}");
                }
            }
        }
    }
}

#[tokio::test]
async fn usage_the_log_no_longer_holds_or_that_is_still_to_come_shows_as_missing_not_zero() {
    let app = spawn_app_with(|raw, _| raw.billing.usage_retention = "2days".into()).await;
    let account = app.create_account("usage").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    call(&app, &account.master_key, "/echo/hello").await;
    let today = app.clock.now().date_naive();
    let from = today - chrono::Duration::days(4);
    let to = today + chrono::Duration::days(1);
    let (status, body) = console_get(
        &app,
        &cookie,
        &format!("/console/usage?from={from}&to={to}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (rows, total) = usage_table(&body);
    let known: Vec<bool> = rows.iter().map(|(_, t)| t.is_some()).collect();
    // The log keeps two days: the days before them, and the one it holds only part of, have
    // no data; yesterday is known, today so far; tomorrow is to come.
    assert_eq!(known, [false, false, false, true, true, false], "{rows:?}");
    assert_eq!(rows[4].1.unwrap().0, 1);
    assert_eq!(total.0, 1);
    assert!(
        body.contains("data-chart="),
        "the chart's data is on the page"
    );
    assert!(
        body.contains("null"),
        "a missing bucket is null in the chart: {body}"
    );
}

#[tokio::test]
async fn a_bad_usage_range_says_what_is_wrong() {
    let app = spawn_app().await;
    let account = app.create_account("usage").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    for (query, message) in [
        ("from=2026-12-05&to=2026-12-01", "ends before it starts"),
        (
            "from=2026-01-01&to=2026-12-01&step=hour",
            "at most 31 days by the hour",
        ),
        ("from=yesterday", "is not a date"),
        ("by=colour", "Split by total, model, key or route"),
        ("step=minute", "The step is hour or day"),
    ] {
        let (status, body) = console_get(&app, &cookie, &format!("/console/usage?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(body.contains(message), "{query}: {body}");
    }
}

/// A CSV download's records, parsed as a spreadsheet would.
async fn csv_records(app: &TestApp, cookie: &str, path: &str) -> Vec<Vec<String>> {
    let response = browser()
        .get(format!("{}{path}", app.url))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    assert_eq!(
        response.headers()["content-type"],
        "text/csv; charset=utf-8"
    );
    assert!(response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    let text = response.text().await.unwrap();
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

#[tokio::test]
async fn the_requests_export_has_every_filtered_row_escaped_and_a_totals_line_that_adds_up() {
    let app = spawn_app().await;
    let account = app.create_account("export").await;
    let (echo_only, _) = app
        .create_usage_key(&account.master_key, json!({"scopes": ["echo"]}))
        .await;
    // More rows than one store read (500), so the download spans several.
    for _ in 0..520 {
        call(&app, &account.master_key, "/echo/hello").await;
    }
    let formula = "=HYPERLINK(\"http://evil.example\",\"open\")";
    let response = app
        .get("/echo/hello")
        .bearer_auth(&account.master_key)
        .header("x-request-id", formula)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let refused = call(&app, &echo_only, "/v1/models").await;
    let other = app.create_account("other").await;
    let theirs = call(&app, &other.master_key, "/echo/hello").await;
    let cookie = session_cookie(&app, &account.master_key).await;

    let records = csv_records(&app, &cookie, "/console/requests.csv").await;
    let (header, rest) = records.split_first().unwrap();
    let (totals, rows) = rest.split_last().unwrap();
    assert_eq!(header[0], "request_id");
    assert_eq!(rows.len(), 522);
    assert!(rows.iter().all(|r| r[0] != theirs), "another account's row");
    let ids: std::collections::BTreeSet<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids.len(), 522, "no row twice across the store reads");
    // The client's own request ID is written so no spreadsheet runs it.
    let client = header
        .iter()
        .position(|c| c == "client_request_id")
        .unwrap();
    assert!(rows.iter().any(|r| r[client] == format!("'{formula}")));
    assert!(rows.iter().all(|r| !r[client].starts_with('=')));
    // The totals line is the sum of the rows, exactly, in nanos.
    let charged = header.iter().position(|c| c == "charged").unwrap();
    let nanos = |text: &str| tollgate_core::Nanos::parse_credits(text).unwrap().0;
    let sum: i64 = rows.iter().map(|r| nanos(&r[charged])).sum();
    assert_eq!(nanos(&totals[charged]), sum);
    assert!(sum > 0);
    assert!(totals[0].starts_with("total of 522 requests"), "{totals:?}");
    let spent = app
        .get_json("/api/v1/billing/balance", &account.master_key)
        .await["spent_this_month"]["nanos"]
        .as_i64()
        .unwrap();
    assert_eq!(
        sum, spent,
        "the export's total is what the wallet was charged"
    );

    // Exactly the page's filters: the 4xx class is the one refusal.
    let records = csv_records(&app, &cookie, "/console/requests.csv?status_class=4xx").await;
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[1][0], refused);
    // A filter that does not read is refused, not ignored.
    let response = browser()
        .get(format!("{}/console/requests.csv?status_class=9xx", app.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Without a session there is no export.
    let response = browser()
        .get(format!("{}/console/requests.csv", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_wallet_export_lists_every_movement_and_in_minus_out_is_the_balance() {
    let app = spawn_app().await;
    let account = app.create_account("export").await;
    for _ in 0..20 {
        call(&app, &account.master_key, "/echo/hello").await;
    }
    let cookie = session_cookie(&app, &account.master_key).await;
    let records = csv_records(&app, &cookie, "/console/wallet.csv").await;
    let (header, rest) = records.split_first().unwrap();
    let (totals, rows) = rest.split_last().unwrap();
    assert_eq!(rows.len(), wallet_rows(&app, &cookie).await.len());
    let column = |name: &str| header.iter().position(|c| c == name).unwrap();
    let nanos = |text: &str| {
        if text.is_empty() {
            0
        } else {
            tollgate_core::Nanos::parse_credits(text).unwrap().0
        }
    };
    for name in ["in", "out", "unchanged"] {
        let sum: i64 = rows.iter().map(|r| nanos(&r[column(name)])).sum();
        assert_eq!(nanos(&totals[column(name)]), sum, "{name}");
    }
    let net = nanos(&totals[column("in")]) - nanos(&totals[column("out")]);
    assert_eq!(net, available(&app, &account.master_key).await);
}

#[tokio::test]
async fn the_console_serves_its_vendored_scripts_exactly_as_recorded() {
    let app = spawn_app().await;
    let sums = include_str!("../assets/console/vendor/SHA256SUMS");
    let mut checked = 0;
    for line in sums.lines() {
        let (sum, file) = line.split_once("  ").unwrap();
        let response = browser()
            .get(format!("{}/console/assets/{file}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{file}");
        let bytes = response.bytes().await.unwrap();
        let served: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(served, sum, "{file} is not the vendored release");
        checked += 1;
    }
    assert_eq!(checked, 3, "htmx, uPlot and uPlot's stylesheet");
    let versions = include_str!("../assets/console/vendor/VERSIONS");
    assert!(versions.contains("htmx.org 2.0."), "{versions}");
    let response = browser()
        .get(format!("{}/console/assets/evil.js", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// The keys page's row for `key`.
fn key_row<'a>(body: &'a str, key: &str) -> &'a str {
    let start = body
        .find(&format!("<tr data-key=\"{key}\""))
        .unwrap_or_else(|| panic!("no row for {key}: {body}"));
    let row = &body[start..];
    &row[..row.find("</tr>").unwrap()]
}

#[tokio::test]
async fn a_key_is_edited_and_rolled_in_the_console_as_the_api_does_it() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let (usage, key_id) = app
        .create_usage_key(&account.master_key, json!({"name": "before"}))
        .await;
    let cookie = session_cookie(&app, &account.master_key).await;
    let (_, body) = keys_page(&app, &cookie).await;
    assert!(
        key_row(&body, &key_id.to_string()).contains("never"),
        "not used yet"
    );

    // The edit form shows the key's settings; sent back changed, it is the API's PATCH.
    let (status, form) = console_get(&app, &cookie, &format!("/console/keys/{key_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(form.contains("value=\"before\""), "{form}");
    let edit = |fields: Vec<(&'static str, &'static str)>| {
        let app = &app;
        let cookie = &cookie;
        async move { post_form(app, cookie, &format!("/console/keys/{key_id}"), &fields).await }
    };
    let response = edit(vec![
        ("name", "after"),
        ("scopes", "echo"),
        ("allowed_ips", ""),
        ("expires_at", ""),
        ("monthly_spend_cap", "2.5"),
        ("status", "inactive"),
    ])
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let api = app
        .get_json(&format!("/api/v1/keys/{key_id}"), &account.master_key)
        .await;
    assert_eq!(api["name"], "after");
    assert_eq!(api["scopes"], json!(["echo"]));
    assert_eq!(api["monthly_spend_cap"]["credits"], "2.5");
    assert_eq!(api["status"], "inactive");
    assert_eq!(
        echo(&app, &usage).await,
        StatusCode::UNAUTHORIZED,
        "inactive"
    );
    // The API's own validation, shown on the form; nothing changes.
    let response = edit(vec![("name", "after"), ("allowed_ips", "10.0.0.1/8")]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("has host bits set"));
    let response = edit(vec![("name", "after"), ("status", "active")]).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(echo(&app, &usage).await, StatusCode::OK);

    // Used: the page says when, in the reporting zone (UTC here).
    let (_, body) = keys_page(&app, &cookie).await;
    let row = key_row(&body, &key_id.to_string());
    assert!(!row.contains("never"), "{row}");
    assert!(
        row.contains(&app.clock.now().format("%Y-%m-%d %H:%M").to_string()),
        "{row}"
    );

    // Rolled with an hour's grace: the new secret once, and both work until then.
    let response = post_form(
        &app,
        &cookie,
        &format!("/console/keys/{key_id}/roll"),
        &[("grace_period_seconds", "3600")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.text().await.unwrap();
    let rolled = shown_secret(&body);
    assert_ne!(rolled, usage);
    let until = app.clock.now() + chrono::Duration::seconds(3600);
    assert!(
        body.contains(&format!(
            "keeps working until {}",
            until.format("%Y-%m-%d %H:%M")
        )),
        "{body}"
    );
    assert!(body.contains("data-copy=\"secret\""), "a copy button");
    assert_eq!(echo(&app, &rolled).await, StatusCode::OK);
    assert_eq!(echo(&app, &usage).await, StatusCode::OK);
    app.clock.advance(chrono::Duration::seconds(3601));
    assert_eq!(echo(&app, &usage).await, StatusCode::UNAUTHORIZED);
    let (_, body) = keys_page(&app, &cookie).await;
    assert!(!body.contains(&rolled), "the secret is never shown again");
}

#[tokio::test]
async fn a_key_near_its_cap_is_named_on_the_overview_and_the_keys_page() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    // The echo route costs 0.001 a call: four calls are 80 % of 0.005.
    let (capped, capped_id) = app
        .create_usage_key(&account.master_key, json!({"monthly_spend_cap": "0.005"}))
        .await;
    let (_, roomy_id) = app
        .create_usage_key(&account.master_key, json!({"monthly_spend_cap": "100"}))
        .await;
    for _ in 0..3 {
        assert_eq!(echo(&app, &capped).await, StatusCode::OK);
    }
    let cookie = session_cookie(&app, &account.master_key).await;
    let (_, body) = page(&app, Some(&cookie)).await;
    assert!(
        body.contains("No key has spent 80 % of its monthly cap."),
        "{body}"
    );
    assert_eq!(echo(&app, &capped).await, StatusCode::OK);
    let (_, body) = page(&app, Some(&cookie)).await;
    assert!(
        body.contains(&format!("<li data-key=\"{capped_id}\"")),
        "{body}"
    );
    assert!(
        !body.contains(&format!("<li data-key=\"{roomy_id}\"")),
        "{body}"
    );
    let (_, body) = keys_page(&app, &cookie).await;
    assert!(key_row(&body, &capped_id.to_string()).contains("near its cap"));
    assert!(!key_row(&body, &roomy_id.to_string()).contains("near its cap"));
    // The overview's chart carries the last 30 days, today's spend among them.
    let (_, body) = page(&app, Some(&cookie)).await;
    let chart = body
        .split("data-chart=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let chart: serde_json::Value = serde_json::from_str(&chart.replace("&#34;", "\"")).unwrap();
    assert_eq!(chart["labels"].as_array().unwrap().len(), 30);
    let spend = &chart["charts"][0]["series"][0]["points"];
    assert_eq!(spend[29], json!(0.004), "{spend}");
}

#[tokio::test]
async fn the_operator_finds_an_account_grants_it_credits_once_per_form_and_reads_the_audit_log() {
    let app = spawn_app().await;
    let acme = app.create_account("Acme Robotics").await;
    app.create_account("Globex").await;
    let cookie = session_cookie(&app, ADMIN_TOKEN).await;
    let (status, body) = console_get(&app, &cookie, "/console/accounts?q=acme").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("Acme Robotics") && !body.contains("Globex"),
        "{body}"
    );
    let (_, body) = console_get(&app, &cookie, &format!("/console/accounts?q={}", acme.id)).await;
    assert!(
        body.contains("Acme Robotics") && !body.contains("Globex"),
        "{body}"
    );

    let before = available(&app, &acme.master_key).await;
    let (status, form) =
        console_get(&app, &cookie, &format!("/console/accounts/{}", acme.id)).await;
    assert_eq!(status, StatusCode::OK);
    let reference = form
        .split("name=\"reference\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    // The same form sent twice (a double click, a resend): one grant.
    let grant = [
        ("amount", "2.5"),
        ("reason", "goodwill"),
        ("reference", reference.as_str()),
    ];
    let path = format!("/console/accounts/{}/credits", acme.id);
    let first = post_form(&app, &cookie, &path, &grant).await;
    assert_eq!(first.status(), StatusCode::SEE_OTHER);
    assert!(first.headers()[LOCATION]
        .to_str()
        .unwrap()
        .ends_with("granted=applied"));
    let second = post_form(&app, &cookie, &path, &grant).await;
    assert!(second.headers()[LOCATION]
        .to_str()
        .unwrap()
        .ends_with("granted=already_applied"));
    assert_eq!(
        available(&app, &acme.master_key).await - before,
        2_500_000_000
    );
    // A new form is a new grant; a bad amount is the API's own refusal.
    let (_, form) = console_get(&app, &cookie, &format!("/console/accounts/{}", acme.id)).await;
    assert!(
        !form.contains(&reference),
        "each form has its own reference"
    );
    let refused = post_form(&app, &cookie, &path, &[("amount", "-1"), ("reason", "x")]).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(refused.text().await.unwrap().contains("amount"));

    let (status, body) = console_get(&app, &cookie, "/console/audit").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("data-verified=\"true\""), "{body}");
    assert_eq!(body.matches("<td>credits.grant</td>").count(), 1, "{body}");
    assert!(body.contains("goodwill"));

    // A broken chain is reported, not hidden.
    app.tamper("UPDATE audit_log SET actor = 'someone else' WHERE seq = 1")
        .await;
    let (_, body) = console_get(&app, &cookie, "/console/audit").await;
    assert!(body.contains("data-verified=\"false\""), "{body}");
    assert!(body.contains("The chain is broken at entry 1"), "{body}");

    // An account holder is told these pages do not exist.
    let holder = session_cookie(&app, &acme.master_key).await;
    for path in [
        "/console/audit".to_string(),
        format!("/console/accounts/{}", acme.id),
        "/console/accounts?q=acme".to_string(),
    ] {
        let (status, _) = console_get(&app, &holder, &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let response = post_form(&app, &holder, &path, &grant).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// Every console route an account holder can reach, asked as account A with B's ids, answers
/// as for an id that does not exist, and changes nothing of B's.
#[tokio::test]
async fn a_crawl_as_one_account_with_anothers_ids_answers_as_for_missing_ids() {
    let app = spawn_app().await;
    let a = app.create_account("a").await;
    let b = app.create_account("b").await;
    let (b_key, b_key_id) = app.create_usage_key(&b.master_key, json!({})).await;
    let b_request = call(&app, &b_key, "/echo/hello").await;
    let cookie = session_cookie(&app, &a.master_key).await;
    let missing_key = "key_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let missing_request = "req_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let b_hook = app
        .post("/api/v1/webhook-endpoints")
        .bearer_auth(&b.master_key)
        .json(&json!({"url": "https://93.184.215.14/hooks"}))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let missing_hook = "we_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let event = "msg_01ARZ3NDEKTSV4RRFFQ69G5FAV";

    // (method, path with B's id, the same path with a missing id)
    let mut routes: Vec<(&str, String, String)> = vec![
        (
            "GET",
            format!("/console/keys/{b_key_id}"),
            format!("/console/keys/{missing_key}"),
        ),
        (
            "POST",
            format!("/console/keys/{b_key_id}"),
            format!("/console/keys/{missing_key}"),
        ),
        (
            "POST",
            format!("/console/keys/{b_key_id}/roll"),
            format!("/console/keys/{missing_key}/roll"),
        ),
        (
            "POST",
            format!("/console/keys/{}/revoke", b.master_key_id),
            format!("/console/keys/{missing_key}/revoke"),
        ),
        (
            "GET",
            format!("/console/requests/{b_request}"),
            format!("/console/requests/{missing_request}"),
        ),
        (
            "GET",
            format!("/console/requests?id={b_request}"),
            format!("/console/requests?id={missing_request}"),
        ),
        (
            "GET",
            format!("/console/accounts/{}", b.id),
            "/console/accounts/acct_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string(),
        ),
        (
            "POST",
            format!("/console/accounts/{}/credits", b.id),
            "/console/accounts/acct_01ARZ3NDEKTSV4RRFFQ69G5FAV/credits".to_string(),
        ),
        (
            "POST",
            format!("/console/accounts/{}/suspend", b.id),
            "/console/accounts/acct_01ARZ3NDEKTSV4RRFFQ69G5FAV/suspend".to_string(),
        ),
        (
            "GET",
            format!("/console/webhooks/{b_hook}"),
            format!("/console/webhooks/{missing_hook}"),
        ),
        (
            "POST",
            format!("/console/webhooks/{b_hook}/deliveries/{event}/redeliver"),
            format!("/console/webhooks/{missing_hook}/deliveries/{event}/redeliver"),
        ),
    ];
    for action in ["test", "enable", "disable", "rotate", "delete"] {
        routes.push((
            "POST",
            format!("/console/webhooks/{b_hook}/{action}"),
            format!("/console/webhooks/{missing_hook}/{action}"),
        ));
    }
    let send = |method: &str, path: &str| {
        let request = if method == "GET" {
            browser().get(format!("{}{path}", app.url))
        } else {
            browser()
                .post(format!("{}{path}", app.url))
                .header("sec-fetch-site", "same-origin")
                .form(&[("name", "taken"), ("amount", "5"), ("reason", "x")])
        };
        request.header(COOKIE, &cookie).send()
    };
    // The ids asked for, each answer's own request ID and a form's token are the only
    // differences allowed.
    let strip = |body: String, ids: &[&str]| {
        let body = ids.iter().fold(body, |body, id| body.replace(id, "ID"));
        let mut out = String::new();
        let mut rest = body.as_str();
        while let Some(at) = rest.find("req_") {
            out.push_str(&rest[..at]);
            out.push_str("REQUEST");
            rest = rest.get(at + 4 + 26..).unwrap_or_default();
        }
        let out = out + rest;
        // Each page's form has a fresh token.
        match out.split_once("name=\"form_token\" value=\"") {
            Some((head, tail)) => format!("{head}TOKEN{}", &tail[32..]),
            None => out,
        }
    };
    for (method, theirs, missing) in &routes {
        let to_theirs = send(method, theirs).await.unwrap();
        let to_missing = send(method, missing).await.unwrap();
        assert_eq!(to_theirs.status(), to_missing.status(), "{method} {theirs}");
        assert!(
            to_theirs.status().is_client_error(),
            "{method} {theirs}: {}",
            to_theirs.status()
        );
        let ids = [
            b_key_id.to_string(),
            b.master_key_id.to_string(),
            b_request.clone(),
            b.id.to_string(),
            missing_key.to_string(),
            missing_request.to_string(),
            "acct_01ARZ3NDEKTSV4RRFFQ69G5FAV".to_string(),
            b_hook.clone(),
            missing_hook.to_string(),
        ];
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(
            strip(to_theirs.text().await.unwrap(), &ids),
            strip(to_missing.text().await.unwrap(), &ids),
            "{method} {theirs}"
        );
    }
    // B's keys, balance and status are as they were.
    assert_eq!(echo(&app, &b_key).await, StatusCode::OK);
    let b_view = app
        .get_json(&format!("/api/v1/keys/{b_key_id}"), &b.master_key)
        .await;
    assert_eq!(b_view["name"], "k");
    assert_eq!(b_view["status"], "active");
    let account = app
        .get_json(&format!("/api/v1/accounts/{}", b.id), ADMIN_TOKEN)
        .await;
    assert_eq!(account["status"], "active");
    let hook = app
        .get_json(
            &format!("/api/v1/webhook-endpoints/{b_hook}"),
            &b.master_key,
        )
        .await;
    assert_eq!(hook["enabled"], true, "B's endpoint is as it was");
    // A's filters naming B's key find nothing of B's.
    let (_, body) = console_get(
        &app,
        &cookie,
        &format!("/console/requests?key_id={b_key_id}"),
    )
    .await;
    assert!(!body.contains(&b_request));
    let records = csv_records(
        &app,
        &cookie,
        &format!("/console/requests.csv?key_id={b_key_id}"),
    )
    .await;
    assert_eq!(
        records.len(),
        2,
        "the header and the totals only: {records:?}"
    );
}

#[tokio::test]
async fn the_same_create_form_sent_twice_makes_one_key() {
    let app = spawn_app().await;
    let account = app.create_account("console").await;
    let cookie = session_cookie(&app, &account.master_key).await;
    let (_, body) = keys_page(&app, &cookie).await;
    let token = body
        .split("name=\"form_token\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let before = api_keys(&app, account.id).await.len();
    // Refused by the API's validation: the token is free again, so the form can be fixed.
    let refused = post_form(
        &app,
        &cookie,
        "/console/keys",
        &[
            ("name", "twice"),
            ("monthly_spend_cap", "lots"),
            ("form_token", &token),
        ],
    )
    .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let form = [("name", "twice"), ("form_token", token.as_str())];
    let first = post_form(&app, &cookie, "/console/keys", &form).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let secret = shown_secret(&first.text().await.unwrap());
    let second = post_form(&app, &cookie, "/console/keys", &form).await;
    assert_eq!(second.status(), StatusCode::CONFLICT);
    let body = second.text().await.unwrap();
    assert!(body.contains("This form was already sent"), "{body}");
    assert!(!body.contains(&secret), "the secret is shown once");
    assert_eq!(api_keys(&app, account.id).await.len(), before + 1);
    // Each page shows a new form with a new token.
    let (_, body) = keys_page(&app, &cookie).await;
    assert!(!body.contains(&token));
}

/// The operator puts an account on a plan and grants it a pack from its page, once per form; the
/// customer's wallet page shows the plan and each bucket as the API counts it.
#[tokio::test]
async fn the_operator_sets_a_plan_and_grants_a_pack_and_the_customer_sees_its_included_units() {
    use tollgate_server::config::plans::{RawAllowance, RawPlan, RawUnits};
    let plan = |name: &str, units: i64| RawPlan {
        name: name.into(),
        allowances: vec![RawAllowance {
            name: "calls".into(),
            meter: "requests".into(),
            routes: Some("echo".into()),
            units: RawUnits::Count(units),
            overage: "block".into(),
            rollover: None,
            windows: Vec::new(),
        }],
        ..RawPlan::default()
    };
    let app = spawn_app_with(move |raw, _| {
        raw.plans = vec![plan("free", 2), plan("pro", 50)];
        raw.billing.default_plan = Some("free".into());
    })
    .await;
    let acme = app.create_account("Acme").await;
    let customer = session_cookie(&app, &acme.master_key).await;
    let (status, wallet) = console_get(&app, &customer, "/console/wallet").await;
    assert_eq!(status, StatusCode::OK);
    assert!(wallet.contains("Plan <strong>free</strong>"), "{wallet}");
    assert!(
        wallet.contains("data-name=\"calls\" data-remaining=\"2\""),
        "{wallet}"
    );

    let operator = session_cookie(&app, ADMIN_TOKEN).await;
    let account_page = format!("/console/accounts/{}", acme.id);
    let set = post_form(
        &app,
        &operator,
        &format!("{account_page}/subscription"),
        &[("plan", "pro"), ("status", "active")],
    )
    .await;
    assert_eq!(set.status(), StatusCode::SEE_OTHER);
    let (_, form) = console_get(&app, &operator, &account_page).await;
    assert!(form.contains("<option value=\"pro\" selected>"), "{form}");
    let id = form
        .split("name=\"id\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let expires = (app.clock.now() + chrono::Duration::days(10))
        .format("%Y-%m-%d")
        .to_string();
    let pack = [
        ("id", id.as_str()),
        ("units", "7"),
        ("meter", "requests"),
        ("routes", "echo"),
        ("expires", expires.as_str()),
    ];
    let path = format!("{account_page}/packs");
    let first = post_form(&app, &operator, &path, &pack).await;
    assert!(first.headers()[LOCATION]
        .to_str()
        .unwrap()
        .ends_with("granted=pack"));
    let again = post_form(&app, &operator, &path, &pack).await;
    assert!(again.headers()[LOCATION]
        .to_str()
        .unwrap()
        .ends_with("granted=pack_again"));
    // The API's own refusals, on the page.
    let refused = post_form(
        &app,
        &operator,
        &format!("{account_page}/subscription"),
        &[("plan", "gold"), ("status", "active")],
    )
    .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("not a configured plan"));

    let (_, wallet) = console_get(&app, &customer, "/console/wallet").await;
    assert!(wallet.contains("Plan <strong>pro</strong>"), "{wallet}");
    assert!(
        wallet.contains("data-name=\"calls\" data-remaining=\"50\""),
        "{wallet}"
    );
    assert!(
        wallet.contains(&format!("data-name=\"{id}\" data-remaining=\"7\"")),
        "{wallet}"
    );
    // A customer's session cannot reach the operator's forms.
    let theirs = post_form(&app, &customer, &path, &pack).await;
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
}

/// The customer's wallet page lists the packs on offer and buys one from the wallet; the same
/// form sent twice buys once.
#[tokio::test]
async fn the_customer_buys_a_pack_from_the_wallet_page_once_per_form() {
    use tollgate_server::config::plans::{RawPackOffer, RawUnits};
    let app = spawn_app_with(|raw, _| {
        raw.packs = vec![RawPackOffer {
            name: "calls-10".into(),
            meter: "requests".into(),
            routes: Some("echo".into()),
            units: RawUnits::Count(10),
            price: "1.50".into(),
            valid_for: "30d".into(),
        }];
    })
    .await;
    let acme = app.create_account("Acme").await;
    let customer = session_cookie(&app, &acme.master_key).await;
    let (status, wallet) = console_get(&app, &customer, "/console/wallet").await;
    assert_eq!(status, StatusCode::OK);
    assert!(wallet.contains("<tr data-pack=\"calls-10\">"), "{wallet}");
    assert!(wallet.contains("1.5 USD"), "{wallet}");
    assert!(!wallet.contains("Buy by card"), "no card payments here");
    let order = wallet
        .split("name=\"order\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let form = [
        ("pack", "calls-10"),
        ("order", order.as_str()),
        ("pay", "wallet"),
    ];
    for _ in 0..2 {
        let bought = post_form(&app, &customer, "/console/wallet/packs", &form).await;
        assert_eq!(bought.status(), StatusCode::SEE_OTHER);
        assert_eq!(bought.headers()[LOCATION], "/console/wallet");
    }
    let (_, wallet) = console_get(&app, &customer, "/console/wallet").await;
    assert!(
        wallet.contains(&format!(
            "data-source=\"pack\" data-name=\"buy.{order}\" data-remaining=\"10\""
        )),
        "{wallet}"
    );
    assert_eq!(
        common::available(&app, &acme.master_key).await,
        3_500_000_000
    );
    // By card, where no payments are configured; and a pack not on offer.
    let card = [("pack", "calls-10"), ("order", "o2"), ("pay", "card")];
    let refused = post_form(&app, &customer, "/console/wallet/packs", &card).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let none = [("pack", "calls-99"), ("order", "o3"), ("pay", "wallet")];
    let refused = post_form(&app, &customer, "/console/wallet/packs", &none).await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert!(refused.text().await.unwrap().contains("not on offer"));
}

/// The webhooks page does what the API does: an endpoint added (its secret shown once, an
/// inside address refused with the reason), tested, its log with a delivery sent again,
/// disabled, rotated, deleted, and the low-balance amount set; another account's endpoint is
/// not there.
#[tokio::test]
async fn the_webhooks_page_manages_endpoints_their_log_and_the_low_balance() {
    let app = spawn_app_with(|raw, _| {
        raw.webhooks.allow_http = true;
        raw.webhooks.allow_private = vec!["127.0.0.0/8".into()];
        raw.webhooks.poll_interval = "20ms".into();
    })
    .await;
    let inbox = tollgate_mock::receiver::WebhookReceiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let acme = app.create_account("acme").await;
    let cookie = session_cookie(&app, &acme.master_key).await;
    let (status, body) = console_get(&app, &cookie, "/console/webhooks").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Add an endpoint"));

    let refused = post_form(
        &app,
        &cookie,
        "/console/webhooks",
        &[("url", "https://10.0.0.1/")],
    )
    .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(refused.text().await.unwrap().contains("private"));

    let url = inbox.url("/console");
    let added = post_form(
        &app,
        &cookie,
        "/console/webhooks",
        &[
            ("url", &url),
            ("events", "balance.low, webhook.ping"),
            ("description", "ops"),
        ],
    )
    .await;
    assert_eq!(added.status(), StatusCode::CREATED);
    let shown = added.text().await.unwrap();
    assert!(shown.contains("value=\"whsec_"), "the secret, once");
    let listed = app
        .get_json("/api/v1/webhook-endpoints", &acme.master_key)
        .await;
    let id = listed["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        listed["data"][0]["events"],
        json!(["balance.low", "webhook.ping"])
    );
    let (_, page) = console_get(&app, &cookie, "/console/webhooks").await;
    assert!(page.contains(&url) && !page.contains("whsec_"));

    let tested = post_form(&app, &cookie, &format!("/console/webhooks/{id}/test"), &[]).await;
    assert_eq!(tested.status(), StatusCode::OK);
    let received = inbox.wait_for("/console", 1, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 1);
    let event_id = received[0].webhook_id.clone().unwrap();
    let mut log = String::new();
    for _ in 0..1000 {
        log = console_get(&app, &cookie, &format!("/console/webhooks/{id}"))
            .await
            .1;
        if log.contains("delivery-delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        log.contains(&event_id) && log.contains("webhook.ping"),
        "{log}"
    );
    let again = post_form(
        &app,
        &cookie,
        &format!("/console/webhooks/{id}/deliveries/{event_id}/redeliver"),
        &[],
    )
    .await;
    assert_eq!(again.status(), StatusCode::OK);
    let twice = inbox.wait_for("/console", 2, Duration::from_secs(10)).await;
    assert_eq!(twice[1].webhook_id.as_deref(), Some(event_id.as_str()));

    let disabled = post_form(
        &app,
        &cookie,
        &format!("/console/webhooks/{id}/disable"),
        &[],
    )
    .await;
    assert_eq!(disabled.status(), StatusCode::OK);
    let endpoint = app
        .get_json(&format!("/api/v1/webhook-endpoints/{id}"), &acme.master_key)
        .await;
    assert_eq!(endpoint["enabled"], false);
    let rotated = post_form(
        &app,
        &cookie,
        &format!("/console/webhooks/{id}/rotate"),
        &[],
    )
    .await;
    let rotated = rotated.text().await.unwrap();
    assert!(rotated.contains("Secret rotated") && rotated.contains("value=\"whsec_"));

    let alert = post_form(
        &app,
        &cookie,
        "/console/webhooks/alert",
        &[("low_balance", "2.50")],
    )
    .await;
    assert_eq!(alert.status(), StatusCode::SEE_OTHER);
    let set = app
        .get_json(
            &format!("/api/v1/accounts/{}/balance-alert", acme.id),
            &acme.master_key,
        )
        .await;
    assert_eq!(set["low_balance"]["credits"], "2.5");
    let bad = post_form(
        &app,
        &cookie,
        "/console/webhooks/alert",
        &[("low_balance", "-1")],
    )
    .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // Another account's holder sees none of it and cannot act on it.
    let other = app.create_account("other").await;
    let other_cookie = session_cookie(&app, &other.master_key).await;
    let (status, _) = console_get(&app, &other_cookie, &format!("/console/webhooks/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let theirs = post_form(
        &app,
        &other_cookie,
        &format!("/console/webhooks/{id}/delete"),
        &[],
    )
    .await;
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);

    let deleted = post_form(
        &app,
        &cookie,
        &format!("/console/webhooks/{id}/delete"),
        &[],
    )
    .await;
    assert_eq!(deleted.status(), StatusCode::OK);
    let listed = app
        .get_json("/api/v1/webhook-endpoints", &acme.master_key)
        .await;
    assert_eq!(listed["data"], json!([]));
}
