//! The management API, one handle per area. Bodies and answers are `tollgate-wire`'s types,
//! the ones the server itself serialises. Listings are streams that fetch the next page only
//! when the one before is used up.

use crate::client::{Call, Client, Response};
use crate::error::{Error, ErrorKind};
use chrono::{DateTime, Utc};
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use http::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tollgate_core::{AccountId, EndpointId, EventId, HoldId, KeyId, RequestId, TopUpId};
use tollgate_wire::api::{
    Account, Allowances, ApiKeyInfo, AuditEntry, AuditVerification, AutoTopUp, AutoTopUpRequest,
    Balance, BalanceAlert, BuyPackRequest, CreateAccountRequest, CreateAccountResponse,
    CreateEndpointRequest, CreateHoldRequest, CreateKeyRequest, CreatePackRequest, CreatedKey,
    EndpointWithSecret, GrantRequest, HoldInfo, LedgerEntry, PackOffer, Page, QueuedEvent,
    ReconcileRequest, Reconciliation, ResetAllowanceRequest, RollKeyRequest, RolledKey,
    SetBalanceAlertRequest, SetSubscriptionRequest, SettleHoldRequest, Subscription, TopUp,
    TopUpRequest, UnitBucket, UpdateAccountRequest, UpdateEndpointRequest, UpdateKeyRequest,
    UsageRecord, UsageSummary, WebhookDelivery, WebhookEndpoint,
};

const API: &str = "/api/v1";

/// `path` with `query` (a serialisable struct of optional fields) appended.
fn with_query(path: &str, query: &impl Serialize) -> Result<String, Error> {
    let encoded = serde_urlencoded::to_string(query).map_err(|e| {
        Error::local(
            ErrorKind::Builder,
            format!("the query does not encode: {e}"),
            Some(Box::new(e)),
        )
    })?;
    Ok(if encoded.is_empty() {
        format!("{API}{path}")
    } else {
        format!("{API}{path}?{encoded}")
    })
}

impl Client {
    pub fn accounts(&self) -> Accounts<'_> {
        Accounts(self)
    }

    pub fn keys(&self) -> Keys<'_> {
        Keys(self)
    }

    /// Credits, balance, the ledger and usage totals.
    pub fn billing(&self) -> Billing<'_> {
        Billing(self)
    }

    /// The billing API's holds, for work metered outside the proxy.
    pub fn holds(&self) -> Holds<'_> {
        Holds(self)
    }

    /// The usage log: every data-plane call.
    pub fn requests(&self) -> Requests<'_> {
        Requests(self)
    }

    pub fn audit(&self) -> Audit<'_> {
        Audit(self)
    }

    /// Card top-ups and automatic top-up.
    pub fn payments(&self) -> Payments<'_> {
        Payments(self)
    }

    /// Plans: subscriptions, credit packs and the included units calls draw on.
    pub fn plans(&self) -> Plans<'_> {
        Plans(self)
    }

    /// Webhook endpoints, their delivery logs, and the balance alert.
    pub fn webhooks(&self) -> Webhooks<'_> {
        Webhooks(self)
    }

    async fn get<T: DeserializeOwned>(&self, path: String) -> Result<Response<T>, Error> {
        self.json(Call::new(Method::GET, format!("{API}{path}")))
            .await
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<&(impl Serialize + Sync)>,
    ) -> Result<Response<T>, Error> {
        let mut call = Call::new(method, format!("{API}{path}"));
        if let Some(body) = body {
            call = call.json(body)?;
        }
        self.json(call).await
    }

    /// Every item of any paged listing under `/api/v1` (`/keys?account_id=...`) as JSON,
    /// following the cursors as the stream is read: for what has no typed method yet.
    pub fn list_json(&self, path: &str) -> BoxStream<'static, Result<serde_json::Value, Error>> {
        self.pages(Ok(format!("{API}{path}")))
    }

    /// Every item of a paged listing at `path` (with its query), following `next_cursor` as
    /// the stream is read.
    fn pages<T: DeserializeOwned + Send + 'static>(
        &self,
        path: Result<String, Error>,
    ) -> BoxStream<'static, Result<T, Error>> {
        let path = match path {
            Ok(path) => path,
            Err(e) => return stream::once(async { Err(e) }).boxed(),
        };
        let path = match self.page_size() {
            None => path,
            Some(size) => {
                let sep = if path.contains('?') { '&' } else { '?' };
                format!("{path}{sep}limit={size}")
            }
        };
        let client = self.clone();
        // `None`: no page left; `Some(cursor)`: the next page (the first has no cursor).
        let pages = stream::try_unfold(Some(None::<String>), move |next| {
            let client = client.clone();
            let path = path.clone();
            async move {
                let Some(cursor) = next else {
                    return Ok(None);
                };
                let path = match cursor {
                    None => path,
                    Some(cursor) => {
                        let sep = if path.contains('?') { '&' } else { '?' };
                        let cursor =
                            serde_urlencoded::to_string([("cursor", cursor)]).unwrap_or_default();
                        format!("{path}{sep}{cursor}")
                    }
                };
                let page: Page<T> = client.json(Call::new(Method::GET, path)).await?.value;
                Ok::<_, Error>(Some((page.data, page.next_cursor.map(Some))))
            }
        });
        pages
            .map_ok(|data| stream::iter(data.into_iter().map(Ok)))
            .try_flatten()
            .boxed()
    }
}

