//! The usage page: spend, requests and tokens per local hour or day of the reporting time zone,
//! split by model, key or route, as charts and as the table they are drawn from. The table's
//! rows add up to its total row, which is the range's total; a bucket the log holds no data for
//! (before retention, or still to come) shows as missing, not as zero.

use crate::console::render::page;
use crate::console::report::{self, day_start, fold, Bucket, Step};
use crate::console::session::holder_account;
use crate::http::error::HttpError;
use crate::state::AppState;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeSet;
use tollgate_core::{AccountId, Nanos};
use tollgate_store::{SeriesSplit, UsageBucket};
use tollgate_wire::api::Money;

/// The longest range the page charts by the hour (31 days, 744 buckets).
const MOST_HOURLY_DAYS: i64 = 31;
/// The longest range it charts at all.
const MOST_DAYS: i64 = 400;

#[derive(Deserialize, Default)]
pub struct UsageForm {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    by: String,
}

/// One row of the page's table: a bucket's totals over every series.
pub struct Row {
    pub label: String,
    pub known: bool,
    pub requests: u64,
    pub tokens: u64,
    pub spend: Money,
}

/// One series' totals over the range.
pub struct SeriesRow {
    pub name: String,
    pub requests: u64,
    pub tokens: u64,
    pub spend: Money,
}

#[derive(Template)]
#[template(path = "console/usage.html")]
struct UsagePage<'a> {
    from: &'a str,
    to: &'a str,
    step: &'a str,
    by: &'a str,
    zone: &'a str,
    rows: &'a [Row],
    series: &'a [SeriesRow],
    total: Option<SeriesRow>,
    chart: String,
    problem: Option<&'a str>,
}

impl UsagePage<'_> {
    /// Whether the page is split by `option` (the total when the form names none).
    fn split_by(&self, option: &str) -> bool {
        self.by == option || (self.by.is_empty() && option == "total")
    }
}

/// A chart over `buckets`: the data `console.js` hands to uPlot, one line per series and
/// `null` where a bucket is not known.
pub fn chart_data(buckets: &[Bucket], names: &[String], zone: &str) -> String {
    let metric = |pick: &dyn Fn(&UsageBucket) -> serde_json::Value| -> Vec<serde_json::Value> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let points: Vec<serde_json::Value> = buckets
                    .iter()
                    .map(|b| {
                        b.totals
                            .as_ref()
                            .map_or(serde_json::Value::Null, |t| pick(&t[i]))
                    })
                    .collect();
                json!({ "name": if name.is_empty() { "all" } else { name }, "points": points })
            })
            .collect()
    };
    json!({
        "zone": zone,
        "labels": buckets.iter().map(|b| b.label.clone()).collect::<Vec<_>>(),
        "charts": [
            { "title": "Spend", "series": metric(&|t| json!(t.cost.0 as f64 / 1e9)) },
            { "title": "Requests", "series": metric(&|t| json!(t.requests)) },
            { "title": "Tokens", "series": metric(&|t| json!(tokens(t))) },
        ],
    })
    .to_string()
}

fn tokens(t: &UsageBucket) -> u64 {
    t.input_tokens + t.output_tokens
}

