//! `spawn_app()`: a real Tollgate on 127.0.0.1:0 over a fresh SQLite file, in front of a real
//! mock upstream on its own port, with a manual clock and typed helpers.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, Utc};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::ledger::Wallet;
use tollgate_core::{AccountId, Clock, HoldId, KeyHash, KeyId, ManualClock, Nanos, RequestId};

type At = chrono::DateTime<chrono::Utc>;
use tollgate_core::audit::AuditEntry;
use tollgate_mock::MockUpstream;
use tollgate_server::config::{
    RawAdmin, RawConfig, RawModel, RawRoute, RawServer, RawStore, RouteKind, Secret,
};
use tollgate_server::{Application, Config};
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::{
    Account, AccountStore, AuditStore, BalanceSheet, ChangeFeed, HoldRecord, IdempotencyBegin,
    IdempotencyClaim, IdempotencyStore, InsertKeyOutcome, KeyChange, KeyLookup, KeyRecord,
    KeyStore, LedgerStore, LedgerWrite, RevokeOutcome, SessionRecord, SessionStore, StoreError,
    StoreHealth, StoredResponse, TransferRecord, UsageFilter, UsageRow, UsageStore,
};
use tollgate_wire::ErrorProfile;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub struct TestApp {
    pub url: String,
    pub addr: SocketAddr,
    pub mock: MockUpstream,
    pub clock: Arc<ManualClock>,
    pub store: Arc<CountingStore>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    /// The running server's shared state, for what only the inside can show (the shed limit).
    pub state: tollgate_server::state::AppState,
    raw: RawConfig,
    app_clock: Arc<dyn Clock>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

/// A route to the mock upstream.
pub fn mock_route(
    mock: &MockUpstream,
    prefix: &str,
    upstream_path: &str,
    group: &str,
    profile: ErrorProfile,
) -> RawRoute {
    RawRoute {
        prefix: prefix.into(),
        upstream: format!("{}{upstream_path}", mock.url()),
        group: group.into(),
        error_profile: profile,
        price: "0.001".into(),
        connect_timeout: "1s".into(),
        timeout: "10s".into(),
        ..RawRoute::default()
    }
}

/// An LLM route to the mock upstream, serving one model at `input`/`output` per million tokens.
pub fn llm_route(
    mock: &MockUpstream,
    prefix: &str,
    upstream_path: &str,
    kind: RouteKind,
    model: &str,
    (input, output): (&str, &str),
) -> RawRoute {
    let (group, profile) = match kind {
        RouteKind::Anthropic => ("anthropic", ErrorProfile::Anthropic),
        _ => ("openai", ErrorProfile::Openai),
    };
    RawRoute {
        kind,
        price: "0".into(),
        models: [(
            model.to_string(),
            RawModel {
                input: input.into(),
                output: output.into(),
                cached_input: None,
            },
        )]
        .into(),
        ..mock_route(mock, prefix, upstream_path, group, profile)
    }
}

/// The standard test routes: `/v1` (openai profile), `/anthropic`, `/echo` (native) and
/// `/problem` (echo, problem profile).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_, _| {}).await
}

pub async fn spawn_app_with(customize: impl FnOnce(&mut RawConfig, &MockUpstream)) -> TestApp {
    spawn(customize, false).await
}

/// Like [`spawn_app_with`], but the server runs on the real clock (`TestApp::clock` then moves
/// nothing): for tests of behaviour over real time.
pub async fn spawn_app_real_time(customize: impl FnOnce(&mut RawConfig, &MockUpstream)) -> TestApp {
    spawn(customize, true).await
}

