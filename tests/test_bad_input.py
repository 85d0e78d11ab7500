"""Broken checkpoints fail with a CheckpointError that names the file and the problem."""

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flaxchat.checkpoints.errors import CheckpointError
from flaxchat.checkpoints.gguf_import import load_gguf
from flaxchat.checkpoints.hf_import import load_hf_folder
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_tiny_model


@pytest.fixture
def hf_folder(tmp_path):
    make_tiny_model("llama", tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def gguf_file(tmp_path):
    return write_gguf(make_tiny_model("llama", tmp_path / "hf"), tmp_path / "tiny.gguf")


def _raises(match, fn, *args):
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args)
    return info.value


def test_missing_folder_and_config(tmp_path, hf_folder):
    _raises("not a directory", load_hf_folder, tmp_path / "nowhere")
    (hf_folder / "config.json").unlink()
    err = _raises("config.json", load_hf_folder, hf_folder)
    assert "file not found" in str(err)


def test_truncated_safetensors(hf_folder):
    weights = hf_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _raises("corrupt or truncated", load_hf_folder, hf_folder)
    assert err.path == str(weights)


def test_garbage_safetensors(hf_folder):
    (hf_folder / "model.safetensors").write_bytes(b"\x00" * 64)
    _raises("model.safetensors: corrupt or truncated", load_hf_folder, hf_folder)


def test_missing_tensor_is_named(hf_folder):
    weights = hf_folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    _raises("'model.layers.1.mlp.up_proj.weight' is missing", load_hf_folder, hf_folder)


def test_wrong_shape_is_named(hf_folder):
    weights = hf_folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    save_file(tensors, weights)
    _raises(r"'model.norm.weight' has shape \(7,\)", load_hf_folder, hf_folder)


def test_missing_shard(hf_folder):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (hf_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises("model-00002-of-00002.safetensors: file not found", load_hf_folder, hf_folder)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_config(hf_folder, change, match):
    path = hf_folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    err = _raises(match, load_hf_folder, hf_folder)
    assert err.path == str(path)


def test_invalid_config_json(hf_folder):
    (hf_folder / "config.json").write_text("{not json")
    _raises("config.json: not valid JSON", load_hf_folder, hf_folder)


def test_gguf_missing_file(tmp_path):
    _raises("missing.gguf: file not found", load_gguf, tmp_path / "missing.gguf")


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.9])
def test_truncated_gguf(gguf_file, fraction):
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: int(len(data) * fraction)])
    err = _raises("tiny.gguf", load_gguf, gguf_file)
    assert "truncated" in str(err)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, I am not a model")
    _raises("notes.gguf: not a readable GGUF file", load_gguf, path)


def test_gguf_unsupported_architecture(tmp_path):
    path = write_gguf(make_tiny_model("llama", tmp_path / "hf"), tmp_path / "gpt2.gguf", architecture_name="gpt2")
    _raises("unsupported architecture 'gpt2'", load_gguf, path)


def test_gguf_missing_tensor(tmp_path):
    path = write_gguf(make_tiny_model("llama", tmp_path / "hf"), tmp_path / "holes.gguf", drop=("blk.2.ffn_up.weight",))
    _raises("'model.layers.2.mlp.up_proj.weight' is missing", load_gguf, path)