/// `path` with `?account_id=` when an account is named (the admin names one; a key's own is
/// implied).
fn for_account(path: &str, account: Option<AccountId>) -> Result<String, Error> {
    with_query(path, &[("account_id", account)])
}

pub struct Accounts<'a>(&'a Client);

impl Accounts<'_> {
    /// Admin only. The answer carries the first master key's secret, shown once.
    pub async fn create(
        &self,
        request: &CreateAccountRequest,
    ) -> Result<Response<CreateAccountResponse>, Error> {
        self.0
            .send_json(Method::POST, "/accounts".into(), Some(request))
            .await
    }

    pub async fn get(&self, id: AccountId) -> Result<Response<Account>, Error> {
        self.0.get(format!("/accounts/{id}")).await
    }

    /// Admin only.
    pub async fn update(
        &self,
        id: AccountId,
        request: &UpdateAccountRequest,
    ) -> Result<Response<Account>, Error> {
        self.0
            .send_json(Method::PATCH, format!("/accounts/{id}"), Some(request))
            .await
    }

    /// Admin only: every key of the account stops working until it is reactivated.
    pub async fn suspend(&self, id: AccountId) -> Result<Response<Account>, Error> {
        self.0
            .send_json(Method::POST, format!("/accounts/{id}/suspend"), None::<&()>)
            .await
    }

    pub async fn reactivate(&self, id: AccountId) -> Result<Response<Account>, Error> {
        self.0
            .send_json(
                Method::POST,
                format!("/accounts/{id}/reactivate"),
                None::<&()>,
            )
            .await
    }

    /// Admin only; `status` filters (`active`, `suspended`).
    pub fn list(&self, status: Option<&str>) -> BoxStream<'static, Result<Account, Error>> {
        self.0.pages(with_query("/accounts", &[("status", status)]))
    }
}

pub struct Keys<'a>(&'a Client);

impl Keys<'_> {
    /// The answer carries the key's secret, shown once. A retry of a creation whose answer was
    /// lost gets [`ErrorKind::Conflict`] (naming the call that ran): Tollgate never keeps a
    /// secret to replay it; roll the key it made for a new one.
    pub async fn create(&self, request: &CreateKeyRequest) -> Result<Response<CreatedKey>, Error> {
        self.0
            .send_json(Method::POST, "/keys".into(), Some(request))
            .await
    }

    pub async fn get(&self, id: KeyId) -> Result<Response<ApiKeyInfo>, Error> {
        self.0.get(format!("/keys/{id}")).await
    }

    /// The key this client calls with.
    pub async fn current(&self) -> Result<Response<ApiKeyInfo>, Error> {
        self.0.get("/key".into()).await
    }

    pub async fn update(
        &self,
        id: KeyId,
        request: &UpdateKeyRequest,
    ) -> Result<Response<ApiKeyInfo>, Error> {
        self.0
            .send_json(Method::PATCH, format!("/keys/{id}"), Some(request))
            .await
    }

    pub async fn revoke(&self, id: KeyId) -> Result<Response<ApiKeyInfo>, Error> {
        self.0
            .send_json(Method::POST, format!("/keys/{id}/revoke"), None::<&()>)
            .await
    }

    /// A new secret for the key; the old one works on for the grace period asked.
    pub async fn roll(
        &self,
        id: KeyId,
        request: &RollKeyRequest,
    ) -> Result<Response<RolledKey>, Error> {
        self.0
            .send_json(Method::POST, format!("/keys/{id}/roll"), Some(request))
            .await
    }

    /// The admin names the account; a master key lists its own.
    pub fn list(
        &self,
        account_id: Option<AccountId>,
    ) -> BoxStream<'static, Result<ApiKeyInfo, Error>> {
        self.0.pages(for_account("/keys", account_id))
    }
}

