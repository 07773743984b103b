//! Config parsing: any file text is either a config or a list of problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_server::config::Config;

fuzz_target!(|text: &str| {
    let _ = Config::load(text, std::iter::empty::<(&str, String)>());
});