/// The usage of `account` over `[from, to)` in local `step`s, split by `split`: the buckets and
/// the series' names, in order.
pub async fn usage_buckets(
    state: &AppState,
    account: AccountId,
    step: Step,
    split: SeriesSplit,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
) -> Result<(Vec<Bucket>, Vec<String>), HttpError> {
    state.ledger.flush().await?;
    let slots = state.store.usage_series(account, split, from, to).await?;
    let names: Vec<String> = match split {
        SeriesSplit::Total => vec![String::new()],
        _ => slots
            .iter()
            .map(|s| s.totals.group.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let now = state.clock.now();
    let retention = TimeDelta::from_std(state.config.usage_retention).unwrap_or(TimeDelta::MAX);
    let known_from = now.checked_sub_signed(retention).unwrap_or(from);
    let tz = state.config.console.time_zone;
    let buckets = fold(tz, step, (from, to), (known_from, now), &names, &slots);
    Ok((buckets, names))
}

fn money(state: &AppState, nanos: Nanos) -> Money {
    Money::new(nanos, &state.config.currency)
}

pub async fn show(
    State(state): State<AppState>,
    query: Result<Query<UsageForm>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let account = match holder_account(&state, &headers).await {
        Ok(account) => account,
        Err(answer) => return answer,
    };
    let form = query.map(|Query(f)| f).unwrap_or_default();
    let tz = state.config.console.time_zone;
    let today = state.clock.now().with_timezone(&tz).date_naive();
    let date = |text: &str, default: NaiveDate| match text.trim() {
        "" => Ok(default),
        text => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map_err(|_| format!("'{text}' is not a date, e.g. {today}")),
    };
    let step = match form.step.trim() {
        "" => Ok(Step::Day),
        text => Step::parse(text).ok_or_else(|| "The step is hour or day.".to_string()),
    };
    let split = match form.by.trim() {
        "" | "total" => Ok(SeriesSplit::Total),
        "model" => Ok(SeriesSplit::Model),
        "key" => Ok(SeriesSplit::Key),
        "route" => Ok(SeriesSplit::Route),
        _ => Err("Split by total, model, key or route.".to_string()),
    };
    let to = date(&form.to, today);
    let from = to
        .clone()
        .and_then(|to| date(&form.from, to - TimeDelta::days(29)));
    let checked = (|| {
        let (from, to, step, split) = (from?, to?, step?, split?);
        let days = (to - from).num_days() + 1;
        if days < 1 {
            return Err("The range ends before it starts.".to_string());
        }
        if days > MOST_DAYS || (step == Step::Hour && days > MOST_HOURLY_DAYS) {
            return Err(format!(
                "Chart at most {MOST_HOURLY_DAYS} days by the hour, {MOST_DAYS} by the day."
            ));
        }
        Ok((from, to, step, split))
    })();
    let render = |status, rows: &[Row], series: &[SeriesRow], total, chart, problem| {
        page(
            status,
            &UsagePage {
                from: &form.from,
                to: &form.to,
                step: &form.step,
                by: &form.by,
                zone: tz.name(),
                rows,
                series,
                total,
                chart,
                problem,
            },
        )
    };
    let (from, to, step, split) = match checked {
        Ok(checked) => checked,
        Err(problem) => {
            return render(
                StatusCode::BAD_REQUEST,
                &[],
                &[],
                None,
                String::new(),
                Some(&problem),
            )
        }
    };
    let range = (day_start(tz, from), day_start(tz, to + TimeDelta::days(1)));
    let (buckets, names) = match usage_buckets(&state, account, step, split, range).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let zone = report::zone_caption(tz, range.0);
    let mut per_series: Vec<UsageBucket> = names.iter().map(|name| report::zero(name)).collect();
    let rows: Vec<Row> = buckets
        .iter()
        .map(|bucket| {
            let mut sum = report::zero("");
            for (i, t) in bucket.totals.iter().flatten().enumerate() {
                report::add(&mut per_series[i], t);
                report::add(&mut sum, t);
            }
            Row {
                label: bucket.label.clone(),
                known: bucket.totals.is_some(),
                requests: sum.requests,
                tokens: tokens(&sum),
                spend: money(&state, sum.cost),
            }
        })
        .collect();
    let mut grand = report::zero("");
    for s in &per_series {
        report::add(&mut grand, s);
    }
    let series: Vec<SeriesRow> = per_series
        .iter()
        .map(|s| SeriesRow {
            name: if s.group.is_empty() {
                "all".into()
            } else {
                s.group.clone()
            },
            requests: s.requests,
            tokens: tokens(s),
            spend: money(&state, s.cost),
        })
        .collect();
    let total = SeriesRow {
        name: "Total".into(),
        requests: grand.requests,
        tokens: tokens(&grand),
        spend: money(&state, grand.cost),
    };
    let chart = chart_data(&buckets, &names, &zone);
    render(StatusCode::OK, &rows, &series, Some(total), chart, None)
}
