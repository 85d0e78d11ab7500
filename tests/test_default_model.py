"""The real default model: GGUF importer parity with transformers' GGUF loader, and the store."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxchat.checkpoints.store import load_model
from flaxchat.model.tokenizer import HFTokenizer, SpecialTokens
from flaxchat.model.transformer import Transformer, init_cache
from flaxchat.sampling.engine import Engine, EngineConfig
from flaxchat.sampling.params import SamplingParams
from flaxchat.chat.template import render_chat

pytestmark = pytest.mark.default_model

ENGINE = EngineConfig(slots=4, max_len=256, warmup=False)  # the engines' shapes; steps compile on first use
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "How do I reverse a list in Python?",
    "Translate 'good morning' into Spanish and German.",
]


@pytest.fixture(scope="module")
def ours_and_reference(default_imported, default_reference_folder):
    """Our import of the GGUF and transformers' (its GGUF loader's result, saved once per run as a folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = HFTokenizer.from_json(default_imported.tokenizer_files["tokenizer.json"].decode(), SpecialTokens())
    ref_model = AutoModelForCausalLM.from_pretrained(default_reference_folder, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(default_reference_folder)
    return default_imported, tokenizer, ref_model, ref_tokenizer


@pytest.fixture(scope="module")
def reference_greedy(ours_and_reference):
    """transformers' greedy 32-token continuation of a prompt's ids (computed once per prompt for the module)."""
    imported, tokenizer, ref_model, _ = ours_and_reference
    eos = tokenizer.token_to_id(imported.tokenizer_config["eos_token"])
    done: dict[tuple[int, ...], list[int]] = {}

    def continuation(ids: list[int]) -> list[int]:
        if tuple(ids) not in done:
            with torch.no_grad():
                out = ref_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                         eos_token_id=eos, pad_token_id=eos)
            done[tuple(ids)] = out[0, len(ids):].tolist()
        return done[tuple(ids)]

    return continuation


def _chat_ids(imported, tokenizer, prompt):
    text = render_chat(imported.tokenizer_config["chat_template"], [{"role": "user", "content": prompt}],
                       special_tokens={"bos_token": imported.tokenizer_config["bos_token"]})
    return tokenizer.encode(text)


def test_prompt_logits_close_to_transformers(ours_and_reference):
    imported, tokenizer, ref_model, _ = ours_and_reference
    ids = _chat_ids(imported, tokenizer, PROMPTS[0])
    cfg = imported.cfg
    logits, _ = Transformer(cfg).apply({"params": imported.params}, jnp.asarray([ids]),
                                       jnp.arange(len(ids))[None], init_cache(cfg, 1, 64))
    with torch.no_grad():
        reference = ref_model(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(np.asarray(logits[0]) - reference).max())
    print(f"SmolLM2-135M GGUF prompt logits: max abs diff {diff:.2e} (logit scale {np.abs(reference).max():.1f})")
    assert diff <= 1e-3


def _served_tokenizer(imported, tokenizer):
    """The tokenizer with the checkpoint's special tokens (stop ids), as the store builds it."""
    from flaxchat.checkpoints.tokenizer_files import special_tokens_from_config

    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return HFTokenizer(tokenizer.backend, special_tokens_from_config(imported.tokenizer_config, vocab))


def test_greedy_continuations_equal_transformers(ours_and_reference, reference_greedy):
    """One prompt at a time (a one-row decode bucket): greedy tokens equal transformers'. (Every float32 engine
    of this module has the same shapes, ``ENGINE``, so the steps compile once.)"""
    imported, tokenizer, _, _ = ours_and_reference
    tokenizer = _served_tokenizer(imported, tokenizer)
    lengths = []
    with Engine(imported.cfg, imported.params, tokenizer, ENGINE) as engine:
        for prompt in PROMPTS:
            ids = _chat_ids(imported, tokenizer, prompt)
            ours = [e.token_id for e in engine.submit(ids, SamplingParams(max_tokens=32, temperature=0.0)).result()[0]]
            theirs = reference_greedy(ids)
            assert ours == theirs, f"{prompt!r}: {tokenizer.decode(ours)!r} != {tokenizer.decode(theirs)!r}"
            lengths.append(len(ours))
    assert sum(n == 32 for n in lengths) >= 3, lengths  # most continuations run the full 32 tokens


def test_chat_template_and_tokens_equal_transformers(ours_and_reference):
    imported, tokenizer, _, ref_tokenizer = ours_and_reference
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a prime > 10."}]
    for generation_prompt in (True, False):
        ours = render_chat(imported.tokenizer_config["chat_template"], messages,
                           add_generation_prompt=generation_prompt,
                           special_tokens={"bos_token": imported.tokenizer_config["bos_token"]})
        theirs = ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == theirs
        assert tokenizer.encode(ours) == ref_tokenizer.encode(theirs, add_special_tokens=False)


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_pulled_store_generates_sensibly(default_store, weights):
    """`pull` stored an orbax checkpoint that loads without the GGUF and answers a question (also with
    the weights quantised to 8-bit blocks at load; 4-bit blocks hold it exactly, see below)."""
    model = load_model("smollm2-135m-instruct", weights=weights)
    assert model.cfg.weights == weights
    assert {a.dtype for a in jax.tree.leaves(model.params)} >= ({jnp.dtype("uint8")} if weights != "float32" else set())
    text = render_chat(model.chat_template, [{"role": "user", "content": "What is the capital of France?"}],
                       special_tokens={"bos_token": model.tokenizer.special.bos_token})
    with Engine(model.cfg, model.params, model.tokenizer, ENGINE) as engine:
        events = engine.submit(model.tokenizer.encode(text), SamplingParams(max_tokens=20, temperature=0.0)).result()[0]
    assert "Paris" in "".join(e.text for e in events)
    assert events[-1].token_id in model.tokenizer.stop_ids and events[-1].finish_reason == "stop"