/// `GET /usage`'s question.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<AccountId>,
    /// `day` (default), `key`, `route` or `model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
}

pub struct Billing<'a>(&'a Client);

impl Billing<'_> {
    /// Admin only. With a `reference`, the grant is applied at most once, however often sent.
    pub async fn grant(
        &self,
        account: AccountId,
        request: &GrantRequest,
    ) -> Result<Response<Balance>, Error> {
        self.0
            .send_json(
                Method::POST,
                format!("/accounts/{account}/credits"),
                Some(request),
            )
            .await
    }

    /// The admin names the account; a key reads its own.
    pub async fn balance(&self, account: Option<AccountId>) -> Result<Response<Balance>, Error> {
        let path = for_account("/billing/balance", account)?;
        self.0.json(Call::new(Method::GET, path)).await
    }

    /// Every wallet movement, newest first.
    pub fn ledger(
        &self,
        account: Option<AccountId>,
    ) -> BoxStream<'static, Result<LedgerEntry, Error>> {
        self.0.pages(for_account("/ledger", account))
    }

    pub async fn usage(&self, query: &UsageQuery) -> Result<Response<UsageSummary>, Error> {
        let path = with_query("/usage", query)?;
        self.0.json(Call::new(Method::GET, path)).await
    }
}

pub struct Plans<'a>(&'a Client);

impl Plans<'_> {
    /// The plan and every bucket of included units, in draw order. The admin names the
    /// account; a key reads its own.
    pub async fn allowances(
        &self,
        account: Option<AccountId>,
    ) -> Result<Response<Allowances>, Error> {
        let path = for_account("/billing/allowances", account)?;
        self.0.json(Call::new(Method::GET, path)).await
    }

    /// Admin only: puts the account on a plan or moves its subscription's status.
    pub async fn set_subscription(
        &self,
        account: AccountId,
        request: &SetSubscriptionRequest,
    ) -> Result<Response<Subscription>, Error> {
        self.0
            .send_json(
                Method::PUT,
                format!("/accounts/{account}/subscription"),
                Some(request),
            )
            .await
    }

    /// Admin only: a pack of units; granting a pack id again grants nothing.
    pub async fn grant_pack(
        &self,
        account: AccountId,
        request: &CreatePackRequest,
    ) -> Result<Response<UnitBucket>, Error> {
        self.0
            .send_json(
                Method::POST,
                format!("/accounts/{account}/packs"),
                Some(request),
            )
            .await
    }

    /// The credit packs on offer.
    pub async fn pack_offers(&self) -> Result<Response<Vec<PackOffer>>, Error> {
        self.0.get("/billing/packs".into()).await
    }

    /// Buys a pack from the wallet (a master key for its own account; the admin names one in
    /// the request). Buying with an id again pays nothing more, so a retry is safe.
    pub async fn buy_pack(
        &self,
        pack: &str,
        request: &BuyPackRequest,
    ) -> Result<Response<UnitBucket>, Error> {
        let pack = percent_encoding::utf8_percent_encode(pack, percent_encoding::NON_ALPHANUMERIC);
        self.0
            .send_json(
                Method::POST,
                format!("/billing/packs/{pack}/buy"),
                Some(request),
            )
            .await
    }

    /// Admin only: the current period's used units back to zero, once per reference.
    pub async fn reset_allowance(
        &self,
        account: AccountId,
        allowance: &str,
        request: &ResetAllowanceRequest,
    ) -> Result<Response<UnitBucket>, Error> {
        // A name is any text the config allows: one path segment, escaped.
        let allowance =
            percent_encoding::utf8_percent_encode(allowance, percent_encoding::NON_ALPHANUMERIC);
        self.0
            .send_json(
                Method::POST,
                format!("/accounts/{account}/allowances/{allowance}/reset"),
                Some(request),
            )
            .await
    }
}

pub struct Webhooks<'a>(&'a Client);

