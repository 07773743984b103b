"""Drives a running `tollgate demo` with the official OpenAI and Anthropic SDKs, unchanged but for
the base URL and the key. Reads TOLLGATE_URL and TOLLGATE_DEMO_KEY; exits non-zero on any failure."""

import os

import anthropic
import openai

url, key = os.environ["TOLLGATE_URL"], os.environ["TOLLGATE_DEMO_KEY"]
prompt = [{"role": "user", "content": "Hello there, gateway!"}]

# OpenAI: JSON, a stream with its final usage chunk, and a typed error.
client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
raw = client.chat.completions.with_raw_response.create(model="mock-gpt", messages=prompt)
completion = raw.parse()
assert completion.choices[0].message.content.startswith("tok0"), completion
assert completion.usage.prompt_tokens == 6 and completion.usage.completion_tokens == 5, completion.usage
assert raw.headers["x-request-id"].startswith("req_"), raw.headers

chunks = list(
    client.chat.completions.create(
        model="mock-gpt", messages=prompt, stream=True, stream_options={"include_usage": True}
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "tok0 tok1 tok2 tok3 tok4 ", text
assert chunks[-1].usage.total_tokens == 11, chunks[-1]

# The Responses API, JSON and streamed, and embeddings: metered endpoints of the same route.
response = client.responses.create(model="mock-gpt", input="Hello there, gateway!")
assert response.output_text.startswith("tok0"), response
assert response.usage.input_tokens == 6 and response.usage.output_tokens == 5, response.usage
events = list(client.responses.create(model="mock-gpt", input="Hello there, gateway!", stream=True))
completed = [e for e in events if e.type == "response.completed"]
assert completed and completed[0].response.usage.output_tokens == 5, events[-1]
embedding = client.embeddings.create(model="mock-gpt", input="Hello there, gateway!")
assert embedding.usage.prompt_tokens == 6 and len(embedding.data[0].embedding) == 3, embedding

# The model list is the route's price table: the models this key can call.
assert [m.id for m in client.models.list()] == ["mock-gpt"], list(client.models.list())
assert client.models.retrieve("mock-gpt").id == "mock-gpt"
try:
    client.models.retrieve("gpt-unknown")
    raise AssertionError("an unknown model was found")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

try:
    openai.OpenAI(base_url=f"{url}/v1", api_key="tg_live_not_a_key", max_retries=0).models.list()
    raise AssertionError("a bad key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e
    assert e.request_id and e.request_id.startswith("req_"), e.request_id
print("openai ok")

# Anthropic: JSON, the event stream, and a typed error.
client = anthropic.Anthropic(base_url=f"{url}/anthropic", api_key=key, max_retries=0)
message = client.messages.create(model="mock-claude", max_tokens=16, messages=prompt)
assert message.content[0].text.startswith("tok0"), message
assert message.usage.input_tokens == 6 and message.usage.output_tokens == 5, message.usage

with client.messages.stream(model="mock-claude", max_tokens=16, messages=prompt) as stream:
    final = stream.get_final_message()
assert final.usage.output_tokens == 5, final.usage
assert [m.id for m in client.models.list()] == ["mock-claude"]
assert client.models.retrieve("mock-claude").id == "mock-claude"

try:
    anthropic.Anthropic(base_url=f"{url}/anthropic", api_key="tg_live_not_a_key", max_retries=0).messages.create(
        model="mock-claude", max_tokens=1, messages=prompt
    )
    raise AssertionError("a bad key was accepted")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401, e
    assert e.request_id and e.request_id.startswith("req_"), e.request_id
print("anthropic ok")
