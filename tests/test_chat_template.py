"""Chat-template rendering equals transformers' apply_chat_template."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from flaxchat.chat.template import ChatTemplateError, render_chat
from tests.gguf_writer import CHAT_TEMPLATE as CHATML

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5-Instruct's template (tools, tool calls and tool responses).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A Llama-2 style template: bos/eos tokens, raise_exception and a namespace.
LLAMA2_TEMPLATE = (
    "{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% set ns.turns = ns.turns + 1 %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {"type": "object", "properties": {}}}},
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 中文 😀"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp": 21})},
    {"role": "tool", "tool_call_id": "call_2", "content": "second result"},
]


def _reference(template: str) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, QWEN25_TEMPLATE, CHATML], ids=["smollm2", "qwen2.5", "chatml"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_plain_conversations(template, conversation, generation_prompt):
    expected = _reference(template).apply_chat_template(conversation, tokenize=False,
                                                        add_generation_prompt=generation_prompt)
    assert render_chat(template, conversation, add_generation_prompt=generation_prompt, special_tokens=SPECIALS) == expected


@pytest.mark.parametrize("conversation", [CONVERSATIONS[0], CONVERSATIONS[1], TOOL_CONVERSATION])
def test_qwen25_with_tools(conversation):
    expected = _reference(QWEN25_TEMPLATE).apply_chat_template(conversation, tools=TOOLS, tokenize=False,
                                                               add_generation_prompt=True)
    ours = render_chat(QWEN25_TEMPLATE, conversation, tools=TOOLS, special_tokens=SPECIALS)
    assert ours == expected
    assert '"description": "Weather for a city, in °C"' in ours  # tojson keeps non-ASCII, as HF's does


def test_llama2_bos_eos_and_raise_exception():
    conversation = CONVERSATIONS[2]
    expected = _reference(LLAMA2_TEMPLATE).apply_chat_template(conversation, tokenize=False)
    assert render_chat(LLAMA2_TEMPLATE, conversation, special_tokens=SPECIALS) == expected
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(LLAMA2_TEMPLATE, [{"role": "assistant", "content": "x"}], special_tokens=SPECIALS)


def test_extra_kwargs_reach_the_template():
    template = "{% if enable_thinking is defined and not enable_thinking %}no-think{% else %}think{% endif %}"
    assert render_chat(template, [], enable_thinking=False) == "no-think"
    assert render_chat(template, []) == "think"


def test_sandbox_blocks_escapes():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError):
        render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", [])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", [])


HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loops that call": "{% for i in range(100000) %}{% for j in range(100000) %}{{ j|string }}{% endfor %}{% endfor %}",
    "repetition": "{{ 'abc' * 1000000000 }}",
    "a huge power": "{% set b = 100000000 %}{{ 10 ** b }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "huge output": "{% for i in range(100000) %}{{ messages }}{{ messages }}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_a_template_that_loops_or_grows_fails_within_its_budget(name):
    """A chat template is code from a model repository: one that loops, or builds huge values, fails its
    render in bounded time (RENDER_SECONDS) and memory (RENDER_CHARS), and the next render is unaffected."""
    import time

    from flaxchat.chat.template import RENDER_SECONDS

    started = time.monotonic()
    with pytest.raises(ChatTemplateError):
        render_chat(HOSTILE_TEMPLATES[name], [{"role": "user", "content": "x" * 2000}])
    assert time.monotonic() - started < RENDER_SECONDS + 1.5
    assert render_chat(CHATML, CONVERSATIONS[0]).startswith("<|im_start|>")


QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
THINKING_CONVERSATION = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "Weather in Paris?"},
]


@pytest.mark.parametrize("conversation", [CONVERSATIONS[0], THINKING_CONVERSATION, TOOL_CONVERSATION])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_tools_and_thinking_switch(conversation, thinking):
    extra = {} if thinking is None else {"enable_thinking": thinking}
    expected = _reference(QWEN3_TEMPLATE).apply_chat_template(conversation, tools=TOOLS, tokenize=False,
                                                               add_generation_prompt=True, **extra)
    assert render_chat(QWEN3_TEMPLATE, conversation, tools=TOOLS, special_tokens=SPECIALS, **extra) == expected
    assert expected.endswith("<think>\n\n</think>\n\n") == (thinking is False)
