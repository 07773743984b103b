//! Reading usage from what an LLM upstream answers: its JSON response, or its SSE stream fed
//! chunk by chunk as it passes through.
//!
//! The SSE reader is hand-written because it must be fed bytes as the proxy forwards them (no
//! stream of its own), keep a bounded buffer, and look only at `data:` lines: a few dozen lines
//! that no SSE crate offers in that shape.

use serde::Serialize;
use serde_json::Value;

/// Tokens an upstream reports. `input` excludes tokens read from the prompt cache, which are
/// counted in `cached_input` and priced apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TokenUsage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

fn count(value: Option<&Value>) -> u64 {
    value.and_then(Value::as_u64).unwrap_or(0)
}

/// Which provider's API shape an LLM route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmApi {
    OpenAi,
    Anthropic,
}

/// An endpoint an LLM route knows how to meter. Every POST under an LLM route must be one of
/// these to be metered; the route's config decides what happens to any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI `POST …/chat/completions`: usage in the JSON, or in the stream's usage chunk.
    ChatCompletions,
    /// OpenAI `POST …/completions` (legacy): the same usage shape as chat completions.
    Completions,
    /// OpenAI `POST …/embeddings`: input tokens only.
    Embeddings,
    /// OpenAI `POST …/responses`: usage in the JSON, or in the stream's `response.completed`,
    /// `response.incomplete` or `response.failed` event.
    Responses,
    /// Anthropic `POST …/messages`: usage in the JSON, or in `message_start` and `message_delta`.
    Messages,
    /// Anthropic `POST …/messages/count_tokens`: free.
    CountTokens,
}

/// Each API's metered endpoints, by the path suffix that names them; longest suffixes first, so
/// `/chat/completions` is not read as `/completions`.
const ENDPOINTS: [(LlmApi, &str, Endpoint); 6] = [
    (
        LlmApi::OpenAi,
        "/chat/completions",
        Endpoint::ChatCompletions,
    ),
    (LlmApi::OpenAi, "/completions", Endpoint::Completions),
    (LlmApi::OpenAi, "/embeddings", Endpoint::Embeddings),
    (LlmApi::OpenAi, "/responses", Endpoint::Responses),
    (
        LlmApi::Anthropic,
        "/messages/count_tokens",
        Endpoint::CountTokens,
    ),
    (LlmApi::Anthropic, "/messages", Endpoint::Messages),
];

impl LlmApi {
    /// The metered endpoint a POST to `path` (the part after the route's prefix) calls, if it is
    /// one. A path with empty, `.` or `..` segments is never one: an upstream may normalise it
    /// into an endpoint other than the one its suffix names.
    pub fn endpoint(self, path: &str) -> Option<Endpoint> {
        let mut segments = path.split('/').skip(1);
        if segments.any(|s| s.is_empty() || s == "." || s == "..") {
            return None;
        }
        ENDPOINTS
            .iter()
            .find(|(api, suffix, _)| *api == self && path.ends_with(suffix))
            .map(|(_, _, endpoint)| *endpoint)
    }

    /// The path suffixes of its metered endpoints, for messages.
    pub fn endpoints(self) -> Vec<&'static str> {
        ENDPOINTS
            .iter()
            .filter(|(api, ..)| *api == self)
            .map(|(_, suffix, _)| *suffix)
            .collect()
    }

    /// The usage in a complete (non-streamed) JSON response, if it reports one.
    pub fn usage_from_json(self, body: &Value) -> Option<TokenUsage> {
        self.usage_from_object(body.get("usage")?)
    }

    /// The usage a response's `usage` member reports, if it is an object.
    pub fn usage_from_object(self, usage: &Value) -> Option<TokenUsage> {
        if !usage.is_object() {
            return None;
        }
        Some(match self {
            LlmApi::OpenAi => openai_usage(usage),
            LlmApi::Anthropic => anthropic_usage(usage).total(),
        })
    }

    /// How many characters of generated text a complete JSON response holds, to estimate its
    /// output when it reports no usage.
    pub fn output_chars(self, body: &Value) -> u64 {
        match self {
            LlmApi::OpenAi => {
                // Chat completions' and completions' choices; the Responses API's output items.
                let choices = items(body, "choices")
                    .map(|c| text_len(c.pointer("/message/content")) + text_len(c.get("text")));
                let outputs = items(body, "output")
                    .flat_map(|item| items(item, "content"))
                    .map(|part| text_len(part.get("text")));
                choices.chain(outputs).sum()
            }
            LlmApi::Anthropic => items(body, "content")
                .map(|part| text_len(part.get("text")))
                .sum(),
        }
    }
}

