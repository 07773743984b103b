//! The per-request pieces of the data plane that BENCHMARKS.md's end-to-end figures add up, each
//! small enough to regress unnoticed there:
//!
//! - verifying an API key from the cache (parse, checksum, SHA-256, cache lookup), against
//!   SHA-256 of the same secret alone (the floor: every verification hashes);
//! - rendering an error envelope and serializing it, in the native and OpenAI profiles;
//! - reading usage from an OpenAI SSE stream (six events, the last with usage), against
//!   scanning the same bytes for newlines (the floor for any line-based reader).
//!
//! `cargo bench -p tollgate-server --bench hot_path`. The GCRA decision across policies is in
//! the `admission` bench.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::{Digest, Sha256};
use std::hint::black_box;
use std::sync::Arc;
use tollgate_core::metering::{LlmApi, StreamMeter};
use tollgate_core::{AccountId, ApiError, ApiKey, ErrorCode, KeyEnv, KeyKind, Nanos, RequestId};
use tollgate_server::access::keys::KeyCache;
use tollgate_store::sqlite::SqliteStore;
use tollgate_store::{KeyRecord, NewKey, Store};
use tollgate_wire::{render_error, ErrorProfile};

fn key_verify(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, secret) = runtime.block_on(async {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("b.db")).await.unwrap());
        let account = AccountId::new();
        let (secret, key) = KeyRecord::issue(
            KeyEnv::Live,
            NewKey::new(account, KeyKind::Master, "m"),
            Utc::now(),
        );
        store
            .create_account(account, "bench", Nanos(0), key, Utc::now())
            .await
            .unwrap();
        (store, secret.expose().to_string())
    });
    let cache = KeyCache::new(100_000);
    // The first lookup loads the key from the store; every one after is a hit.
    runtime
        .block_on(cache.get(&ApiKey::parse(&secret).unwrap().hash(), &*store))
        .unwrap()
        .unwrap();

    let mut group = c.benchmark_group("key_verify");
    group.bench_function("sha256_only", |b| {
        b.iter(|| black_box(Sha256::digest(black_box(secret.as_bytes()))))
    });
    group.bench_function("from_cache", |b| {
        b.to_async(&runtime).iter(|| async {
            let key = ApiKey::parse(black_box(&secret)).unwrap();
            black_box(cache.get(&key.hash(), &*store).await.unwrap())
        })
    });
    group.finish();
}

fn envelope(c: &mut Criterion) {
    let error = ApiError::new(
        ErrorCode::RateLimited,
        "Rate limit 'per-key' exceeded: 60 requests per 1m. Retry in 2 seconds.",
    )
    .with_detail("policy", "per-key");
    let request_id = RequestId::new();
    let mut group = c.benchmark_group("envelope_render");
    for profile in [ErrorProfile::Native, ErrorProfile::Openai] {
        group.bench_function(profile.as_str(), |b| {
            b.iter(|| {
                let rendered = render_error(profile, black_box(&error), &request_id);
                black_box(serde_json::to_vec(&rendered.body).unwrap())
            })
        });
    }
    group.finish();
}

/// An OpenAI chat stream as the mock sends it: five content chunks and a usage chunk.
fn openai_stream() -> Vec<u8> {
    let mut stream = String::new();
    for word in ["Hello", " there", ", how", " can I", " help?"] {
        stream.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    stream.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n");
    stream.push_str("data: [DONE]\n\n");
    stream.into_bytes()
}

fn sse_usage(c: &mut Criterion) {
    let stream = openai_stream();
    let mut group = c.benchmark_group("sse_usage_parse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("newline_scan_only", |b| {
        b.iter(|| black_box(black_box(&stream).iter().filter(|&&b| b == b'\n').count()))
    });
    group.bench_function("stream_meter", |b| {
        b.iter(|| {
            let mut meter = StreamMeter::new(LlmApi::OpenAi);
            // As it arrives from the network: in pieces that split events.
            for piece in black_box(&stream).chunks(256) {
                meter.feed(piece);
            }
            let usage = meter.usage().unwrap();
            assert_eq!(usage.output, 5);
            black_box(usage)
        })
    });
    group.finish();
}

criterion_group!(benches, key_verify, envelope, sse_usage);
criterion_main!(benches);