def test_gguf_unsupported_quantisation(tmp_path, gguf_file):
    """A tensor in a type gguf cannot dequantise (Q8_1) is reported with its name and type."""
    reader = gguf.GGUFReader(gguf_file)
    writer = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if isinstance(value, list) and value and isinstance(value[0], str):
            writer.add_array(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, field.types[0])
    q81 = gguf.GGMLQuantizationType.Q8_1
    block, type_size = gguf.GGML_QUANT_SIZES[q81]
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if tensor.name == "blk.0.ffn_down.weight":
            raw = np.zeros((shape[0], shape[1] // block * type_size), np.uint8)
            writer.add_tensor(tensor.name, raw, raw_shape=raw.shape, raw_dtype=q81)
        else:
            writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _raises("'blk.0.ffn_down.weight' uses unsupported quantisation type Q8_1", load_gguf, tmp_path / "q81.gguf")


def test_store_import_of_bad_file_leaves_nothing(tmp_path, monkeypatch, gguf_file):
    from flaxchat.checkpoints.store import import_path, is_stored, list_models

    monkeypatch.setenv("FLAXCHAT_HOME", str(tmp_path / "home"))
    broken = tmp_path / "broken.gguf"
    shutil.copy(gguf_file, broken)
    broken.write_bytes(broken.read_bytes()[:4000])
    with pytest.raises(CheckpointError):
        import_path(broken, "broken")
    assert not is_stored("broken") and list_models() == []


# ---- mutation fuzzing (issue 14, item 1) -------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_EXAMPLES = 60  # per reader; a long run: FLAXCHAT_CHECKPOINT_FUZZ=5000


def _examples() -> int:
    import os

    return int(os.environ.get("FLAXCHAT_CHECKPOINT_FUZZ", FUZZ_EXAMPLES))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid tiny GGUF and safetensors folder, and how many leading bytes hold each one's header."""
    folder = tmp_path_factory.mktemp("pristine")
    hf = folder / "hf"
    gguf_path = write_gguf(make_tiny_model("llama", hf), folder / "tiny.gguf")
    header = gguf.GGUFReader(gguf_path).data_offset
    weights = (hf / "model.safetensors").read_bytes()
    return {"gguf": (gguf_path.read_bytes(), header), "hf": (hf, 8 + int.from_bytes(weights[:8], "little"))}


def _mutations(header: int):
    """Byte overwrites, mostly in the header (where lengths, counts, types and offsets live), and a cut."""
    place = st.one_of(st.integers(0, header - 1), st.integers(0, header - 1).map(lambda i: i - i % 8))
    value = st.one_of(st.integers(0, 255), st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    return st.tuples(st.lists(st.tuples(place, value), min_size=1, max_size=6), st.none() | st.floats(0.0, 1.0))


def _mutated(data: bytes, header: int, mutation) -> bytes:
    edits, cut = mutation
    out = bytearray(data)
    for where, value in edits:
        out[where] = value
    return bytes(out[: int(len(out) * cut)] if cut is not None else out)


def _only_checkpoint_errors(load, path, size: int) -> None:
    """``load(path)`` succeeds or raises CheckpointError, in bounded time and memory (tracemalloc's peak,
    numpy's buffers included, stays within a few times what the pristine model needs)."""
    import time
    import tracemalloc

    tracemalloc.start()
    started = time.perf_counter()
    try:
        load(path)
    except CheckpointError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - started < 20
    assert peak < 64 * size + (64 << 20), peak


@given(mutation=st.data())
@settings(max_examples=_examples(), deadline=None, suppress_health_check=list(HealthCheck))
def test_a_mutated_gguf_gives_a_checkpoint_error_or_a_model(pristine, tmp_path_factory, mutation):
    data, header = pristine["gguf"]
    path = tmp_path_factory.mktemp("fuzz") / "mutated.gguf"
    path.write_bytes(_mutated(data, header, mutation.draw(_mutations(header))))
    _only_checkpoint_errors(load_gguf, path, len(data))


@given(mutation=st.data())
@settings(max_examples=_examples(), deadline=None, suppress_health_check=list(HealthCheck))
def test_a_mutated_safetensors_gives_a_checkpoint_error_or_a_model(pristine, tmp_path_factory, mutation):
    source, header = pristine["hf"]
    folder = tmp_path_factory.mktemp("fuzz") / "hf"
    shutil.copytree(source, folder)
    data = (source / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(_mutated(data, header, mutation.draw(_mutations(header))))
    _only_checkpoint_errors(load_hf_folder, folder, len(data))