impl Endpoint {
    pub fn api(self) -> LlmApi {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => LlmApi::Anthropic,
            _ => LlmApi::OpenAi,
        }
    }

    /// Whether calls to it cost nothing (they generate nothing).
    pub fn is_free(self) -> bool {
        self == Endpoint::CountTokens
    }

    /// Whether it generates output, so its hold covers `max_tokens` of it.
    pub fn generates(self) -> bool {
        !matches!(self, Endpoint::Embeddings | Endpoint::CountTokens)
    }

    /// The body fields that cap its output, the one Tollgate writes first.
    pub fn max_tokens_fields(self) -> &'static [&'static str] {
        match self {
            Endpoint::ChatCompletions => &["max_completion_tokens", "max_tokens"],
            Endpoint::Completions | Endpoint::Messages => &["max_tokens"],
            Endpoint::Responses => &["max_output_tokens"],
            Endpoint::Embeddings | Endpoint::CountTokens => &[],
        }
    }

    /// The body fields that ask for several outputs, each up to the output cap.
    pub fn choice_fields(self) -> &'static [&'static str] {
        match self {
            Endpoint::ChatCompletions => &["n"],
            Endpoint::Completions => &["n", "best_of"],
            _ => &[],
        }
    }

    /// Whether a stream needs `stream_options.include_usage` to report usage at all.
    pub fn needs_usage_option(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count tokens",
        }
    }
}

/// Anthropic counts cache writes apart from input (charged as input) and cache reads apart too.
/// Each count is kept apart, since a stream's `message_delta` may update some and not others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AnthropicUsage {
    input: u64,
    cache_writes: u64,
    cache_reads: u64,
    output: u64,
}

impl AnthropicUsage {
    /// Updates the counts `usage` carries, keeping the others.
    fn update(&mut self, usage: &Value) {
        let field = |name: &str| usage.get(name).and_then(Value::as_u64);
        if let Some(n) = field("input_tokens") {
            self.input = n;
        }
        if let Some(n) = field("cache_creation_input_tokens") {
            self.cache_writes = n;
        }
        if let Some(n) = field("cache_read_input_tokens") {
            self.cache_reads = n;
        }
        if let Some(n) = field("output_tokens") {
            self.output = n;
        }
    }

    fn total(self) -> TokenUsage {
        TokenUsage {
            input: self.input.saturating_add(self.cache_writes),
            cached_input: self.cache_reads,
            output: self.output,
        }
    }
}

fn anthropic_usage(usage: &Value) -> AnthropicUsage {
    let mut counts = AnthropicUsage::default();
    counts.update(usage);
    counts
}

/// OpenAI counts cached tokens inside the input. Chat completions, completions and embeddings
/// say `prompt_tokens` / `completion_tokens`; the Responses API says `input_tokens` /
/// `output_tokens`. Both shapes are read, whichever endpoint answered, so no path trick can
/// make the meter read the wrong one.
fn openai_usage(usage: &Value) -> TokenUsage {
    let either = |a: &str, b: &str| count(usage.get(a)).max(count(usage.get(b)));
    let prompt = either("prompt_tokens", "input_tokens");
    let cached = count(usage.pointer("/prompt_tokens_details/cached_tokens"))
        .max(count(usage.pointer("/input_tokens_details/cached_tokens")))
        .min(prompt);
    TokenUsage {
        input: prompt - cached,
        cached_input: cached,
        output: either("completion_tokens", "output_tokens"),
    }
}

/// Lines longer than this are skipped rather than buffered without bound.
const MAX_LINE_BYTES: usize = 1 << 20;

/// Reads usage from an SSE stream fed in arbitrary chunks.
#[derive(Debug)]
pub struct StreamMeter {
    api: LlmApi,
    line: Vec<u8>,
    line_too_long: bool,
    data: String,
    usage: TokenUsage,
    /// Anthropic's counts as `message_start` and `message_delta` left them.
    anthropic: AnthropicUsage,
    /// Whether the stream has reported its input (Anthropic's `message_start`).
    input_reported: bool,
    /// The event that carries the final usage has been seen (OpenAI's usage chunk or final
    /// response event, Anthropic's `message_delta`).
    usage_final: bool,
    output_chars: u64,
}

