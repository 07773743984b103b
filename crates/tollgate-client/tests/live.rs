//! The client against a real Tollgate, in-process on 127.0.0.1:0 over SQLite, in front of the
//! mock upstream: every area of the API, the errors the server emits read into their variants,
//! and a lost answer retried into its replay, charged once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures_util::TryStreamExt;
use http::Method;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_client::api::{
    CreateAccountRequest, CreateHoldRequest, CreateKeyRequest, GrantRequest, RollKeyRequest,
    UpdateAccountRequest, UpdateKeyRequest,
};
use tollgate_client::{AccountId, Client, ErrorKind, RequestFilter, UsageQuery};
use tollgate_core::ratelimit::{Scope, Unit};
use tollgate_mock::MockUpstream;
use tollgate_server::config::{
    RawAdmin, RawConfig, RawModel, RawPolicy, RawRoute, RawServer, RawStore, RouteKind, Secret,
};
use tollgate_server::{Application, Config};
use tollgate_wire::ErrorProfile;

const ADMIN: &str = "client-test-admin-token-0123456789";

struct Server {
    url: String,
    _mock: MockUpstream,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Tollgate with `/echo` (native, 0.001 a call), `/tight` (echo, one call per key in two minutes),
/// `/slow` (echo, a 200 ms timeout), `/gone` (nothing listens) and `/v1` (OpenAI, `mock-gpt`).
async fn spawn() -> Server {
    let mock = MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let route = |prefix: &str, upstream: String| RawRoute {
        prefix: prefix.into(),
        upstream,
        group: "echo".into(),
        error_profile: ErrorProfile::Native,
        price: "0.001".into(),
        connect_timeout: "1s".into(),
        timeout: "10s".into(),
        ..RawRoute::default()
    };
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut raw = RawConfig {
        server: RawServer {
            listen: "127.0.0.1:0".into(),
            max_body_bytes: 4096,
            max_header_bytes: 8192,
            ..RawServer::default()
        },
        store: RawStore {
            url: format!("sqlite://{}", dir.path().join("tollgate.db").display()),
        },
        admin: RawAdmin {
            token: Some(Secret(ADMIN.into())),
        },
        routes: vec![
            route("/echo", format!("{}/echo", mock.url())),
            RawRoute {
                rate_limits: vec![RawPolicy {
                    name: "tight".into(),
                    scope: Scope::KeyRoute,
                    unit: Unit::Requests,
                    limit: 1,
                    window: "2m".into(),
                    burst: 0,
                    on_limiter_failure: Default::default(),
                }],
                ..route("/tight", format!("{}/echo", mock.url()))
            },
            RawRoute {
                timeout: "200ms".into(),
                ..route("/slow", format!("{}/echo", mock.url()))
            },
            route("/gone", format!("http://127.0.0.1:{closed_port}")),
            RawRoute {
                kind: RouteKind::Openai,
                group: "openai".into(),
                error_profile: ErrorProfile::Openai,
                price: "0".into(),
                models: ["mock-gpt", "mock-gpt-mini"]
                    .map(|model| {
                        let price = RawModel {
                            input: "1".into(),
                            output: "2".into(),
                            cached_input: None,
                        };
                        (model.to_string(), price)
                    })
                    .into(),
                ..route("/v1", format!("{}/v1", mock.url()))
            },
        ],
        ..RawConfig::default()
    };
    raw.billing.starter_credits = "10".into();
    for (i, route) in raw.routes.iter_mut().enumerate() {
        route.position = i;
    }
    let app = Application::build(Config::from_raw(raw).unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    Server {
        url,
        _mock: mock,
        _dir: dir,
        _stop: stop,
    }
}

struct Customer {
    id: AccountId,
    master: Client,
    master_key: String,
}

async fn customer(server: &Server, admin: &Client, max_keys: Option<u32>) -> Customer {
    let created = admin
        .accounts()
        .create(&CreateAccountRequest {
            name: "Acme".into(),
            starter_credits: None,
            max_keys,
        })
        .await
        .unwrap();
    let master_key = created.master_key.secret.clone();
    Customer {
        id: created.account.id,
        master: Client::new(&server.url, master_key.as_str()).unwrap(),
        master_key,
    }
}

fn key_request(name: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        name: name.into(),
        account_id: None,
        kind: None,
        scopes: None,
        allowed_ips: None,
        expires_at: None,
        monthly_spend_cap: None,
    }
}

/// A usage key of the customer's made from `request`, as a client.
async fn usage_key(
    server: &Server,
    owner: &Customer,
    request: CreateKeyRequest,
) -> (Client, tollgate_client::KeyId) {
    let key = owner.master.keys().create(&request).await.unwrap();
    (
        Client::new(&server.url, key.secret.as_str()).unwrap(),
        key.key.id,
    )
}

fn code_of<T: std::fmt::Debug>(
    outcome: Result<T, tollgate_client::Error>,
) -> tollgate_client::Error {
    let err = outcome.expect_err("the call should have failed");
    assert!(
        err.request_id().is_some_and(|id| id.starts_with("req_")),
        "{err:?}"
    );
    assert!(err.to_string().contains(err.request_id().unwrap()));
    err
}

/// Each error the server answers is read into its own variant with its details; the catalogue
/// test in `error.rs` covers the codes this cannot provoke on demand (`internal_error`,
/// `overloaded`, `service_unavailable`, `account_in_debt`, `uri_too_long`, and
/// `unprocessable_entity`, which the server never sends today).
#[tokio::test]
async fn the_errors_the_server_emits_read_into_their_variants() {
    let server = spawn().await;
    let admin = Client::new(&server.url, ADMIN).unwrap();
    let acme = customer(&server, &admin, Some(3)).await;
    let echo = |client: &Client| client.proxy(Method::POST, "/echo/x").body("hi").send();

    // 400 bad_request and validation_error.
    let err = code_of(
        acme.master
            .proxy(Method::POST, "/api/v1/keys")
            .header("content-type", "application/json")
            .body("{")
            .send()
            .await,
    );
    assert_eq!(err.kind(), &ErrorKind::BadRequest);
    let err = code_of(acme.master.keys().create(&key_request("")).await);
    match err.kind() {
        ErrorKind::ValidationError { field_errors } => assert!(field_errors.contains_key("name")),
        other => panic!("{other:?}"),
    }

    // 401s.
    let nobody = Client::new(&server.url, "tg_live_nope").unwrap();
    assert_eq!(
        code_of(nobody.keys().current().await).kind(),
        &ErrorKind::InvalidApiKey
    );
    let (revoked, revoked_id) = usage_key(&server, &acme, key_request("to revoke")).await;
    acme.master.keys().revoke(revoked_id).await.unwrap();
    assert!(matches!(
        code_of(revoked.keys().current().await).kind(),
        ErrorKind::KeyRevoked {
            revoked_at: Some(_)
        }
    ));
    assert!(matches!(
        code_of(acme.master.keys().revoke(revoked_id).await).kind(),
        ErrorKind::AlreadyRevoked {
            revoked_at: Some(_)
        }
    ));
    let (inactive, inactive_id) = usage_key(&server, &acme, key_request("to pause")).await;
    let pause = UpdateKeyRequest {
        status: Some(Some(tollgate_core::KeyStatus::Inactive)),
        ..UpdateKeyRequest::default()
    };
    acme.master
        .keys()
        .update(inactive_id, &pause)
        .await
        .unwrap();
    assert_eq!(
        code_of(inactive.keys().current().await).kind(),
        &ErrorKind::KeyInactive
    );
    let expiring = CreateKeyRequest {
        expires_at: Some(chrono::Utc::now() + chrono::Duration::milliseconds(300)),
        ..key_request("short-lived")
    };
    let (expired, _) = usage_key(&server, &acme, expiring).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        code_of(expired.keys().current().await).kind(),
        ErrorKind::KeyExpired {
            expired_at: Some(_)
        }
    ));

    // 403s: the account may hold 3 keys (master, revoked one aside, paused, short-lived).
    assert!(matches!(
        code_of(
            acme.master
                .keys()
                .create(&key_request("one too many"))
                .await
        )
        .kind(),
        ErrorKind::KeyLimitReached { limit: Some(3) }
    ));
    let other = customer(&server, &admin, None).await;
    let (openai_only, _) = usage_key(
        &server,
        &other,
        CreateKeyRequest {
            scopes: Some(vec!["openai:mock-gpt-mini".into()]),
            ..key_request("openai only")
        },
    )
    .await;
    assert_eq!(
        code_of(echo(&openai_only).await).kind(),
        &ErrorKind::InsufficientScope {
            required_scope: Some("echo".into())
        }
    );
    // The OpenAI route renders OpenAI's shape, which has no details: the variant still comes
    // from X-Tollgate-Error.
    let chat = |client: &Client, model: &str| {
        client
            .proxy(Method::POST, "/v1/chat/completions")
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert!(matches!(
        code_of(chat(&openai_only, "mock-gpt").await).kind(),
        ErrorKind::ModelNotAllowed { .. }
    ));
    assert!(matches!(
        code_of(chat(&other.master, "no-such-model").await).kind(),
        ErrorKind::ModelNotFound { .. }
    ));
    let (walled, _) = usage_key(
        &server,
        &other,
        CreateKeyRequest {
            allowed_ips: Some(vec!["10.0.0.0/8".into()]),
            ..key_request("office only")
        },
    )
    .await;
    assert_eq!(
        code_of(echo(&walled).await).kind(),
        &ErrorKind::IpNotAllowed {
            client_ip: Some("127.0.0.1".into())
        }
    );
    let (plain, plain_id) = usage_key(&server, &other, key_request("plain")).await;
    assert_eq!(
        code_of(plain.keys().create(&key_request("x")).await).kind(),
        &ErrorKind::Forbidden
    );

    // 402s.
    let (capped, _) = usage_key(
        &server,
        &other,
        CreateKeyRequest {
            monthly_spend_cap: Some("0.0005".into()),
            ..key_request("capped")
        },
    )
    .await;
    match code_of(echo(&capped).await).kind() {
        ErrorKind::KeyQuotaExceeded { cap, required, .. } => {
            assert_eq!(cap.as_ref().unwrap().credits, "0.0005");
            assert_eq!(required.as_ref().unwrap().credits, "0.001");
        }
        other => panic!("{other:?}"),
    }
    let big = CreateHoldRequest {
        amount: "1000".into(),
        ttl_seconds: None,
        metadata: None,
        account_id: None,
    };
    match code_of(other.master.holds().open(&big).await).kind() {
        ErrorKind::InsufficientBalance { required, balance } => {
            assert_eq!(required.as_ref().unwrap().credits, "1000");
            assert_eq!(balance.as_ref().unwrap().credits, "10");
        }
        other => panic!("{other:?}"),
    }

    // 404, 405, 409, 422.
    assert_eq!(
        code_of(other.master.keys().get(revoked_id).await).kind(),
        &ErrorKind::NotFound
    );
    match code_of(admin.call_json(Method::DELETE, "/accounts", None).await).kind() {
        ErrorKind::MethodNotAllowed { allowed } => assert!(allowed.contains(&"GET".to_string())),
        other => panic!("{other:?}"),
    }
    let roll = |key: &str| {
        other
            .master
            .proxy(Method::POST, &format!("/api/v1/keys/{plain_id}/roll"))
            .idempotency_key(key)
            .json(&RollKeyRequest::default())
            .send()
    };
    roll("roll-1").await.unwrap();
    // The first answer showed a secret, which is never kept: it cannot be replayed.
    assert!(matches!(
        code_of(roll("roll-1").await).kind(),
        ErrorKind::Conflict {
            original_request_id: Some(_)
        }
    ));
    let mismatch = other
        .master
        .proxy(Method::POST, &format!("/api/v1/keys/{plain_id}/roll"))
        .idempotency_key("roll-1")
        .json(&RollKeyRequest {
            grace_period_seconds: Some(60),
        })
        .send()
        .await;
    assert_eq!(code_of(mismatch).kind(), &ErrorKind::IdempotencyKeyMismatch);

    // 409 idempotency_in_progress: a second call with the key of one still running.
    let slow_call = |retries: u32| {
        Client::builder(&server.url)
            .credential(acme.master_key.as_str())
            .max_retries(retries)
            .build()
            .unwrap()
            .proxy(Method::POST, "/echo/slow")
            .idempotency_key("slow-1")
            .header("x-mock-delay-ms", "2000")
            .body("once")
            .send()
    };
    let first = tokio::spawn(slow_call(0));
    // Well inside the first call's two seconds upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = code_of(slow_call(0).await);
    assert!(
        matches!(
            err.kind(),
            ErrorKind::IdempotencyInProgress {
                original_request_id: Some(_)
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    first.await.unwrap().unwrap();
    // Retried after the server's second, it gets the stored answer.
    assert!(slow_call(2).await.unwrap().meta.replayed);

    // 413 and 431 (a URI too long for 414 is one the `http` crate cannot even send).
    let err = code_of(
        other
            .master
            .proxy(Method::POST, "/echo/x")
            .body(vec![b'a'; 8 * 1024])
            .send()
            .await,
    );
    assert_eq!(
        err.kind(),
        &ErrorKind::PayloadTooLarge {
            limit_bytes: Some(4096)
        }
    );
    let err = code_of(
        other
            .master
            .proxy(Method::GET, "/echo/x")
            .header("x-big", &"a".repeat(16 * 1024))
            .send()
            .await,
    );
    assert!(
        matches!(
            err.kind(),
            ErrorKind::HeadersTooLarge {
                limit_bytes: Some(_)
            }
        ),
        "{err:?}"
    );

    // 429: one call in two minutes on /tight; the wait is over the 60 s cap, so it comes back at
    // once.
    let tight = Client::builder(&server.url)
        .credential(acme.master_key.as_str())
        .build()
        .unwrap();
    tight.proxy(Method::GET, "/tight/x").send().await.unwrap();
    let err = code_of(tight.proxy(Method::GET, "/tight/x").send().await);
    match err.kind() {
        ErrorKind::RateLimited {
            policy,
            limit,
            window,
            retry_after,
            ..
        } => {
            assert_eq!(policy.as_deref(), Some("tight"));
            assert_eq!(*limit, Some(1));
            assert_eq!(*window, Some(Duration::from_secs(120)));
            assert!(retry_after.is_some_and(|w| w > Duration::from_secs(60)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.status(), Some(429));
    assert!(err.is_retryable());

    // 502 and 504: retried (twice), then returned; never charged.
    let quick = Client::builder(&server.url)
        .credential(acme.master_key.as_str())
        .retry_policy(tollgate_client::RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            ..Default::default()
        })
        .build()
        .unwrap();
    let err = code_of(quick.proxy(Method::GET, "/gone/x").send().await);
    assert_eq!(err.kind(), &ErrorKind::UpstreamError);
    let err = code_of(
        quick
            .proxy(Method::GET, "/slow/x")
            .header("x-mock-delay-ms", "1000")
            .send()
            .await,
    );
    assert_eq!(err.kind(), &ErrorKind::UpstreamTimeout);
    // A timed-out call's row is written once its upstream exchange is over.
    let mut failed = Vec::new();
    for _ in 0..100 {
        failed = acme
            .master
            .requests()
            .list(&RequestFilter {
                status_class: Some("5xx".into()),
                ..RequestFilter::default()
            })
            .try_collect()
            .await
            .unwrap();
        if failed.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three attempts at /gone took the budget from 10 tokens to 7; at /slow the second
    // failure left 5, no more than half, so no third attempt.
    let attempts = |route: &str| failed.iter().filter(|r| r.route == route).count();
    assert_eq!((attempts("/gone"), attempts("/slow")), (3, 2));
    assert!(failed.iter().all(|r| r.cost.nanos == 0));
    assert_eq!(acme.id, failed[0].account_id);
}

/// Forwards the first connection's request to Tollgate and reads the whole answer, then closes
/// the client's side without a byte of it; later connections are passed through.
async fn answer_losing_proxy(target: SocketAddr) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut upstream = TcpStream::connect(target).await.unwrap();
            if !first {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                continue;
            }
            first = false;
            let mut buf = vec![0u8; 64 * 1024];
            let n = client.read(&mut buf).await.unwrap();
            upstream.write_all(&buf[..n]).await.unwrap();
            // The answer is chunked; its last chunk is sent once the idempotency record (and
            // the charge before it) is stored.
            let mut answer = Vec::new();
            while !answer.ends_with(b"0\r\n\r\n") {
                let n = upstream.read(&mut buf).await.unwrap();
                assert!(n > 0, "Tollgate closed before the end of its answer");
                answer.extend_from_slice(&buf[..n]);
            }
            assert!(
                answer.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&answer)
            );
            drop(client);
        }
    });
    url
}

#[tokio::test]
async fn a_lost_answer_is_retried_into_its_replay_and_charged_once() {
    let server = spawn().await;
    let admin = Client::new(&server.url, ADMIN).unwrap();
    let acme = customer(&server, &admin, None).await;
    let target: SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let lossy = Client::builder(answer_losing_proxy(target).await)
        .credential(acme.master_key.as_str())
        .build()
        .unwrap();
    let answer = lossy
        .proxy(Method::POST, "/echo/charge-me")
        .body("once")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.meta.attempts, 2);
    assert!(answer.meta.replayed, "the retry got the stored answer");
    let balance = acme.master.billing().balance(None).await.unwrap();
    assert_eq!(balance.available.credits, "9.999", "one charge of 0.001");
    let calls: Vec<_> = acme
        .master
        .requests()
        .list(&RequestFilter::default())
        .try_collect()
        .await
        .unwrap();
    let charged: Vec<_> = calls.iter().filter(|c| c.cost.nanos > 0).collect();
    assert_eq!(charged.len(), 1);
    assert!(calls
        .iter()
        .any(|c| c.replay_of == Some(charged[0].request_id) && c.cost.nanos == 0));
}