impl Webhooks<'_> {
    /// The answer carries the endpoint's signing secret, shown once.
    pub async fn create(
        &self,
        request: &CreateEndpointRequest,
    ) -> Result<Response<EndpointWithSecret>, Error> {
        self.0
            .send_json(Method::POST, "/webhook-endpoints".into(), Some(request))
            .await
    }

    /// The admin names the account; a master key lists its own.
    pub async fn list(
        &self,
        account: Option<AccountId>,
    ) -> Result<Response<Page<WebhookEndpoint>>, Error> {
        let path = for_account("/webhook-endpoints", account)?;
        self.0.json(Call::new(Method::GET, path)).await
    }

    pub async fn get(&self, id: EndpointId) -> Result<Response<WebhookEndpoint>, Error> {
        self.0.get(format!("/webhook-endpoints/{id}")).await
    }

    pub async fn update(
        &self,
        id: EndpointId,
        request: &UpdateEndpointRequest,
    ) -> Result<Response<WebhookEndpoint>, Error> {
        self.0
            .send_json(
                Method::PATCH,
                format!("/webhook-endpoints/{id}"),
                Some(request),
            )
            .await
    }

    /// Deletes the endpoint and its delivery log.
    pub async fn delete(&self, id: EndpointId) -> Result<(), Error> {
        let call = Call::new(Method::DELETE, format!("{API}/webhook-endpoints/{id}"));
        self.0.send_whole(call).await.map(drop)
    }

    /// A new signing secret, shown once; the old one signs beside it for the overlap.
    pub async fn rotate_secret(
        &self,
        id: EndpointId,
    ) -> Result<Response<EndpointWithSecret>, Error> {
        self.0
            .send_json(
                Method::POST,
                format!("/webhook-endpoints/{id}/rotate-secret"),
                None::<&()>,
            )
            .await
    }

    /// Queues a `webhook.ping` for the endpoint.
    pub async fn test(&self, id: EndpointId) -> Result<Response<QueuedEvent>, Error> {
        self.0
            .send_json(
                Method::POST,
                format!("/webhook-endpoints/{id}/test"),
                None::<&()>,
            )
            .await
    }

    /// The endpoint's deliveries, newest first.
    pub fn deliveries(&self, id: EndpointId) -> BoxStream<'static, Result<WebhookDelivery, Error>> {
        self.0
            .pages(Ok(format!("{API}/webhook-endpoints/{id}/deliveries")))
    }

    /// Makes a delivery due again now, under the same `webhook-id`.
    pub async fn redeliver(
        &self,
        id: EndpointId,
        event: EventId,
    ) -> Result<Response<QueuedEvent>, Error> {
        self.0
            .send_json(
                Method::POST,
                format!("/webhook-endpoints/{id}/deliveries/{event}/redeliver"),
                None::<&()>,
            )
            .await
    }

    pub async fn balance_alert(&self, account: AccountId) -> Result<Response<BalanceAlert>, Error> {
        self.0
            .get(format!("/accounts/{account}/balance-alert"))
            .await
    }

    /// `Some(amount)` sends `balance.low` below it; `None` turns it off.
    pub async fn set_balance_alert(
        &self,
        account: AccountId,
        low_balance: Option<&str>,
    ) -> Result<Response<BalanceAlert>, Error> {
        let request = SetBalanceAlertRequest {
            low_balance: low_balance.map(str::to_string),
        };
        self.0
            .send_json(
                Method::PUT,
                format!("/accounts/{account}/balance-alert"),
                Some(&request),
            )
            .await
    }
}

pub struct Holds<'a>(&'a Client);

impl Holds<'_> {
    /// Reserves credit for work about to run, as a guard: settle it with the actual cost or
    /// release it; dropped unresolved, it is released (on the tokio runtime it was dropped
    /// in; the hold's TTL is the backstop).
    pub async fn open(&self, request: &CreateHoldRequest) -> Result<HoldGuard, Error> {
        let hold = self
            .0
            .send_json(Method::POST, "/holds".into(), Some(request))
            .await?;
        Ok(HoldGuard {
            client: self.0.clone(),
            hold,
            resolved: false,
        })
    }

    pub async fn get(&self, id: HoldId) -> Result<Response<HoldInfo>, Error> {
        self.0.get(format!("/holds/{id}")).await
    }

    /// Charges `amount` (credits, at most the hold) and returns the rest. Settling twice
    /// returns the first outcome.
    pub async fn settle(&self, id: HoldId, amount: &str) -> Result<Response<HoldInfo>, Error> {
        let body = SettleHoldRequest {
            amount: amount.to_string(),
        };
        self.0
            .send_json(Method::POST, format!("/holds/{id}/settle"), Some(&body))
            .await
    }

    pub async fn release(&self, id: HoldId) -> Result<Response<HoldInfo>, Error> {
        self.0
            .send_json(Method::POST, format!("/holds/{id}/release"), None::<&()>)
            .await
    }
}

/// An open hold that is released when dropped unless settled or released first.
#[derive(Debug)]
pub struct HoldGuard {
    client: Client,
    hold: Response<HoldInfo>,
    resolved: bool,
}

