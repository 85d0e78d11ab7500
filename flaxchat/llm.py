"""``flaxchat.LLM``: the offline API, for scripts and notebooks that never start a server.

The shape researchers know from vLLM (``LLM(model).chat(conversations, ...)``, ``generate(prompts, ...)``)
with the chat-completions names for every setting (``seed``, ``temperature``, ``max_tokens``, ``n``,
``logprobs``, ``response_format``, ``tools``, ...). Underneath it is the server's own path: the same
``launch`` (``flaxchat/launch.py``), request validation, template, engine and reply assembly
(``chat/request.py``, ``chat/reply.py``), so a request gives the same bits here and through HTTP. Thousands
of requests are kept in flight a few slots' worth at a time (continuous batching does the rest); results
come back in input order, each carrying what reproduces it (the request with its seed, the launch options,
the provenance parts), and can be written as JSONL for ``flaxchat replay``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flaxchat.chat.errors import ChatError
from flaxchat.chat.protocol import ChatCompletionRequest, CompletionRequest
from flaxchat.chat.reply import Reply
from flaxchat.chat.request import Prepared, ServedModel, prepare, prepare_completion, submit
from flaxchat.launch import LaunchOptions, launch

Message = dict[str, Any]


@dataclass(frozen=True)
class Choice:
    """One sampled continuation."""

    index: int
    text: str  # the reply's text (chat: the message's content; tool calls are in ``message``)
    token_ids: tuple[int, ...]  # every generated token, a final stop token included
    logprobs: tuple[dict, ...] | None  # OpenAI's entries (token, logprob, bytes, top_logprobs); None unless asked
    finish_reason: str
    message: dict | None = None  # chat: the assistant message as the server returns it


@dataclass(frozen=True)
class Result:
    """One input's answer, with what reproduces it: ``request`` (the body, its seed filled in) on a model
    launched with ``launch`` whose parts hash to ``provenance``."""

    index: int  # position in the input
    endpoint: str  # "chat" or "completion"
    request: dict
    prompt_token_ids: tuple[int, ...]
    choices: tuple[Choice, ...]
    model: str
    fingerprint: str
    provenance: dict[str, str]
    launch: dict[str, Any]
    usage: dict[str, int]

    @property
    def seed(self) -> int:
        return self.request["seed"]

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.choices[0].token_ids

    @property
    def logprobs(self) -> tuple[dict, ...] | None:
        return self.choices[0].logprobs

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        choices = tuple(Choice(**{**c, "token_ids": tuple(c["token_ids"]),
                                  "logprobs": None if c["logprobs"] is None else tuple(c["logprobs"])})
                        for c in data["choices"])
        return cls(**{**data, "choices": choices, "prompt_token_ids": tuple(data["prompt_token_ids"])})


@dataclass(frozen=True)
class Score:
    """The log-likelihood of a continuation after a prompt (the model's own distribution: no temperature,
    penalties or bias), as evaluation harnesses use it."""

    index: int
    prompt_token_ids: tuple[int, ...]
    continuation_token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]  # one per continuation token
    total: float  # their sum
    greedy: bool  # every continuation token was the most likely one
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_jsonl(items: Iterable[Result | Score], path: str | Path) -> Path:
    """One JSON object per line (``Result.from_dict`` reads a result back)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_results(path: str | Path) -> list[Result]:
    with Path(path).open(encoding="utf-8") as lines:
        return [Result.from_dict(json.loads(line)) for line in lines if line.strip()]


async def _collect(reply: Reply, chat: bool) -> tuple[Choice, ...]:
    """The reply's choices, gathered as the server's JSON renderer gathers them (``Reply.whole``)."""
    logprobs_on, choices = reply.prepared.params.logprobs, []
    for i, part in enumerate(await reply.whole()):
        message = reply.message(part.deltas) if chat else None
        text = (message.get("content") or "") if chat else "".join(d.get("content", "") for d in part.deltas)
        choices.append(Choice(i, text, tuple(part.token_ids), tuple(part.logprobs) if logprobs_on else None,
                              part.finish_reason or "error", message))
    return tuple(choices)


