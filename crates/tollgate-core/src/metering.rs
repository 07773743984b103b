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

/// Which provider's API shape an LLM route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmApi {
    OpenAi,
    Anthropic,
}

fn count(value: Option<&Value>) -> u64 {
    value.and_then(Value::as_u64).unwrap_or(0)
}

impl LlmApi {
    /// The usage in a complete (non-streamed) JSON response, if it reports one.
    pub fn usage_from_json(self, body: &Value) -> Option<TokenUsage> {
        let usage = body.get("usage").filter(|u| u.is_object())?;
        Some(match self {
            LlmApi::OpenAi => openai_usage(usage),
            LlmApi::Anthropic => anthropic_usage(usage),
        })
    }
}

/// Anthropic counts cache writes apart from input (charged as input) and cache reads apart too.
fn anthropic_usage(usage: &Value) -> TokenUsage {
    TokenUsage {
        input: count(usage.get("input_tokens")) + count(usage.get("cache_creation_input_tokens")),
        cached_input: count(usage.get("cache_read_input_tokens")),
        output: count(usage.get("output_tokens")),
    }
}

/// OpenAI counts cached tokens inside `prompt_tokens`.
fn openai_usage(usage: &Value) -> TokenUsage {
    let prompt = count(usage.get("prompt_tokens"));
    let cached = count(usage.pointer("/prompt_tokens_details/cached_tokens")).min(prompt);
    TokenUsage {
        input: prompt - cached,
        cached_input: cached,
        output: count(usage.get("completion_tokens")),
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
    /// The event that carries the final usage has been seen (OpenAI's usage chunk, Anthropic's
    /// `message_delta`).
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
                if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                    self.usage = openai_usage(usage);
                    self.usage_final = true;
                }
                if let Some(choices) = event.get("choices").and_then(Value::as_array) {
                    for choice in choices {
                        self.output_chars += text_len(choice.pointer("/delta/content"));
                    }
                }
            }
            LlmApi::Anthropic => match event.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    if let Some(usage) = event.pointer("/message/usage").filter(|u| u.is_object()) {
                        self.usage = anthropic_usage(usage);
                    }
                }
                Some("message_delta") => {
                    if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                        // Counts here are cumulative; input appears only in newer versions.
                        if let Some(output) = usage.get("output_tokens").and_then(Value::as_u64) {
                            self.usage.output = output;
                        }
                        if let Some(input) = usage.get("input_tokens").and_then(Value::as_u64) {
                            self.usage.input =
                                input + count(usage.get("cache_creation_input_tokens"));
                        }
                        if let Some(cached) =
                            usage.get("cache_read_input_tokens").and_then(Value::as_u64)
                        {
                            self.usage.cached_input = cached;
                        }
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

    /// What can be told without a final usage event: input as far as reported, output
    /// estimated at four characters per token from the text that passed.
    pub fn estimate(&self) -> TokenUsage {
        TokenUsage {
            output: self.usage.output.max(self.output_chars.div_ceil(4)),
            ..self.usage
        }
    }
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
        assert_eq!(meter.estimate().output, 3, "11 characters seen so far");
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
            meter.estimate(),
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
}
