//! The SSE usage reader: any bytes an upstream streams, cut into any chunks, never panic the
//! meter, and the usage it reads does not depend on where the network cut the stream.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tollgate_core::metering::{LlmApi, StreamMeter};

#[derive(Debug, Arbitrary)]
struct Input {
    anthropic: bool,
    /// Where the stream is cut, as offsets into `stream`.
    cuts: Vec<u16>,
    stream: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let api = if input.anthropic {
        LlmApi::Anthropic
    } else {
        LlmApi::OpenAi
    };
    let mut whole = StreamMeter::new(api);
    whole.feed(&input.stream);

    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|&c| usize::from(c).min(input.stream.len()))
        .collect();
    cuts.sort_unstable();
    let mut chunked = StreamMeter::new(api);
    let mut start = 0;
    for cut in cuts.into_iter().chain([input.stream.len()]) {
        chunked.feed(&input.stream[start..cut]);
        start = cut;
    }

    assert_eq!(whole.usage(), chunked.usage());
    assert_eq!(whole.estimate(100), chunked.estimate(100));
});