class LLM:
    """A model and its engine, for offline batches. ``LLM()`` is the default model (pulled if missing);
    ``model`` is a stored name, a local GGUF file or a Hugging Face folder (imported into the store).
    Keyword arguments are ``LaunchOptions`` (``slots``, ``max_len``, ``weights``, ``kv_dtype``, ...)."""

    def __init__(self, model: str | Path = "smollm2-135m-instruct", **options: Any):
        self.options = LaunchOptions(**options)
        self.served = launch(model, self.options)
        self._owned = True

    @classmethod
    def from_served(cls, served: ServedModel, options: LaunchOptions | None = None) -> "LLM":
        """An LLM over a model that is already running (e.g. the one a server answers with); it stays running
        after ``close``."""
        llm = cls.__new__(cls)
        llm.options, llm.served, llm._owned = options or LaunchOptions(), served, False
        return llm

    @property
    def id(self) -> str:
        return self.served.id

    @property
    def tokenizer(self):
        return self.served.tokenizer

    def close(self) -> None:
        if self._owned:
            self.served.engine.stop()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the three calls -------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Sequence[Message]], *, per_item: Sequence[dict] | None = None,
             progress: bool = True, **params: Any) -> list[Result]:
        """Answer each conversation (a list of chat messages) with the chat-completions ``params``; ``per_item``:
        settings for each conversation over those (e.g. a seed each: one seed for every item draws the same
        random numbers for each). A single conversation is accepted too; the answer is always a list, in
        input order."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        items = self._items(len(conversations), per_item)
        bodies = [self._body(params | item, messages=list(c)) for c, item in zip(conversations, items)]
        return self._answer("chat", bodies, progress)

    def generate(self, prompts: Sequence[str | Sequence[int]] | str, *, per_item: Sequence[dict] | None = None,
                 progress: bool = True, **params: Any) -> list[Result]:
        """Continue each prompt (text, or token ids) as it is, without a chat template (the legacy
        completions endpoint's settings; ``per_item`` as for ``chat``)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        items = self._items(len(prompts), per_item)
        bodies = [self._body(params | item, prompt=p if isinstance(p, str) else list(p)) for p, item in zip(prompts, items)]
        return self._answer("completion", bodies, progress)

    def rerun(self, results: Sequence[Result], *, progress: bool = True) -> list[Result]:
        """Each result's request again (its recorded seed included): the same bits when the provenance is
        unchanged (``flaxchat replay`` compares them)."""
        answers: list[Result | None] = [None] * len(results)
        for endpoint in ("chat", "completion"):
            positions = [i for i, r in enumerate(results) if r.endpoint == endpoint]
            if positions:
                fresh = self._answer(endpoint, [dict(results[i].request, model=self.id) for i in positions], progress)
                for i, result in zip(positions, fresh):
                    answers[i] = result
        return answers

    def score(self, prompts: Sequence[str | Sequence[int]], continuations: Sequence[str | Sequence[int]], *,
              progress: bool = True) -> list[Score]:
        """The log-likelihood of each continuation after its prompt. Text is tokenized in two parts (the
        prompt with the tokenizer's BOS, the continuation without), as evaluation harnesses do; token ids
        are taken as they are."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        tokenizer = self.served.tokenizer
        pairs = []
        for prompt, continuation in zip(prompts, continuations):
            head = tokenizer.encode(prompt, add_bos=tokenizer.special.add_bos) if isinstance(prompt, str) else list(prompt)
            tail = tokenizer.encode(continuation) if isinstance(continuation, str) else list(continuation)
            if not head or not tail:
                raise ValueError("a prompt and its continuation must each have at least one token")
            pairs.append((head, tail))
        prepared = [self._prepare("completion", {"model": self.id, "prompt": head + tail, "max_tokens": 0,
                                                 "echo": True, "logprobs": 1}) for head, tail in pairs]

        async def one(index: int, reply: Reply) -> Score:
            await _collect(reply, chat=False)
            head, tail = pairs[index]
            scored = reply.handle.prompt_logprobs[len(head):]
            logprobs = tuple(s.logprob for s in scored)
            greedy = all(s.top_logprobs and s.top_logprobs[0].token_id == s.token_id for s in scored)
            return Score(index, tuple(head), tuple(tail), logprobs, sum(logprobs), greedy, self.served.fingerprint)

        return self._run(prepared, one, progress, "score")

    # ---- underneath ------------------------------------------------------------------------------
    @staticmethod
    def _items(count: int, per_item: Sequence[dict] | None) -> Sequence[dict]:
        if per_item is None:
            return [{}] * count
        if len(per_item) != count:
            raise ValueError(f"per_item has {len(per_item)} entries for {count} inputs")
        return per_item

    def _body(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        if params.get("stream"):
            raise ValueError("stream is for the HTTP API; LLM returns whole results")
        return {"model": self.id, **params, **content}

    def _prepare(self, endpoint: str, body: dict[str, Any]) -> Prepared:
        """A request body validated and translated exactly as the server's endpoint does it."""
        if endpoint == "chat":
            return prepare(self.served, ChatCompletionRequest.model_validate(body))
        (prepared,) = prepare_completion(self.served, CompletionRequest.model_validate(body))
        return prepared

    def _answer(self, endpoint: str, bodies: list[dict], progress: bool) -> list[Result]:
        prepared = [self._prepare(endpoint, body) for body in bodies]  # every request checked before any runs
        launch_options = json.loads(json.dumps(asdict(self.options)))  # as a JSONL line reads back

        async def one(index: int, reply: Reply) -> Result:
            choices = await _collect(reply, chat=endpoint == "chat")
            usage = reply.usage()
            return Result(index, endpoint, {**bodies[index], "seed": reply.handle.seed}, reply.prepared.prompt_ids,
                          choices, self.id, self.served.fingerprint, dict(self.served.provenance), launch_options,
                          {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")})

        return self._run(prepared, one, progress, endpoint)

    def _run(self, prepared: list[Prepared], finish: Callable[[int, Reply], Awaitable[Any]], progress: bool,
             what: str) -> list[Any]:
        """Submit every request, a window of them in flight at once, and finish each reply as it completes.
        The event loop runs in a thread of its own, so this works inside a notebook's running loop too."""
        engine = self.served.engine
        window = engine.config.slots + max(1, engine.config.queue_size // 2)

        async def main() -> list[Any]:
            results: list[Any] = [None] * len(prepared)
            limit = asyncio.Semaphore(window)
            bar = tqdm(total=len(prepared), desc=what, unit="req", disable=not progress or len(prepared) < 2)

            async def run(index: int) -> None:
                async with limit:
                    while True:
                        try:
                            reply = Reply(self.served, prepared[index], submit(self.served, prepared[index]))
                            break
                        except ChatError as error:  # the queue is full (the engine is shared): wait a little
                            if error.code != "server_overloaded":
                                raise
                            await asyncio.sleep(0.05)
                    try:
                        results[index] = await finish(index, reply)
                    finally:
                        reply.cancel()
                    bar.update()

            try:
                await asyncio.gather(*(run(i) for i in range(len(prepared))))
            finally:
                bar.close()
            return results

        with ThreadPoolExecutor(1, thread_name_prefix="flaxchat-llm") as pool:
            return pool.submit(asyncio.run, main()).result()
