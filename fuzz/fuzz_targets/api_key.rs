//! The API key parser: whatever is presented as a key, parsing never panics, and a key it
//! accepts is exactly the text presented, shows a prefix of itself, and parses again to the same
//! hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::key::ApiKey;

fuzz_target!(|text: &str| {
    let Ok(key) = ApiKey::parse(text) else {
        return;
    };
    assert_eq!(key.expose(), text);
    assert!(text.starts_with(key.display_prefix()));
    let again = ApiKey::parse(key.expose()).expect("an accepted key parses again");
    assert!(again.hash().ct_eq(&key.hash()));
});