impl StreamMeter {
    pub fn new(api: LlmApi) -> StreamMeter {
        StreamMeter {
            api,
            line: Vec::new(),
            line_too_long: false,
            data: String::new(),
            usage: TokenUsage::default(),
            anthropic: AnthropicUsage::default(),
            input_reported: false,
            usage_final: false,
            output_chars: 0,
        }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            self.push_line_bytes(&chunk[..end]);
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if !std::mem::take(&mut self.line_too_long) {
                self.line_done(&line);
            }
            line.clear();
            self.line = line;
            chunk = &chunk[end + 1..];
        }
        self.push_line_bytes(chunk);
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            self.line_too_long = true;
            self.line.clear();
        } else if !self.line_too_long {
            self.line.extend_from_slice(bytes);
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        if line.is_empty() {
            let data = std::mem::take(&mut self.data);
            if !data.is_empty() {
                self.event(&data);
            }
        } else if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
        }
    }

    fn event(&mut self, data: &str) {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return; // `[DONE]` and anything else that is not JSON
        };
        match self.api {
            LlmApi::OpenAi => {
                // Chat completions and completions: a chunk with a `usage` object.
                if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                    self.usage = openai_usage(usage);
                    self.usage_final = true;
                }
                if let Some(choices) = event.get("choices").and_then(Value::as_array) {
                    for choice in choices {
                        self.output_chars += text_len(choice.pointer("/delta/content"));
                        self.output_chars += text_len(choice.get("text"));
                    }
                }
                // The Responses API: the final event carries the whole response.
                match event.get("type").and_then(Value::as_str) {
                    Some("response.completed" | "response.incomplete" | "response.failed") => {
                        if let Some(usage) =
                            event.pointer("/response/usage").filter(|u| u.is_object())
                        {
                            self.usage = openai_usage(usage);
                            self.usage_final = true;
                        }
                    }
                    Some("response.output_text.delta") => {
                        self.output_chars += text_len(event.get("delta"));
                    }
                    _ => {}
                }
            }
            LlmApi::Anthropic => match event.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    if let Some(usage) = event.pointer("/message/usage").filter(|u| u.is_object()) {
                        self.anthropic.update(usage);
                        self.input_reported = true;
                        self.usage = self.anthropic.total();
                    }
                }
                Some("message_delta") => {
                    if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                        // Counts here are cumulative and replace those of `message_start`
                        // they name; the others stand.
                        self.anthropic.update(usage);
                        self.usage = self.anthropic.total();
                        self.usage_final = true;
                    }
                }
                Some("content_block_delta") => {
                    self.output_chars += text_len(event.pointer("/delta/text"));
                }
                _ => {}
            },
        }
    }

    /// The usage the upstream reported, once its final usage event has passed.
    pub fn usage(&self) -> Option<TokenUsage> {
        self.usage_final.then_some(self.usage)
    }

    /// What can be told without a final usage event: input as reported or else
    /// `input_estimate` (from the request), output as reported or estimated at four characters
    /// per token from the text that passed, whichever is more.
    pub fn estimate(&self, input_estimate: u64) -> TokenUsage {
        TokenUsage {
            input: if self.input_reported {
                self.usage.input
            } else {
                input_estimate
            },
            cached_input: self.usage.cached_input,
            output: self.usage.output.max(self.output_chars.div_ceil(4)),
        }
    }
}

