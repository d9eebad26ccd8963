// The HTTP side of the page: OpenAI error bodies as one readable line, and the `data:` payloads of a server-sent
// event stream read from a fetch body.

// An error body in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) as one readable line.
export async function describeError(response) {
  let detail = "";
  try {
    const body = await response.json();
    const e = body.error || body;
    detail = [e.type, e.code].filter(Boolean).join(", ");
    detail = `${detail ? `${detail}: ` : ""}${e.message ?? JSON.stringify(body)}`;
  } catch {
    detail = response.statusText || "no details";
  }
  const hint = response.status === 401 ? " (enter the server's API key in Settings)"
    : response.status === 429 ? " (the server's queue is full; try again in a moment)" : "";
  return `Error ${response.status}: ${detail}${hint}`;
}

// Yields each `data:` payload of a server-sent event stream.
export async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line.startsWith("data:")) yield line.slice(5).trim();
    }
  }
}
