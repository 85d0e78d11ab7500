"""``/tokenize`` and ``/detokenize``: the model's tokenizer (and chat format) as a service, in the shapes
llama.cpp's and vLLM's servers answer with (both key sets, so either kind of client reads its own)."""

from __future__ import annotations

from flaxchat.chat.errors import ChatError
from flaxchat.chat.protocol import DetokenizeRequest, TokenizeRequest
from flaxchat.chat.request import ServedModel, message_dicts


def tokenize(model: ServedModel, request: TokenizeRequest) -> dict:
    tokenizer = model.tokenizer
    if request.messages is not None:  # the prompt the chat endpoint would build (special tokens as written)
        text = model.format.render(message_dicts(request.messages), add_generation_prompt=request.add_generation_prompt)
        ids = tokenizer.encode(text)
    else:
        add_special = request.add_special if request.add_special is not None else request.add_special_tokens
        ids = tokenizer.encode(request.content if request.content is not None else request.prompt,
                               add_bos=tokenizer.special.add_bos if add_special is None else add_special)
    tokens = ([{"id": i, "piece": tokenizer.token_bytes(i).decode("utf-8", errors="replace")} for i in ids]
              if request.with_pieces else ids)
    return {"tokens": tokens, "count": len(ids), "max_model_len": model.engine.max_len}


def detokenize(model: ServedModel, request: DetokenizeRequest) -> dict:
    vocab = model.tokenizer.vocab_size
    bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ChatError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    text = model.tokenizer.decode(request.tokens)
    return {"content": text, "prompt": text}
