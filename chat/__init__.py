"""The chat layer, between the HTTP server and the engine: how one model's chat format turns messages,
tools and reasoning settings into prompt text and grammars, and sampled text back into message parts
(reasoning, content, tool calls). Nothing here knows about HTTP."""