async fn spawn(customize: impl FnOnce(&mut RawConfig, &MockUpstream), real_time: bool) -> TestApp {
    let mock = MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut raw = RawConfig {
        server: RawServer {
            listen: "127.0.0.1:0".into(),
            ..RawServer::default()
        },
        store: RawStore {
            url: format!("sqlite://{}", dir.path().join("tollgate.db").display()),
        },
        admin: RawAdmin {
            token: Some(Secret(ADMIN_TOKEN.into())),
        },
        routes: vec![
            llm_route(
                &mock,
                "/v1",
                "/v1",
                RouteKind::Openai,
                "mock-gpt",
                ("1", "2"),
            ),
            llm_route(
                &mock,
                "/anthropic",
                "",
                RouteKind::Anthropic,
                "mock-claude",
                ("3", "15"),
            ),
            mock_route(&mock, "/echo", "/echo", "echo", ErrorProfile::Native),
            mock_route(&mock, "/problem", "/echo", "problem", ErrorProfile::Problem),
        ],
        ..RawConfig::default()
    };
    raw.billing.starter_credits = "5".into();
    customize(&mut raw, &mock);
    for (i, route) in raw.routes.iter_mut().enumerate() {
        route.position = i;
    }
    let clock = Arc::new(ManualClock::new(tollgate_core::SystemClock.now()));
    let app_clock: Arc<dyn Clock> = if real_time {
        Arc::new(tollgate_core::SystemClock)
    } else {
        clock.clone()
    };
    start(raw, mock, dir, clock, app_clock).await
}

/// Starts a server over the SQLite file in `dir` (created, or as a previous server left it).
async fn start(
    raw: RawConfig,
    mock: MockUpstream,
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    app_clock: Arc<dyn Clock>,
) -> TestApp {
    let config = Config::from_raw(raw.clone()).expect("test config is valid");
    let sqlite = SqliteStore::open(&dir.path().join("tollgate.db"))
        .await
        .unwrap();
    let store = Arc::new(CountingStore::new(sqlite));
    let app = Application::build_with(config, store.clone(), app_clock.clone())
        .await
        .unwrap();
    let addr = app.local_addr();
    let state = app.state().clone();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        url: format!("http://{addr}"),
        addr,
        mock,
        clock,
        store,
        http: reqwest::Client::new(),
        dir,
        state,
        raw,
        app_clock,
        server,
        _shutdown: shutdown,
    }
}

/// An account as the tests use it: its id and master key.
pub struct TestAccount {
    pub id: AccountId,
    pub master_key: String,
    pub master_key_id: KeyId,
}

impl TestApp {
    /// Stops the server once its queued ledger writes are committed, and starts a new one over
    /// the same database, mock and config (on a new port), as an operator restarts a node.
    pub async fn restart(self) -> TestApp {
        self.restart_with(|_| {}).await
    }

