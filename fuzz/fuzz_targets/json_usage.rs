//! The JSON usage reader: any JSON an upstream answers with is read without panicking, in both
//! APIs' shapes, and any usage it reports is what the meter charges (never more than was read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::metering::LlmApi;

fuzz_target!(|bytes: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    for api in [LlmApi::OpenAi, LlmApi::Anthropic] {
        let usage = api.usage_from_json(&body);
        assert!(usage.is_none() || body.get("usage").is_some_and(|u| u.is_object()));
        let _ = api.output_chars(&body);
    }
});