#[tokio::test]
async fn every_area_answers_in_its_types_and_listings_follow_cursors() {
    let server = spawn().await;
    let admin = Client::builder(&server.url)
        .credential(ADMIN)
        .page_size(2)
        .build()
        .unwrap();
    let acme = customer(&server, &admin, None).await;
    for n in 0..4 {
        admin
            .accounts()
            .create(&CreateAccountRequest {
                name: format!("filler {n}"),
                starter_credits: Some("0".into()),
                max_keys: None,
            })
            .await
            .unwrap();
    }
    let accounts: Vec<_> = admin.accounts().list(None).try_collect().await.unwrap();
    assert_eq!(accounts.len(), 5, "three pages of two");
    let renamed = admin
        .accounts()
        .update(
            acme.id,
            &UpdateAccountRequest {
                name: Some(Some("Acme Corp".into())),
                ..UpdateAccountRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name, "Acme Corp");
    assert_eq!(
        admin.accounts().suspend(acme.id).await.unwrap().status,
        "suspended"
    );
    assert_eq!(
        admin.accounts().reactivate(acme.id).await.unwrap().status,
        "active"
    );
    assert_eq!(
        admin.accounts().get(acme.id).await.unwrap().name,
        "Acme Corp"
    );

    let grant = GrantRequest {
        amount: "2.5".into(),
        reason: "test".into(),
        reference: Some("grant-1".into()),
    };
    admin.billing().grant(acme.id, &grant).await.unwrap();
    let balance = admin.billing().grant(acme.id, &grant).await.unwrap();
    assert_eq!(balance.available.credits, "12.5", "granted once");
    let ledger: Vec<_> = admin
        .billing()
        .ledger(Some(acme.id))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(ledger.len(), 2, "starter credits and the grant");

    let me = acme.master.keys().current().await.unwrap();
    let (_, key) = usage_key(&server, &acme, key_request("k")).await;
    let keys: Vec<_> = admin
        .keys()
        .list(Some(acme.id))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k.id == me.id));
    let rolled = acme
        .master
        .keys()
        .roll(
            key,
            &RollKeyRequest {
                grace_period_seconds: Some(60),
            },
        )
        .await
        .unwrap();
    assert!(rolled.secret.starts_with("tg_"));
    assert_eq!(acme.master.keys().get(key).await.unwrap().id, key);

    acme.master
        .proxy(Method::GET, "/echo/x")
        .send()
        .await
        .unwrap();
    let summary = acme
        .master
        .billing()
        .usage(&UsageQuery {
            group_by: Some("route".into()),
            ..UsageQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(summary.data[0].requests, 1);
    let call = acme
        .master
        .requests()
        .list(&RequestFilter::default())
        .try_next()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        acme.master
            .requests()
            .get(call.request_id)
            .await
            .unwrap()
            .path,
        "/echo/x"
    );

    let entries: Vec<_> = admin.audit().list().try_collect().await.unwrap();
    assert!(entries.len() > 5);
    assert!(admin.audit().verify().await.unwrap().valid);

    // Messages come in the language asked for; the kind does not change.
    let german = Client::builder(&server.url)
        .credential(acme.master_key.as_str())
        .language("de")
        .build()
        .unwrap();
    let err = code_of(german.keys().get(tollgate_client::KeyId::new()).await);
    assert_eq!(err.kind(), &ErrorKind::NotFound);
    assert!(
        err.message()
            .starts_with("Diese Route oder Ressource gibt es nicht"),
        "{err}"
    );

    // Card payments are not configured on this server, which says so.
    let topup = acme
        .master
        .payments()
        .create_topup(&tollgate_client::api::TopUpRequest {
            amount: Some("25".into()),
            pack: None,
            account_id: None,
        })
        .await;
    assert_eq!(code_of(topup).kind(), &ErrorKind::NotFound);
}

