//! For tests (feature `testing`): a PostgreSQL schema of a test's own, on the test server.
//! Test support, never built into the binary: a setup failure stops the test loudly.

#![allow(clippy::panic)]

/// The test server: `TOLLGATE_TEST_POSTGRES_URL`, else the local one.
pub fn postgres_url() -> String {
    std::env::var("TOLLGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A fresh schema, dropped (with everything in it) when this is dropped.
pub struct TestSchema {
    name: String,
    url: String,
}

impl TestSchema {
    /// Creates a schema on the test server. `None` when the server cannot be reached, which is
    /// an error under `CI=true`: there the server is part of the machine.
    pub async fn create() -> Option<TestSchema> {
        let server = postgres_url();
        let admin = match sqlx::PgPool::connect(&server).await {
            Ok(admin) => admin,
            Err(e) => {
                let message = format!("PostgreSQL is not reachable at {server}: {e}");
                assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
                eprintln!("SKIPPED (needs PostgreSQL): {message}");
                return None;
            }
        };
        let name = format!("test_{}", ulid::Ulid::new().to_string().to_lowercase());
        let created = sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&admin)
            .await;
        admin.close().await;
        if let Err(e) = created {
            panic!("cannot create schema {name}: {e}");
        }
        let separator = if server.contains('?') { '&' } else { '?' };
        let url = format!("{server}{separator}options=-c%20search_path%3D{name}");
        Some(TestSchema { name, url })
    }

    /// A database URL whose connections use only this schema.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime, which cannot be blocked on; use a thread's own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let admin = sqlx::PgPool::connect(&postgres_url()).await.ok()?;
                // A session still holding a lock in the schema must not hang the test run.
                let mut tx = admin.begin().await.ok()?;
                sqlx::query("SET LOCAL lock_timeout = '15s'")
                    .execute(&mut *tx)
                    .await
                    .ok()?;
                sqlx::query(&format!("DROP SCHEMA {name} CASCADE"))
                    .execute(&mut *tx)
                    .await
                    .ok()?;
                tx.commit().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}