    /// [`TestApp::restart`] with the config changed by `customize` for the next process.
    pub async fn restart_with(self, customize: impl FnOnce(&mut RawConfig)) -> TestApp {
        self.state.ledger.flush().await.unwrap();
        let TestApp {
            mock,
            clock,
            dir,
            mut raw,
            app_clock,
            server,
            _shutdown,
            ..
        } = self;
        drop(_shutdown);
        server.await.unwrap().unwrap();
        customize(&mut raw);
        start(raw, mock, dir, clock, app_clock).await
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    pub fn patch(&self, path: &str) -> RequestBuilder {
        self.http.patch(format!("{}{path}", self.url))
    }

    /// PATCHes a key's policy with `token` as the bearer credential.
    pub async fn patch_key(&self, token: &str, id: KeyId, body: Value) -> Response {
        self.patch(&format!("/api/v1/keys/{id}"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` with `token` as the bearer credential.
    pub async fn get_as(&self, path: &str, token: &str) -> Response {
        self.get(path).bearer_auth(token).send().await.unwrap()
    }

    /// GETs `path` with `token`, expects 200, and returns the JSON body.
    pub async fn get_json(&self, path: &str, token: &str) -> Value {
        let response = self.get_as(path, token).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    pub fn admin_post(&self, path: &str, body: Value) -> RequestBuilder {
        self.post(path).bearer_auth(ADMIN_TOKEN).json(&body)
    }

    /// Runs `sql` on the server's SQLite file behind its back: a hand edit of the database.
    pub async fn tamper(&self, sql: &str) {
        let url = format!("sqlite://{}", self.dir.path().join("tollgate.db").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }

    pub async fn create_account(&self, name: &str) -> TestAccount {
        let response = self
            .admin_post("/api/v1/accounts", json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        TestAccount {
            id: body["account"]["id"].as_str().unwrap().parse().unwrap(),
            master_key: body["master_key"]["secret"].as_str().unwrap().to_string(),
            master_key_id: body["master_key"]["id"].as_str().unwrap().parse().unwrap(),
        }
    }

    /// Creates a usage key with `body` (name defaults to "k"); returns (secret, id).
    pub async fn create_usage_key(&self, master_key: &str, mut body: Value) -> (String, KeyId) {
        if body.get("name").is_none() {
            body["name"] = json!("k");
        }
        let response = self
            .post("/api/v1/keys")
            .bearer_auth(master_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "{}",
            response.text().await.unwrap()
        );
        let body: Value = response.json().await.unwrap();
        (
            body["secret"].as_str().unwrap().to_string(),
            body["id"].as_str().unwrap().parse().unwrap(),
        )
    }
}

/// The account's available balance in nanos, as its own master key reads it.
pub async fn available(app: &TestApp, key: &str) -> i64 {
    let balance = app.get_json("/api/v1/billing/balance", key).await;
    balance["available"]["nanos"].as_i64().unwrap()
}

/// The books balance: every ledger account sums to zero, and the wallet's cached balance
/// equals the one rebuilt from its transfers.
pub async fn assert_books_balance(app: &TestApp, account: AccountId) {
    // Reads below would otherwise race the writer committing a call's last movements.
    app.state.ledger.flush().await.unwrap();
    let trial = app.store.trial_balance().await.unwrap();
    assert_eq!(trial.iter().map(|(_, n)| n).sum::<i64>(), 0, "{trial:?}");
    let wallet = app.store.wallet(account).await.unwrap().unwrap();
    assert_eq!(
        app.store.ledger_balance(account).await.unwrap(),
        wallet.available
    );
}

/// The usage row of the request that got `response`, once it is written.
pub async fn usage_of(app: &TestApp, key: &str, request_id: &str) -> Value {
    for _ in 0..100 {
        let response = app
            .get_as(&format!("/api/v1/requests/{request_id}"), key)
            .await;
        if response.status() == 200 {
            return response.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no usage row for {request_id}");
}

pub fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Checks a Tollgate-originated error: status, `X-Tollgate-Error`, the request ID in header and
/// body, and returns the body.
pub async fn expect_error(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let headers = response.headers().clone();
    assert_eq!(headers["x-tollgate-error"], code);
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();
    assert!(
        request_id.starts_with("req_") && request_id.len() == 30,
        "{request_id}"
    );
    let body: Value = response.json().await.unwrap();
    let in_body = body["error"]["request_id"]
        .as_str()
        .or(body["request_id"].as_str());
    if let Some(in_body) = in_body {
        assert_eq!(in_body, request_id);
    }
    body
}

/// Replaces request IDs with a placeholder so bodies can be compared as snapshots.
pub fn redact_request_id(mut body: Value) -> Value {
    for pointer in ["/error/request_id", "/request_id"] {
        if let Some(v) = body.pointer_mut(pointer) {
            *v = json!("req_…");
        }
    }
    body
}

/// The real SQLite store, counting key lookups so tests can prove when the store was not asked.
pub struct CountingStore {
    inner: SqliteStore,
    pub key_lookups: AtomicUsize,
    /// While set, every ledger commit fails as in an outage (and succeeds again once cleared).
    pub commits_fail: std::sync::atomic::AtomicBool,
    /// When set, the next ledger commit panics (a bug in the writer's path).
    pub commit_panics: std::sync::atomic::AtomicBool,
}

impl CountingStore {
    pub fn new(inner: SqliteStore) -> Self {
        CountingStore {
            inner,
            key_lookups: AtomicUsize::new(0),
            commits_fail: std::sync::atomic::AtomicBool::new(false),
            commit_panics: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn lookups(&self) -> usize {
        self.key_lookups.load(Ordering::SeqCst)
    }

    /// Closes the pool: every later call fails as if the database were gone.
    pub async fn close(&self) {
        self.inner.close().await;
    }
}

#[async_trait::async_trait]
impl AccountStore for CountingStore {
    async fn create_account(
        &self,
        id: AccountId,
        name: &str,
        starter: tollgate_core::Nanos,
        key: KeyRecord,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Account, StoreError> {
        self.inner.create_account(id, name, starter, key, at).await
    }
    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.inner.account(id).await
    }
    async fn accounts(
        &self,
        after: Option<AccountId>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        self.inner.accounts(after, status, limit).await
    }
    async fn search_accounts(
        &self,
        text: &str,
        after: Option<AccountId>,
        limit: u32,
    ) -> Result<Vec<Account>, StoreError> {
        self.inner.search_accounts(text, after, limit).await
    }
    async fn update_account(&self, account: &Account) -> Result<Option<Account>, StoreError> {
        self.inner.update_account(account).await
    }
}

#[async_trait::async_trait]
impl KeyStore for CountingStore {
    async fn insert_key(
        &self,
        key: &KeyRecord,
        limit: u32,
    ) -> Result<InsertKeyOutcome, StoreError> {
        self.inner.insert_key(key, limit).await
    }
    async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
        self.key_lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.key_by_hash(hash).await
    }
    async fn key_by_id(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.key_by_id(id).await
    }
    async fn keys(
        &self,
        account: Option<AccountId>,
        after: Option<KeyId>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.keys(account, after, limit).await
    }
    async fn revoke_key(
        &self,
        id: KeyId,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<RevokeOutcome, StoreError> {
        self.inner.revoke_key(id, at).await
    }
    async fn update_key(&self, key: &KeyRecord) -> Result<KeyChange, StoreError> {
        self.inner.update_key(key).await
    }
    async fn roll_key(
        &self,
        id: KeyId,
        hash: KeyHash,
        prefix: &str,
        old_expires: At,
        at: At,
    ) -> Result<KeyChange, StoreError> {
        self.inner.roll_key(id, hash, prefix, old_expires, at).await
    }
}

#[async_trait::async_trait]
impl LedgerStore for CountingStore {
    async fn ledger_balance(&self, account: AccountId) -> Result<tollgate_core::Nanos, StoreError> {
        self.inner.ledger_balance(account).await
    }
    async fn wallet(&self, account: AccountId) -> Result<Option<Wallet>, StoreError> {
        self.inner.wallet(account).await
    }
    async fn key_spent_since(&self, key: KeyId, since: At) -> Result<Nanos, StoreError> {
        self.inner.key_spent_since(key, since).await
    }
    async fn balance_sheet(
        &self,
        account: AccountId,
        at: At,
    ) -> Result<Option<BalanceSheet>, StoreError> {
        self.inner.balance_sheet(account, at).await
    }
    async fn pending_holds(&self) -> Result<Vec<HoldRecord>, StoreError> {
        self.inner.pending_holds().await
    }
    async fn holds_expired_by(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<HoldRecord>, StoreError> {
        self.inner.holds_expired_by(cutoff).await
    }
    async fn hold(&self, id: HoldId) -> Result<Option<HoldRecord>, StoreError> {
        self.inner.hold(id).await
    }
    async fn commit(
        &self,
        batch: tollgate_store::BatchId,
        writes: &[LedgerWrite],
    ) -> Result<(), StoreError> {
        if self.commit_panics.swap(false, Ordering::SeqCst) {
            panic!("commit panicked (test)");
        }
        if self.commits_fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("commits are failing (test)".into()));
        }
        self.inner.commit(batch, writes).await
    }
    async fn filed(&self, account: AccountId, reference: &str) -> Result<bool, StoreError> {
        self.inner.filed(account, reference).await
    }
    async fn filed_total(&self, account: AccountId, prefix: &str) -> Result<Nanos, StoreError> {
        self.inner.filed_total(account, prefix).await
    }
    async fn transfers(
        &self,
        account: AccountId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TransferRecord>, StoreError> {
        self.inner.transfers(account, before, limit).await
    }
    async fn trial_balance(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.inner.trial_balance().await
    }
}

#[async_trait::async_trait]
impl UsageStore for CountingStore {
    async fn requests(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, StoreError> {
        self.inner.requests(filter).await
    }
    async fn request(&self, id: RequestId) -> Result<Option<UsageRow>, StoreError> {
        self.inner.request(id).await
    }
    async fn purge_requests_before(&self, cutoff: At) -> Result<u64, StoreError> {
        self.inner.purge_requests_before(cutoff).await
    }
    async fn usage_summary(
        &self,
        account: AccountId,
        group_by: tollgate_store::UsageGroup,
        from: Option<At>,
        to: Option<At>,
    ) -> Result<Vec<tollgate_store::UsageBucket>, StoreError> {
        self.inner.usage_summary(account, group_by, from, to).await
    }
    async fn usage_series(
        &self,
        account: AccountId,
        split: tollgate_store::SeriesSplit,
        from: At,
        to: At,
    ) -> Result<Vec<tollgate_store::SeriesSlot>, StoreError> {
        self.inner.usage_series(account, split, from, to).await
    }
    async fn key_activity(
        &self,
        keys: &[KeyId],
        since: At,
    ) -> Result<Vec<tollgate_store::KeyActivity>, StoreError> {
        self.inner.key_activity(keys, since).await
    }
    async fn keys_near_cap(
        &self,
        account: AccountId,
        since: At,
        percent: u32,
        limit: u32,
    ) -> Result<Vec<tollgate_store::KeyActivity>, StoreError> {
        self.inner
            .keys_near_cap(account, since, percent, limit)
            .await
    }
    async fn api_charges(
        &self,
        account: AccountId,
        from: Option<At>,
        to: Option<At>,
    ) -> Result<(u64, Nanos), StoreError> {
        self.inner.api_charges(account, from, to).await
    }
}

#[async_trait::async_trait]
impl ChangeFeed for CountingStore {
    async fn changes(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<tollgate_store::StoreChange>>, StoreError> {
        self.inner.changes().await
    }
}

impl tollgate_store::Sharing for CountingStore {
    fn leases(&self) -> Option<Arc<dyn tollgate_store::LeaseStore>> {
        self.inner.leases()
    }
}

#[async_trait::async_trait]
impl StoreHealth for CountingStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for CountingStore {
    async fn begin_idempotent(
        &self,
        claim: &IdempotencyClaim,
    ) -> Result<IdempotencyBegin, StoreError> {
        self.inner.begin_idempotent(claim).await
    }
    async fn complete_idempotent(
        &self,
        scope: &str,
        key: &str,
        owner: RequestId,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        self.inner
            .complete_idempotent(scope, key, owner, response)
            .await
    }
    async fn release_idempotent(
        &self,
        scope: &str,
        key: &str,
        owner: RequestId,
    ) -> Result<(), StoreError> {
        self.inner.release_idempotent(scope, key, owner).await
    }
    async fn purge_idempotency(&self, now: At) -> Result<u64, StoreError> {
        self.inner.purge_idempotency(now).await
    }
}

#[async_trait::async_trait]
impl SessionStore for CountingStore {
    async fn create_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        self.inner.create_session(session).await
    }
    async fn session(&self, id_hash: &[u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.session(id_hash).await
    }
    async fn touch_session(&self, id_hash: &[u8; 32], at: At) -> Result<(), StoreError> {
        self.inner.touch_session(id_hash, at).await
    }
    async fn end_session(&self, id_hash: &[u8; 32]) -> Result<(), StoreError> {
        self.inner.end_session(id_hash).await
    }
    async fn purge_sessions(
        &self,
        idle_cutoff: At,
        absolute_cutoff: At,
    ) -> Result<u64, StoreError> {
        self.inner
            .purge_sessions(idle_cutoff, absolute_cutoff)
            .await
    }
}

#[async_trait::async_trait]
impl tollgate_store::ExportStore for CountingStore {
    async fn export_records(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<tollgate_store::ExportRecord>, StoreError> {
        self.inner.export_records(after, limit).await
    }
    async fn export_cursor(&self, sink: &str) -> Result<i64, StoreError> {
        self.inner.export_cursor(sink).await
    }
    async fn start_export(&self, sink: &str, at: DateTime<Utc>) -> Result<i64, StoreError> {
        self.inner.start_export(sink, at).await
    }
    async fn advance_export(
        &self,
        sink: &str,
        from: i64,
        to: i64,
        parked: &[(i64, tollgate_store::ParkReason, String)],
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.inner.advance_export(sink, from, to, parked, at).await
    }
    async fn parked_exports(
        &self,
        sink: &str,
        reason: Option<tollgate_store::ParkReason>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<tollgate_store::ParkedRecord>, StoreError> {
        self.inner.parked_exports(sink, reason, after, limit).await
    }
    async fn newly_mapped_exports(
        &self,
        sink: &str,
        card_customers: bool,
        limit: u32,
    ) -> Result<Vec<tollgate_store::ExportRecord>, StoreError> {
        self.inner
            .newly_mapped_exports(sink, card_customers, limit)
            .await
    }
    async fn repark_export(
        &self,
        sink: &str,
        seq: i64,
        now: Option<(tollgate_store::ParkReason, String)>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.inner.repark_export(sink, seq, now, at).await
    }
    async fn export_customers(
        &self,
        sink: &str,
        card_customers: bool,
        accounts: &[AccountId],
    ) -> Result<Vec<(AccountId, String)>, StoreError> {
        self.inner
            .export_customers(sink, card_customers, accounts)
            .await
    }
    async fn set_export_customer(
        &self,
        account: AccountId,
        sink: &str,
        customer: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner
            .set_export_customer(account, sink, customer, at)
            .await
    }
    async fn export_standing(
        &self,
        sink: &str,
    ) -> Result<tollgate_store::SinkStanding, StoreError> {
        self.inner.export_standing(sink).await
    }
    async fn export_day_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<tollgate_store::DayTotal>, StoreError> {
        self.inner.export_day_totals(from, to).await
    }
    async fn purge_exports(
        &self,
        cutoff: DateTime<Utc>,
        sinks: &[String],
    ) -> Result<u64, StoreError> {
        self.inner.purge_exports(cutoff, sinks).await
    }
}

#[async_trait::async_trait]
impl tollgate_store::NotifyStore for CountingStore {
    async fn create_endpoint(
        &self,
        endpoint: &tollgate_store::EndpointRecord,
        limit: u32,
    ) -> Result<bool, StoreError> {
        self.inner.create_endpoint(endpoint, limit).await
    }
    async fn endpoint(
        &self,
        id: tollgate_core::EndpointId,
    ) -> Result<Option<tollgate_store::EndpointRecord>, StoreError> {
        self.inner.endpoint(id).await
    }
    async fn endpoints(
        &self,
        account: AccountId,
    ) -> Result<Vec<tollgate_store::EndpointRecord>, StoreError> {
        self.inner.endpoints(account).await
    }
    async fn update_endpoint(
        &self,
        endpoint: &tollgate_store::EndpointRecord,
    ) -> Result<bool, StoreError> {
        self.inner.update_endpoint(endpoint).await
    }
    async fn delete_endpoint(&self, id: tollgate_core::EndpointId) -> Result<bool, StoreError> {
        self.inner.delete_endpoint(id).await
    }
    async fn set_currency(&self, currency: &str) -> Result<(), StoreError> {
        self.inner.set_currency(currency).await
    }
    async fn set_low_balance(
        &self,
        account: AccountId,
        low: Option<Nanos>,
        currency: &str,
    ) -> Result<(), StoreError> {
        self.inner.set_low_balance(account, low, currency).await
    }
    async fn low_balance(&self, account: AccountId) -> Result<Option<Nanos>, StoreError> {
        self.inner.low_balance(account).await
    }
    async fn cross(
        &self,
        crossing: &tollgate_store::Crossing,
        event: &tollgate_core::notify::Event,
    ) -> Result<bool, StoreError> {
        self.inner.cross(crossing, event).await
    }
    async fn clear_crossing(
        &self,
        subject: &str,
        kind: tollgate_core::notify::EventType,
    ) -> Result<bool, StoreError> {
        self.inner.clear_crossing(subject, kind).await
    }
    async fn emit(&self, event: &tollgate_core::notify::Event) -> Result<(), StoreError> {
        self.inner.emit(event).await
    }
    async fn emit_to(
        &self,
        event: &tollgate_core::notify::Event,
        endpoint: tollgate_core::EndpointId,
    ) -> Result<(), StoreError> {
        self.inner.emit_to(event, endpoint).await
    }
    async fn keys_expiring(
        &self,
        now: At,
        horizon: At,
        limit: u32,
    ) -> Result<Vec<KeyId>, StoreError> {
        self.inner.keys_expiring(now, horizon, limit).await
    }
    async fn fan_out(&self, now: At, limit: u32) -> Result<u64, StoreError> {
        self.inner.fan_out(now, limit).await
    }
    async fn claim_deliveries(
        &self,
        now: At,
        lease_until: At,
        limit: u32,
    ) -> Result<Vec<tollgate_store::DueDelivery>, StoreError> {
        self.inner.claim_deliveries(now, lease_until, limit).await
    }
    async fn finish_attempt(&self, attempt: &tollgate_store::Attempt) -> Result<(), StoreError> {
        self.inner.finish_attempt(attempt).await
    }
    async fn deliveries(
        &self,
        endpoint: tollgate_core::EndpointId,
        before: Option<tollgate_core::EventId>,
        limit: u32,
    ) -> Result<Vec<tollgate_store::DeliveryRecord>, StoreError> {
        self.inner.deliveries(endpoint, before, limit).await
    }
    async fn purge_events(&self, cutoff: At) -> Result<u64, StoreError> {
        self.inner.purge_events(cutoff).await
    }
    async fn redeliver(
        &self,
        endpoint: tollgate_core::EndpointId,
        event: tollgate_core::EventId,
        now: At,
    ) -> Result<bool, StoreError> {
        self.inner.redeliver(endpoint, event, now).await
    }
}

#[async_trait::async_trait]
impl tollgate_store::UnitStore for CountingStore {
    async fn subscription(
        &self,
        account: AccountId,
    ) -> Result<Option<tollgate_core::plan::Subscription>, StoreError> {
        self.inner.subscription(account).await
    }
    async fn set_subscription(
        &self,
        account: AccountId,
        subscription: &tollgate_core::plan::Subscription,
    ) -> Result<(), StoreError> {
        self.inner.set_subscription(account, subscription).await
    }
    async fn add_pack(
        &self,
        pack: &tollgate_store::UnitBucket,
        at: At,
    ) -> Result<bool, StoreError> {
        self.inner.add_pack(pack, at).await
    }
    async fn reserve_units(
        &self,
        ask: &tollgate_store::UnitsAsk,
    ) -> Result<tollgate_store::UnitsAnswer, StoreError> {
        self.inner.reserve_units(ask).await
    }
    async fn settle_units(
        &self,
        request: RequestId,
        units: u64,
        at: At,
    ) -> Result<bool, StoreError> {
        self.inner.settle_units(request, units, at).await
    }
    async fn expire_units(&self, cutoff: At) -> Result<u64, StoreError> {
        self.inner.expire_units(cutoff).await
    }
    async fn unit_buckets(
        &self,
        account: AccountId,
        at: At,
    ) -> Result<Vec<tollgate_store::UnitBucket>, StoreError> {
        self.inner.unit_buckets(account, at).await
    }
    async fn reset_bucket(
        &self,
        account: AccountId,
        bucket: &str,
        reference: &str,
        at: At,
    ) -> Result<Option<bool>, StoreError> {
        self.inner
            .reset_bucket(account, bucket, reference, at)
            .await
    }
    async fn unit_entry_sums(
        &self,
        account: AccountId,
    ) -> Result<Vec<(String, u64, u64, u64)>, StoreError> {
        self.inner.unit_entry_sums(account).await
    }
}

#[async_trait::async_trait]
impl tollgate_store::PaymentStore for CountingStore {
    async fn create_topup(&self, topup: &tollgate_store::TopUp) -> Result<bool, StoreError> {
        self.inner.create_topup(topup).await
    }
    async fn save_card(
        &self,
        account: AccountId,
        customer: &str,
        payment_method: &str,
        at: At,
    ) -> Result<(), StoreError> {
        self.inner
            .save_card(account, customer, payment_method, at)
            .await
    }
    async fn set_auto_topup(&self, rule: &tollgate_store::AutoTopUp) -> Result<(), StoreError> {
        self.inner.set_auto_topup(rule).await
    }
    async fn auto_topup(
        &self,
        account: AccountId,
    ) -> Result<Option<tollgate_store::AutoTopUp>, StoreError> {
        self.inner.auto_topup(account).await
    }
    async fn disable_auto_topup(
        &self,
        account: AccountId,
        reason: Option<&str>,
        at: At,
    ) -> Result<(), StoreError> {
        self.inner.disable_auto_topup(account, reason, at).await
    }
    async fn auto_topups_due(&self) -> Result<Vec<tollgate_store::AutoTopUp>, StoreError> {
        self.inner.auto_topups_due().await
    }
    async fn auto_topups_since(&self, account: AccountId, since: At) -> Result<u32, StoreError> {
        self.inner.auto_topups_since(account, since).await
    }
    async fn topup(
        &self,
        id: tollgate_core::TopUpId,
    ) -> Result<Option<tollgate_store::TopUp>, StoreError> {
        self.inner.topup(id).await
    }
    async fn topup_by_provider_id(
        &self,
        provider_id: &str,
    ) -> Result<Option<tollgate_store::TopUp>, StoreError> {
        self.inner.topup_by_provider_id(provider_id).await
    }
    async fn topups(
        &self,
        account: AccountId,
        before: Option<tollgate_core::TopUpId>,
        limit: u32,
    ) -> Result<Vec<tollgate_store::TopUp>, StoreError> {
        self.inner.topups(account, before, limit).await
    }
    async fn set_checkout(
        &self,
        id: tollgate_core::TopUpId,
        session: &str,
        url: &str,
        at: At,
    ) -> Result<(), StoreError> {
        self.inner.set_checkout(id, session, url, at).await
    }
    async fn move_topup(
        &self,
        id: tollgate_core::TopUpId,
        status: tollgate_core::payment::TopUpStatus,
        payment_intent: Option<&str>,
        failure: Option<&str>,
        at: At,
    ) -> Result<bool, StoreError> {
        self.inner
            .move_topup(id, status, payment_intent, failure, at)
            .await
    }
    async fn set_dispute(
        &self,
        id: tollgate_core::TopUpId,
        status: &str,
        at: At,
    ) -> Result<bool, StoreError> {
        self.inner.set_dispute(id, status, at).await
    }
    async fn flag_topup(
        &self,
        id: tollgate_core::TopUpId,
        review: &str,
        at: At,
    ) -> Result<(), StoreError> {
        self.inner.flag_topup(id, review, at).await
    }
    async fn record_event(&self, event: &tollgate_store::PaymentEvent) -> Result<bool, StoreError> {
        self.inner.record_event(event).await
    }
    async fn finish_event(&self, id: &str, outcome: &str, at: At) -> Result<(), StoreError> {
        self.inner.finish_event(id, outcome, at).await
    }
    async fn waiting_events(
        &self,
        topup: tollgate_core::TopUpId,
        payment_intent: Option<&str>,
    ) -> Result<Vec<tollgate_store::PaymentEvent>, StoreError> {
        self.inner.waiting_events(topup, payment_intent).await
    }
}

#[async_trait::async_trait]
impl AuditStore for CountingStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditEntry, StoreError> {
        self.inner.append_audit(entry).await
    }
    async fn audit_entries(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit_entries(after_seq, limit).await
    }
    async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        self.inner.audit_head().await
    }
}