#[tokio::test]
async fn a_hold_guard_dropped_unresolved_releases_its_hold() {
    let server = spawn().await;
    let admin = Client::new(&server.url, ADMIN).unwrap();
    let acme = customer(&server, &admin, None).await;
    let request = CreateHoldRequest {
        amount: "4".into(),
        ttl_seconds: Some(3600),
        metadata: Some(serde_json::json!({"job": "render"})),
        account_id: None,
    };
    let guard = acme.master.holds().open(&request).await.unwrap();
    let id = guard.id();
    assert_eq!(
        acme.master
            .billing()
            .balance(None)
            .await
            .unwrap()
            .held
            .credits,
        "4"
    );
    drop(guard);
    let mut status = String::new();
    for _ in 0..100 {
        status = acme.master.holds().get(id).await.unwrap().status.clone();
        if status != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "released");
    let balance = acme.master.billing().balance(None).await.unwrap();
    assert_eq!(
        (
            balance.available.credits.as_str(),
            balance.held.credits.as_str()
        ),
        ("10", "0")
    );

    let settled = acme
        .master
        .holds()
        .open(&request)
        .await
        .unwrap()
        .settle("1.5")
        .await
        .unwrap();
    assert_eq!(settled.status, "settled");
    let released = acme
        .master
        .holds()
        .open(&request)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(released.status, "released");
    assert_eq!(
        acme.master
            .billing()
            .balance(None)
            .await
            .unwrap()
            .available
            .credits,
        "8.5"
    );
}

