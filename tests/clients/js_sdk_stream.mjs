// The JavaScript SDK's stream reading (@archipelag/sdk 0.1.0, packages/sdk/src/client.ts,
// streamJob + parseStreamEvent), re-implemented step for step for the contract tests
// (decision 0050): fetch with Authorization and Accept: text/event-stream; for EACH network
// read, decode, split on "\n\n", keep only blocks starting with "data: ", JSON.parse the
// rest (a throw ends the stream with an error, as in the SDK); no buffering across reads.
// Usage: node js_sdk_stream.mjs URL KEY [LAST_EVENT_ID]  (the SDK itself never sends
// Last-Event-ID; the resume test adds it). Prints one JSON line per event, then "END".
const [url, key, lastId] = process.argv.slice(2);
const headers = { Authorization: `Bearer ${key}`, Accept: 'text/event-stream' };
if (lastId) headers['Last-Event-ID'] = lastId;
const response = await fetch(url, { headers });
if (!response.ok) { console.log(JSON.stringify({ http_error: response.status })); process.exit(0); }
const reader = response.body.getReader();
const decoder = new TextDecoder();
try {
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    const chunk = decoder.decode(value, { stream: true });
    for (const block of chunk.split('\n\n').filter(Boolean)) {
      if (block.startsWith('data: ')) {
        const parsed = JSON.parse(block.slice(6));
        console.log(JSON.stringify({
          type: parsed.type || 'token', content: parsed.content || parsed.chunk, step: parsed.step,
          total: parsed.total, imageData: parsed.image_data, imageFormat: parsed.format, error: parsed.error,
          usage: parsed.usage ? { promptTokens: parsed.usage.prompt_tokens,
            completionTokens: parsed.usage.completion_tokens, totalTokens: parsed.usage.total_tokens,
            creditsUsed: parsed.usage.credits_used || 0 } : undefined,
          id: parsed.id }));
      }
    }
  }
  console.log('END');
} catch (e) {
  console.log(JSON.stringify({ thrown: String(e) }));
}