/// The elements of the array `field` of `value`; none if it is not an array.
fn items<'a>(value: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn text_len(value: Option<&Value>) -> u64 {
    value
        .and_then(Value::as_str)
        .map_or(0, |s| s.chars().count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_openai_and_anthropic_json_usage() {
        let openai = json!({"usage": {"prompt_tokens": 100, "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 30}}});
        assert_eq!(
            LlmApi::OpenAi.usage_from_json(&openai),
            Some(TokenUsage {
                input: 70,
                cached_input: 30,
                output: 20
            })
        );
        let anthropic = json!({"usage": {"input_tokens": 10, "output_tokens": 5,
            "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3}});
        assert_eq!(
            LlmApi::Anthropic.usage_from_json(&anthropic),
            Some(TokenUsage {
                input: 13,
                cached_input: 7,
                output: 5
            })
        );
        assert_eq!(LlmApi::OpenAi.usage_from_json(&json!({"id": "x"})), None);
    }

    /// Feeds `text` one byte at a time, the worst split a network can make.
    fn feed_bytewise(meter: &mut StreamMeter, text: &str) {
        for b in text.as_bytes() {
            meter.feed(std::slice::from_ref(b));
        }
    }

    #[test]
    fn reads_the_openai_usage_chunk_across_any_split() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\r\n\r\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
                      data: [DONE]\n\n";
        let mut meter = StreamMeter::new(LlmApi::OpenAi);
        feed_bytewise(&mut meter, &stream[..60]);
        assert_eq!(meter.usage(), None);
        assert_eq!(meter.estimate(0).output, 3, "11 characters seen so far");
        feed_bytewise(&mut meter, &stream[60..]);
        assert_eq!(
            meter.usage(),
            Some(TokenUsage {
                input: 9,
                cached_input: 0,
                output: 2
            })
        );
    }

    #[test]
    fn reads_anthropic_start_and_delta_events() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n\
                      event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"abcdefgh\"}}\n\n";
        let mut meter = StreamMeter::new(LlmApi::Anthropic);
        meter.feed(stream.as_bytes());
        assert_eq!(meter.usage(), None, "no message_delta yet");
        assert_eq!(
            meter.estimate(99),
            TokenUsage {
                input: 12,
                cached_input: 0,
                output: 2
            }
        );
        meter.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":0}}\n\n");
        assert_eq!(
            meter.usage(),
            Some(TokenUsage {
                input: 12,
                cached_input: 0,
                output: 0
            }),
            "an explicit zero is zero"
        );
    }

    #[test]
    fn skips_overlong_lines_and_keeps_going() {
        let mut meter = StreamMeter::new(LlmApi::OpenAi);
        meter.feed(b"data: ");
        meter.feed(&vec![b'x'; MAX_LINE_BYTES + 10]);
        meter.feed(b"\n\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n");
        assert_eq!(meter.usage().map(|u| u.output), Some(1));
    }

    #[test]
    fn each_api_meters_its_own_endpoints_and_nothing_else() {
        let openai = |p| LlmApi::OpenAi.endpoint(p);
        assert_eq!(openai("/chat/completions"), Some(Endpoint::ChatCompletions));
        assert_eq!(
            openai("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(openai("/completions"), Some(Endpoint::Completions));
        assert_eq!(openai("/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(openai("/v1/responses"), Some(Endpoint::Responses));
        assert_eq!(openai("/v1/messages"), None, "an Anthropic endpoint");
        assert_eq!(openai("/v1/images/generations"), None);
        assert_eq!(openai("/v1/responses/resp_1/cancel"), None);
        // Paths an upstream could normalise into another endpoint are never metered as one.
        assert_eq!(openai("/v1/chat/completions/"), None);
        assert_eq!(openai("/v1/embeddings/../chat/completions"), None);
        assert_eq!(openai("/v1//chat/completions"), None);
        assert_eq!(openai("/v1/./responses"), None);
        let anthropic = |p| LlmApi::Anthropic.endpoint(p);
        assert_eq!(anthropic("/v1/messages"), Some(Endpoint::Messages));
        assert_eq!(
            anthropic("/v1/messages/count_tokens"),
            Some(Endpoint::CountTokens)
        );
        assert_eq!(anthropic("/v1/messages/batches"), None);
        assert_eq!(anthropic("/v1/chat/completions"), None);
        assert!(Endpoint::CountTokens.is_free());
        assert!(!Endpoint::Embeddings.generates());
    }

    #[test]
    fn reads_the_responses_api_usage_in_json_and_in_each_final_event() {
        let body = json!({"object": "response", "output": [{"type": "message",
            "content": [{"type": "output_text", "text": "abcdefgh"}]}],
            "usage": {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 10},
                "output_tokens": 7, "total_tokens": 47}});
        let expected = TokenUsage {
            input: 30,
            cached_input: 10,
            output: 7,
        };
        assert_eq!(LlmApi::OpenAi.usage_from_json(&body), Some(expected));
        assert_eq!(LlmApi::OpenAi.output_chars(&body), 8);
        for last in [
            "response.completed",
            "response.incomplete",
            "response.failed",
        ] {
            let mut meter = StreamMeter::new(LlmApi::OpenAi);
            meter.feed(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"abcdefgh\"}\n\n");
            assert_eq!(meter.usage(), None);
            assert_eq!(meter.estimate(5).output, 2);
            let event = json!({"type": last, "response": {"usage": body["usage"]}});
            meter.feed(format!("event: {last}\ndata: {event}\n\n").as_bytes());
            assert_eq!(meter.usage(), Some(expected), "{last}");
        }
    }

    #[test]
    fn an_anthropic_delta_with_input_keeps_the_cache_writes_of_message_start() {
        let mut meter = StreamMeter::new(LlmApi::Anthropic);
        meter.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":500,\"cache_read_input_tokens\":20,\"output_tokens\":1}}}\n\n");
        meter.feed(b"data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":10,\"output_tokens\":30}}\n\n");
        assert_eq!(
            meter.usage(),
            Some(TokenUsage {
                input: 510,
                cached_input: 20,
                output: 30
            })
        );
    }

    #[test]
    fn a_stream_without_reported_input_is_estimated_from_the_request() {
        let mut meter = StreamMeter::new(LlmApi::OpenAi);
        meter.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\n\n");
        assert_eq!(
            meter.estimate(25),
            TokenUsage {
                input: 25,
                cached_input: 0,
                output: 1
            }
        );
    }
}