/// The demo's free plan: five inspections a month, then the typed refusal saying when they
/// come back; a pack from the operator extends it, and the allowances show both buckets.
#[tokio::test]
async fn a_free_plan_runs_out_into_its_typed_error_and_a_pack_extends_it() {
    use tollgate_client::api::{BuyPackRequest, CreatePackRequest, SetSubscriptionRequest};
    let dir = tempfile::tempdir().unwrap();
    let demo = tollgate_server::app::demo::Demo::spawn(dir.path())
        .await
        .unwrap();
    let admin = Client::new(&demo.url, demo.admin_token.as_str()).unwrap();
    let customer = Client::new(&demo.url, demo.master_key.as_str()).unwrap();
    let inspect = || customer.proxy(Method::GET, "/inspect/doc").send();
    for _ in 0..5 {
        inspect().await.unwrap();
    }
    let refused = inspect().await.unwrap_err();
    assert_eq!(refused.status(), Some(402));
    let resets_at = match refused.kind() {
        ErrorKind::AllowanceExhausted {
            meter,
            window,
            limit,
            used,
            held,
            resets_at,
        } => {
            assert_eq!(meter.as_deref(), Some("requests"));
            assert_eq!(window.as_deref(), Some("month"));
            // The last call's units may still be settling: held, then used.
            assert_eq!(*limit, Some(5));
            assert_eq!(used.unwrap() + held.unwrap(), 5);
            resets_at.unwrap()
        }
        other => panic!("{other:?}"),
    };
    let pack = admin
        .plans()
        .grant_pack(
            demo.account_id,
            &CreatePackRequest {
                id: Some("extra".into()),
                meter: "requests".into(),
                units: 2,
                routes: Some("inspect".into()),
                expires_at: resets_at + chrono::Duration::days(30),
            },
        )
        .await
        .unwrap();
    assert_eq!((pack.granted, pack.remaining), (2, 2));
    inspect().await.unwrap();
    let allowances = customer.plans().allowances(None).await.unwrap();
    assert_eq!(allowances.plan.as_deref(), Some("free"));
    let names: Vec<(&str, &str)> = allowances
        .buckets
        .iter()
        .map(|b| (b.source.as_str(), b.name.as_str()))
        .collect();
    assert_eq!(names, [("pack", "extra"), ("allowance", "inspections")]);
    // The customer buys the demo's pack from its wallet; the same order id buys nothing more.
    let offers = customer.plans().pack_offers().await.unwrap();
    assert_eq!(offers[0].name, "inspections-10");
    let order = BuyPackRequest {
        id: "order-1".into(),
        account_id: None,
    };
    let bought = customer
        .plans()
        .buy_pack("inspections-10", &order)
        .await
        .unwrap();
    assert_eq!((bought.name.as_str(), bought.granted), ("buy.order-1", 10));
    let again = customer
        .plans()
        .buy_pack("inspections-10", &order)
        .await
        .unwrap();
    assert_eq!(again.name, "buy.order-1");
    // An upgrade to the demo's pro plan applies at once, keeping the month's usage.
    let subscription = admin
        .plans()
        .set_subscription(
            demo.account_id,
            &SetSubscriptionRequest {
                plan: "pro".into(),
                status: None,
                started_at: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(subscription.status, "active");
    inspect().await.unwrap();
    // A customer cannot grant itself a pack.
    let denied = customer
        .plans()
        .grant_pack(
            demo.account_id,
            &CreatePackRequest {
                id: None,
                meter: "requests".into(),
                units: 1_000,
                routes: None,
                expires_at: resets_at,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(denied.status(), Some(403));
}

/// Webhooks through the client: an endpoint at the demo's receiver, a test ping that arrives
/// signed (checked with the client's own verifier), its delivery in the log, a redelivery under
/// the same id, a rotation, the balance alert, and deletion.
#[tokio::test]
async fn webhook_endpoints_deliver_signed_events_the_client_verifies() {
    use tollgate_client::api::{CreateEndpointRequest, UpdateEndpointRequest};
    use tollgate_client::webhook::WebhookVerifier;
    let dir = tempfile::tempdir().unwrap();
    let demo = tollgate_server::app::demo::Demo::spawn(dir.path())
        .await
        .unwrap();
    let customer = Client::new(&demo.url, demo.master_key.as_str()).unwrap();
    let hooks = customer.webhooks();
    let created = hooks
        .create(&CreateEndpointRequest {
            url: format!("{}/client", demo.webhooks_url),
            account_id: None,
            events: Some(vec!["balance.low".into()]),
            description: Some("client test".into()),
        })
        .await
        .unwrap();
    let id = created.endpoint.id;
    let verifier = WebhookVerifier::new(&created.secret).unwrap();
    let ping = hooks.test(id).await.unwrap();
    let http = reqwest::Client::new();
    let received = loop {
        let got: Vec<serde_json::Value> = http
            .get(format!("{}/received", demo.webhooks_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !got.is_empty() {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let delivery = &received[0];
    assert_eq!(delivery["webhook_id"], ping.event_id.to_string());
    verifier
        .verify_at(
            delivery["webhook_id"].as_str().unwrap(),
            delivery["webhook_timestamp"].as_str().unwrap(),
            delivery["webhook_signature"].as_str().unwrap(),
            delivery["body"].as_str().unwrap().as_bytes(),
            std::time::SystemTime::now(),
        )
        .unwrap();
    let logged: Vec<_> = loop {
        let log: Vec<_> = hooks.deliveries(id).try_collect().await.unwrap();
        if log.first().is_some_and(|d| d.status == "delivered") {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(logged[0].event_id, ping.event_id);
    assert_eq!(logged[0].event_type, "webhook.ping");
    hooks.redeliver(id, ping.event_id).await.unwrap();
    let rotated = hooks.rotate_secret(id).await.unwrap();
    assert_ne!(rotated.secret, created.secret);
    assert!(rotated.endpoint.previous_secret_expires_at.is_some());
    let disabled = hooks
        .update(
            id,
            &UpdateEndpointRequest {
                enabled: Some(false),
                ..UpdateEndpointRequest::default()
            },
        )
        .await
        .unwrap();
    assert!(!disabled.enabled);
    let alert = hooks
        .set_balance_alert(demo.account_id, Some("2.5"))
        .await
        .unwrap();
    assert_eq!(alert.low_balance.as_ref().unwrap().credits, "2.5");
    assert_eq!(
        hooks
            .balance_alert(demo.account_id)
            .await
            .unwrap()
            .low_balance,
        alert.low_balance
    );
    let listed = hooks.list(None).await.unwrap();
    assert_eq!(listed.data.len(), 1);
    hooks.delete(id).await.unwrap();
    let gone = hooks.get(id).await.unwrap_err();
    assert!(matches!(gone.kind(), ErrorKind::NotFound), "{gone:?}");
    let refused = hooks
        .create(&CreateEndpointRequest {
            url: "https://169.254.169.254/".into(),
            account_id: None,
            events: None,
            description: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(refused.kind(), ErrorKind::SsrfBlocked { reason: Some(_) }),
        "{refused:?}"
    );
}
