//! The LLM request reader: any body a client sends is refused with an error or read into a
//! request whose forwarded body, read again, asks for the same model and output cap (so the
//! upstream can never be asked for more than the hold covers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use tollgate_core::metering::Endpoint;
use tollgate_core::pricing::TokenPrices;
use tollgate_core::Nanos;
use tollgate_server::dataplane::proxy::parse_llm_request;

const ENDPOINTS: [Endpoint; 6] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Messages,
    Endpoint::CountTokens,
];

fuzz_target!(|input: (u8, &[u8])| {
    let (which, body) = input;
    let endpoint = ENDPOINTS[usize::from(which) % ENDPOINTS.len()];
    let prices = TokenPrices {
        input: Nanos(500),
        output: Nanos(1500),
        cached_input: Nanos(50),
    };
    let models = BTreeMap::from([("m".to_string(), prices)]);
    let Ok((model, request)) = parse_llm_request(endpoint, &models, body, 256) else {
        return;
    };
    assert_eq!(model, "m");
    let (again_model, again) = parse_llm_request(endpoint, &models, &request.body, 256)
        .expect("the forwarded body is read again");
    assert_eq!(again_model, model);
    assert_eq!(again.max_tokens, request.max_tokens);
    assert_eq!(again.body, request.body);
});
