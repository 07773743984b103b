//! `tollgate audit verify` against a running `tollgate serve`: intact, then one audit row edited
//! by hand in the SQLite file, which it names; a wrong token is explained with the request ID.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{send_json, serve, write_config, BIN};
use serde_json::json;

const ADMIN: &str = "audit-test-admin-token";

async fn verify(url: &str, token: &str) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN)
        .args(["audit", "verify", "--url", url])
        .env("TOLLGATE_ADMIN_TOKEN", token)
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn audit_verify_names_a_row_edited_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let config = write_config(dir.path(), &db, "");
    let (_server, url) = serve(&config, ADMIN).await;
    let http = reqwest::Client::new();
    for name in ["acme", "globex", "initech"] {
        send_json(
            http.post(format!("{url}/api/v1/accounts"))
                .bearer_auth(ADMIN)
                .json(&json!({ "name": name })),
        )
        .await;
    }

    let (code, stdout, _) = verify(&url, ADMIN).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.starts_with("audit log intact: 3 entries, head "),
        "{stdout}"
    );

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE audit_log SET actor = 'key_someone_else' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (code, stdout, _) = verify(&url, ADMIN).await;
    assert_eq!(code, 1);
    assert!(
        stdout.starts_with("audit log BROKEN at entry 2: its contents do not match its hash"),
        "{stdout}"
    );

    let (code, _, stderr) = verify(&url, "not-the-admin-token").await;
    assert_eq!(code, 1);
    assert!(stderr.contains("401 invalid_api_key"), "{stderr}");
    assert!(stderr.contains("(request req_"), "{stderr}");
}