def test_the_q4_1_checkpoint_runs_as_int4_with_every_weight_exact(default_store):
    """The default model's GGUF stores its layers as Q4_1 blocks: ``auto`` (on CPU with the kernel) takes
    4-bit blocks, and every projection weight they hold equals the float checkpoint's, bit for bit."""
    from flaxchat.model import kernels
    from flaxchat.model.quant import FUSED, unpacked

    floats = load_model("smollm2-135m-instruct", weights="float32").params
    if not (kernels.available() and jax.default_backend() == "cpu"):
        pytest.skip(f"no kernel ({kernels.build_error()}): auto is float32")
    model = load_model("smollm2-135m-instruct", weights="auto")
    assert model.cfg.weights == "int4"
    layer, expected_layer = model.params["layers"], floats["layers"]  # every leaf [layers, ...]: take layer 7
    for block, names in (("attn", FUSED[0]), ("mlp", FUSED[1])):
        stored = layer[block]["_".join(n.removesuffix("_proj") for n in names) + "_proj"]
        codes = np.asarray(unpacked(np.asarray(stored["codes"][7])), np.float64)  # [P, K, 32]
        p, k, _ = codes.shape
        w = (codes.reshape(p, k // 32, 32, 32) * np.asarray(stored["scale"][7])[:, :, None, :]
             + np.asarray(stored["offset"][7])[:, :, None, :]).astype(np.float32)
        w = w.reshape(p, k, 32).transpose(1, 0, 2).reshape(k, -1)
        expected = np.concatenate([np.asarray(expected_layer[block][n]["kernel"][7]) for n in names], axis=1)
        np.testing.assert_array_equal(w[:, : expected.shape[1]], expected)


def test_engine_greedy_batch_equals_transformers(ours_and_reference, reference_greedy):
    """Six chat prompts at once through the batching engine (4 slots): greedy tokens equal transformers'."""
    imported, tokenizer, _, _ = ours_and_reference
    tokenizer = _served_tokenizer(imported, tokenizer)
    prompts = [_chat_ids(imported, tokenizer, p) for p in PROMPTS]
    with Engine(imported.cfg, imported.params, tokenizer, ENGINE) as engine:
        handles = [engine.submit(ids, SamplingParams(max_tokens=32, temperature=0.0)) for ids in prompts]
        results = [h.result()[0] for h in handles]
    assert tokenizer.special.eos_id == tokenizer.token_to_id(imported.tokenizer_config["eos_token"])
    for prompt, ids, events in zip(PROMPTS, prompts, results):
        assert [e.token_id for e in events] == reference_greedy(ids), prompt


def test_llm_score_equals_transformers(default_store, ours_and_reference):
    """``flaxchat.LLM.score`` on the default model (float32 weights and KV cache): each continuation's
    log-likelihood equals transformers' sum of the same tokens' log-probabilities within 1e-4."""
    import flaxchat

    _, _, ref_model, _ = ours_and_reference
    prompts = ["The capital of France is", "Question: what is 2 + 2?\nAnswer:", "def reverse(items):\n    return"]
    continuations = [" Paris.", " 4", " items[::-1]"]
    with flaxchat.LLM("smollm2-135m-instruct", weights="float32", kv_dtype="float32", slots=ENGINE.slots, warmup=False,
                      max_len=ENGINE.max_len) as llm:
        scores = llm.score(prompts, continuations, progress=False)
    for score in scores:
        ids = torch.tensor([[*score.prompt_token_ids, *score.continuation_token_ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(ref_model(ids).logits[0].double(), dim=-1)
        start = len(score.prompt_token_ids)
        expected = [float(logprobs[i - 1, ids[0, i]]) for i in range(start, ids.shape[1])]
        print(f"score {score.total:.6f} vs transformers {sum(expected):.6f}")
        assert abs(score.total - sum(expected)) <= 1e-4
        np.testing.assert_allclose(score.token_logprobs, expected, atol=1e-4)
    assert scores[0].greedy  # " Paris." is what the model would say


def test_greedy_continuations_on_a_mesh_equal_transformers(default_store, reference_greedy):
    """The prompts above on 1x8 and 4x2 meshes of fake CPU devices (``tests/mesh_worker.py``, one process;
    float32): 16 greedy tokens each, the ones transformers (and so one device) gives. SmolLM2's 9 heads and
    3 KV heads divide none of the model axes (2, 8): its heads stay whole while the MLP and the vocabulary
    split. 2x4 is the scaling notebook's (``notebooks/scaling.ipynb``, run by ``test_notebooks.py``): it
    asserts the same tokens as one device, which the tests above hold to transformers'. 8x1 (one slot per
    data shard, no model split) runs in ``test_sharding.py`` on a tiny model, whose seed contract does not
    depend on the weights; running it here too cost ~40 s of the suite's 2 cores."""
    from tests.test_sharding import mesh_worker

    meshes = ["data=1,model=8", "data=4,model=2"]
    report = mesh_worker("default", *meshes, env={"FLAXCHAT_HOME": str(default_store)})["meshes"]
    assert sorted(report) == sorted(meshes)
    for mesh, run in report.items():
        for prompt, ids, tokens in zip(PROMPTS, run["prompt_ids"], run["tokens"]):
            expected = reference_greedy(ids)
            assert tokens == expected[: len(tokens)] and len(tokens) == min(16, len(expected)), (mesh, prompt)