impl HoldGuard {
    pub fn id(&self) -> HoldId {
        self.hold.id
    }

    pub fn hold(&self) -> &Response<HoldInfo> {
        &self.hold
    }

    /// Charges `amount` (credits, at most the hold); the rest goes back to the wallet. If the
    /// settle fails, the guard still releases the hold as it drops (a hold resolves once, so a
    /// settle that did land keeps its charge).
    pub async fn settle(mut self, amount: &str) -> Result<Response<HoldInfo>, Error> {
        let settled = self.client.holds().settle(self.hold.id, amount).await?;
        self.resolved = true;
        Ok(settled)
    }

    pub async fn release(mut self) -> Result<Response<HoldInfo>, Error> {
        let released = self.client.holds().release(self.hold.id).await?;
        self.resolved = true;
        Ok(released)
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if self.resolved {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, id) = (self.client.clone(), self.hold.id);
            runtime.spawn(async move {
                let _ = client.holds().release(id).await;
            });
        }
    }
}

/// `GET /requests`' filters; every field optional.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<AccountId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<KeyId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `2xx`, `4xx`, `5xx`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billing_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
}

pub struct Requests<'a>(&'a Client);

impl Requests<'_> {
    /// Newest first.
    pub fn list(&self, filter: &RequestFilter) -> BoxStream<'static, Result<UsageRecord, Error>> {
        self.0.pages(with_query("/requests", filter))
    }

    /// One call by its request ID (the `X-Request-Id` it was answered with).
    pub async fn get(&self, id: RequestId) -> Result<Response<UsageRecord>, Error> {
        self.0.get(format!("/requests/{id}")).await
    }
}

pub struct Audit<'a>(&'a Client);

impl Audit<'_> {
    /// Admin only.
    pub fn list(&self) -> BoxStream<'static, Result<AuditEntry, Error>> {
        self.0.pages(Ok(format!("{API}/audit")))
    }

    /// Admin only: walks the hash chain.
    pub async fn verify(&self) -> Result<Response<AuditVerification>, Error> {
        self.0.get("/audit/verify".into()).await
    }
}

pub struct Payments<'a>(&'a Client);

impl Payments<'_> {
    /// Starts a card top-up; the customer pays at its `checkout_url`.
    pub async fn create_topup(&self, request: &TopUpRequest) -> Result<Response<TopUp>, Error> {
        self.0
            .send_json(Method::POST, "/topups".into(), Some(request))
            .await
    }

    pub async fn topup(&self, id: TopUpId) -> Result<Response<TopUp>, Error> {
        self.0.get(format!("/topups/{id}")).await
    }

    pub fn topups(&self, account: Option<AccountId>) -> BoxStream<'static, Result<TopUp, Error>> {
        self.0.pages(for_account("/topups", account))
    }

    /// Admin only: handles the payment provider's events since `since` that never arrived.
    pub async fn reconcile(&self, since: DateTime<Utc>) -> Result<Response<Reconciliation>, Error> {
        self.0
            .send_json(
                Method::POST,
                "/payments/reconcile".into(),
                Some(&ReconcileRequest { since }),
            )
            .await
    }

    pub async fn auto_topup(
        &self,
        account: Option<AccountId>,
    ) -> Result<Response<AutoTopUp>, Error> {
        let path = for_account("/auto-topup", account)?;
        self.0.json(Call::new(Method::GET, path)).await
    }

    pub async fn set_auto_topup(
        &self,
        request: &AutoTopUpRequest,
    ) -> Result<Response<AutoTopUp>, Error> {
        self.0
            .send_json(Method::PUT, "/auto-topup".into(), Some(request))
            .await
    }

    pub async fn stop_auto_topup(
        &self,
        account: Option<AccountId>,
    ) -> Result<Response<AutoTopUp>, Error> {
        let path = for_account("/auto-topup", account)?;
        self.0.json(Call::new(Method::DELETE, path)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn queries_carry_only_what_is_set_encoded() {
        assert_eq!(for_account("/keys", None).unwrap(), "/api/v1/keys");
        let account = AccountId::new();
        assert_eq!(
            for_account("/keys", Some(account)).unwrap(),
            format!("/api/v1/keys?account_id={account}")
        );
        let filter = RequestFilter {
            route: Some("/v1".into()),
            status: Some(429),
            ..RequestFilter::default()
        };
        assert_eq!(
            with_query("/requests", &filter).unwrap(),
            "/api/v1/requests?route=%2Fv1&status=429"
        );
    }
}
