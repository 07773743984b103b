//! The audit log end to end: every management change appended with who, what, before and after
//! and the request ID; no secret in it; the chain verifies, and a row edited, deleted or cut from
//! the end in the SQLite file is named by the verification.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{expect_error, spawn_app, TestApp, ADMIN_TOKEN};
use serde_json::{json, Value};

async fn entries(app: &TestApp) -> Vec<Value> {
    let page = app.get_json("/api/v1/audit?limit=500", ADMIN_TOKEN).await;
    page["data"].as_array().unwrap().clone()
}

async fn verification(app: &TestApp) -> Value {
    app.get_json("/api/v1/audit/verify", ADMIN_TOKEN).await
}

#[tokio::test]
async fn every_management_change_is_audited_and_the_chain_detects_tampering() {
    let app = spawn_app().await;
    let created = app
        .admin_post("/api/v1/accounts", json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    let create_request = created.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let created: Value = created.json().await.unwrap();
    let account = created["account"]["id"].as_str().unwrap().to_string();
    let master = created["master_key"]["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let master_id = created["master_key"]["id"].as_str().unwrap().to_string();
    let (usage, usage_id) = app.create_usage_key(&master, json!({"name": "ci"})).await;
    let patched = app
        .patch_key(&master, usage_id, json!({"name": "ci-2"}))
        .await;
    assert_eq!(patched.status(), 200);
    let rolled: Value = app
        .post(&format!("/api/v1/keys/{usage_id}/roll"))
        .bearer_auth(&master)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rolled_secret = rolled["secret"].as_str().unwrap().to_string();
    let revoke = app
        .post(&format!("/api/v1/keys/{usage_id}/revoke"))
        .bearer_auth(&master)
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let grant = app
        .admin_post(
            &format!("/api/v1/accounts/{account}/credits"),
            json!({"amount": "2.5", "reason": "goodwill"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), 200);
    for action in ["suspend", "reactivate"] {
        let response = app
            .post(&format!("/api/v1/accounts/{account}/{action}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let renamed = app
        .patch(&format!("/api/v1/accounts/{account}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "Acme Corp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200);
    // A refused change and a read leave no entry.
    let refused = app.patch_key(&master, usage_id, json!({"name": "x"})).await;
    assert_eq!(refused.status(), 409);
    app.get_json("/api/v1/keys", &master).await;

    let log = entries(&app).await;
    let actions: Vec<&str> = log.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "account.create",
            "key.create",
            "key.update",
            "key.roll",
            "key.revoke",
            "credits.grant",
            "account.suspend",
            "account.reactivate",
            "account.update",
        ]
    );
    let seqs: Vec<u64> = log.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
    assert_eq!(log[0]["actor"], "admin");
    assert_eq!(log[0]["request_id"], create_request);
    assert_eq!(log[0]["target"], account);
    assert_eq!(log[1]["actor"], master_id.as_str());
    assert_eq!(log[1]["target"], usage_id.to_string());
    assert_eq!(log[2]["before"]["name"], "ci");
    assert_eq!(log[2]["after"]["name"], "ci-2");
    assert_eq!(log[4]["after"]["status"], "revoked");
    assert_eq!(log[5]["after"]["amount"]["credits"], "2.5");
    assert_eq!(log[6]["before"]["status"], "active");
    assert_eq!(log[6]["after"]["status"], "suspended");
    assert_eq!(log[8]["after"]["name"], "Acme Corp");
    assert_eq!(log[1]["prev_hash"], log[0]["hash"]);
    let text = serde_json::to_string(&log).unwrap();
    for secret in [&master, &usage, &rolled_secret] {
        assert!(
            !text.contains(secret.as_str()),
            "a secret is in the audit log"
        );
    }

    // Only the operator reads it.
    expect_error(app.get_as("/api/v1/audit", &master).await, 403, "forbidden").await;
    let intact = verification(&app).await;
    assert_eq!(intact["valid"], true);
    assert_eq!(intact["entries"], 9);
    assert_eq!(intact["head_hash"], log[8]["hash"]);

    // One row edited by hand in the database file: named.
    app.tamper("UPDATE audit_log SET after = replace(after, '2.5', '25') WHERE seq = 6")
        .await;
    let broken = verification(&app).await;
    assert_eq!(broken["valid"], false);
    assert_eq!(broken["broken_at"], 6);
    assert!(broken["reason"].as_str().unwrap().contains("modified"));
    assert_eq!(broken["entries"], 5);
}

#[tokio::test]
async fn deleted_entries_are_named_wherever_they_were() {
    let app = spawn_app().await;
    for name in ["a", "b", "c", "d"] {
        app.create_account(name).await;
    }
    assert_eq!(verification(&app).await["valid"], true);
    app.tamper("DELETE FROM audit_log WHERE seq = 4").await;
    let cut = verification(&app).await;
    assert_eq!(
        (cut["valid"].clone(), cut["broken_at"].clone()),
        (json!(false), json!(4))
    );
    assert!(cut["reason"].as_str().unwrap().contains("deleted"));
    app.tamper("DELETE FROM audit_log WHERE seq = 2").await;
    let gap = verification(&app).await;
    assert_eq!(gap["broken_at"], 2);
    assert!(gap["reason"].as_str().unwrap().contains("missing"));
}
