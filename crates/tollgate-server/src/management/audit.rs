//! The audit log: every management change (who, what, to which object, before and after, when,
//! under which request ID) appended to a SHA-256 chain (`tollgate_core::audit`), readable and
//! verifiable by the operator.
//!
//! An entry is appended after its change has been written. If the store fails in between, the
//! change stands and the failure is logged as an error: refusing a change that already happened
//! would only hide it.

use crate::http::error::validation;
use crate::http::error::HttpError;
use crate::management::extract::Caller;
use crate::management::extract::{page, page_limit, parse_query};
use crate::management::openapi;
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tollgate_core::audit::{AuditEntry, Checker, GENESIS};
use tollgate_core::RequestId;
use tollgate_wire::api as wire;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(verify))
}

/// One change, as handlers describe it.
pub struct Change {
    action: &'static str,
    target: String,
    before: Option<String>,
    after: Option<String>,
}

impl Change {
    pub fn new(action: &'static str, target: impl ToString) -> Change {
        Change {
            action,
            target: target.to_string(),
            before: None,
            after: None,
        }
    }

    /// The object before the change, as the API shows it.
    pub fn before(mut self, view: &impl Serialize) -> Change {
        self.before = serde_json::to_string(view).ok();
        self
    }

    pub fn after(mut self, view: &impl Serialize) -> Change {
        self.after = serde_json::to_string(view).ok();
        self
    }
}

/// Appends `change`, made by `caller` in request `request_id`, to the audit log.
pub async fn record(state: &AppState, caller: &Caller, request_id: RequestId, change: Change) {
    let entry = AuditEntry {
        seq: 0,
        at: state.clock.now(),
        actor: match caller {
            Caller::Admin => "admin".to_string(),
            Caller::Key(key) => key.id.to_string(),
        },
        action: change.action.to_string(),
        target: change.target,
        request_id: request_id.to_string(),
        before: change.before,
        after: change.after,
        prev_hash: GENESIS,
        hash: GENESIS,
    };
    if let Err(e) = state.store.append_audit(entry).await {
        tracing::error!(error = %e, action = change.action, "a management change was not audited");
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn view(entry: AuditEntry) -> wire::AuditEntry {
    let json = |text: Option<String>| {
        text.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)))
    };
    wire::AuditEntry {
        seq: entry.seq,
        at: entry.at,
        prev_hash: hex(&entry.prev_hash),
        hash: hex(&entry.hash),
        actor: entry.actor,
        action: entry.action,
        target: entry.target,
        request_id: entry.request_id,
        before: json(entry.before),
        after: json(entry.after),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// The `next_cursor` of the previous page (the last `seq` seen).
    cursor: Option<String>,
    /// Page size, 1 to 500; default 50.
    limit: Option<u32>,
}

/// Oldest first, paged: `?cursor=` is the last `seq` seen.
#[utoipa::path(
    get,
    path = "/audit",
    tag = "audit",
    operation_id = "list_audit_entries",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of entries, oldest first.", body = wire::Page<wire::AuditEntry>),
        (status = 400, response = openapi::Status400),
        (status = 403, response = openapi::Status403),
    ),
    security(("admin_token" = [])),
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<wire::Page<wire::AuditEntry>>, HttpError> {
    caller.require_admin()?;
    let query = parse_query(query)?;
    let limit = page_limit(query.limit)?;
    let after = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<u64>()
                .map_err(|_| validation("cursor", "is not a cursor from a previous page"))
        })
        .transpose()?
        .unwrap_or(0);
    Ok(Json(entries_page(&state, after, limit).await?))
}

/// Entries after `after`, oldest first, `limit` to a page: `GET /audit`'s answer, for the API
/// and the console alike.
pub(crate) async fn entries_page(
    state: &AppState,
    after: u64,
    limit: u32,
) -> Result<wire::Page<wire::AuditEntry>, HttpError> {
    let rows = state.store.audit_entries(after, limit + 1).await?;
    let (rows, next_cursor) = page(rows, limit, |e| e.seq.to_string());
    Ok(wire::Page {
        data: rows.into_iter().map(view).collect(),
        next_cursor,
    })
}

/// Checks every link, a page at a time, and names the first broken one.
#[utoipa::path(
    get,
    path = "/audit/verify",
    tag = "audit",
    operation_id = "verify_audit_log",
    responses(
        (status = 200, description = "Whether the chain holds; if not, its first broken link.", body = wire::AuditVerification),
        (status = 403, response = openapi::Status403),
    ),
    security(("admin_token" = [])),
)]
async fn verify(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<wire::AuditVerification>, HttpError> {
    caller.require_admin()?;
    Ok(Json(verify_chain(&state).await?))
}

/// Checks the whole chain: `GET /audit/verify`'s answer, for the API and the console alike.
pub(crate) async fn verify_chain(state: &AppState) -> Result<wire::AuditVerification, HttpError> {
    const PAGE: u32 = 1000;
    // Read the head first: entries appended while this runs lie beyond it and are not judged.
    let head = state.store.audit_head().await?;
    let mut checker = Checker::default();
    let mut after = 0;
    let mut checked = 0;
    let broken = 'walk: loop {
        let entries = state.store.audit_entries(after, PAGE).await?;
        let Some(last) = entries.last() else {
            break 'walk checker.finish(head).err();
        };
        after = last.seq;
        for entry in &entries {
            if head.is_some_and(|(seq, _)| entry.seq > seq) {
                break 'walk checker.finish(head).err();
            }
            if let Err(broken) = checker.check(entry) {
                break 'walk Some(broken);
            }
            checked += 1;
        }
    };
    Ok(wire::AuditVerification {
        valid: broken.is_none(),
        entries: checked,
        broken_at: broken.as_ref().map(|b| b.seq),
        reason: broken.map(|b| b.reason),
        head_hash: head.map(|(_, hash)| hex(&hash)),
    })
}
