"""load_model: HF directories, sharded weights, tied heads, errors, the cached default model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import loader
from engine.loader import ModelLoadError, build_once, default_model_path, load_model
from engine.tiny import write_tiny_model

WEIGHTS = "model.safetensors"


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may break."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(d / WEIGHTS)
    edit(tensors)
    save_file(tensors, d / WEIGHTS)


def test_loads_the_tiny_model(tiny_model_dir: Path) -> None:
    m = load_model(str(tiny_model_dir))
    assert m.config.architecture == "LlamaForCausalLM" and m.config.num_layers == 2
    assert m.name == "kvrelay-tiny" and m.path == str(tiny_model_dir)
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    eos = {m.tokenizer.token_to_id("<|im_end|>"), m.tokenizer.token_to_id("<|endoftext|>")}
    assert set(m.config.eos_token_ids) == eos  # config.json + generation_config.json
    assert m.tokenizer.eos_token_ids == eos
    expected = load_file(tiny_model_dir / WEIGHTS)
    state = m.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_digest_is_stable_and_tracks_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    a, b = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    other = load_model(str(write_tiny_model(tmp_path / "seed1", seed=1)))
    assert len(a.weights_digest) == 64 and a.weights_digest == b.weights_digest
    assert other.weights_digest != a.weights_digest


def test_loads_into_bfloat16(tiny_model_dir: Path) -> None:
    m = load_model(str(tiny_model_dir), dtype="bfloat16")
    expected = load_file(tiny_model_dir / WEIGHTS)["lm_head.weight"].to(torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert torch.equal(m.model.lm_head.weight, expected)


def test_tied_checkpoint_without_lm_head(tmp_path: Path) -> None:
    d = write_tiny_model(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(d / WEIGHTS)
    m = load_model(str(d)).model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.lm_head.weight, load_file(d / WEIGHTS)["model.embed_tokens.weight"])


def _shard(d: Path) -> None:
    """Split model.safetensors into two shards and an index."""
    tensors = load_file(d / WEIGHTS)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, d / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / WEIGHTS).unlink()


def test_sharded_weights_load_like_a_single_file(tiny_model_dir: Path, model_dir: Path) -> None:
    _shard(model_dir)
    single, sharded = load_model(str(tiny_model_dir)), load_model(str(model_dir))
    a, b = single.model.state_dict(), sharded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert single.weights_digest != sharded.weights_digest


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]
    return edit


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "missing config.json"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    "unsupported architecture": (
        lambda d: _edit_json(d / "config.json", architectures=["GPT2LMHeadModel"]),
        "unsupported architecture 'GPT2LMHeadModel'"),
    "config missing a field": (
        lambda d: _strip_key(d, "hidden_size"), "config.json is missing 'hidden_size'"),
    "no tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "tokenizer not valid": (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json"),
    "generation config not JSON": (
        lambda d: (d / "generation_config.json").write_text("[1,"), "generation_config.json"),
    "no weights": (lambda d: (d / WEIGHTS).unlink(), "neither model.safetensors"),
    "weights not safetensors": (lambda d: (d / WEIGHTS).write_bytes(b"\x00" * 64),
                                "not a valid safetensors file"),
    "missing tensor": (lambda d: _edit_weights(d, _drop("model.layers.1.mlp.up_proj.weight")),
                       "missing tensor(s) in the weights: model.layers.1.mlp.up_proj.weight"),
    "missing untied head": (lambda d: _edit_weights(d, _drop("lm_head.weight")),
                            "missing tensor(s) in the weights: lm_head.weight"),
    "unexpected tensor": (
        lambda d: _edit_weights(d, lambda t: t.update(extra=torch.zeros(2))),
        "unexpected tensor(s) in the weights: extra"),
    "shape mismatch": (lambda d: _edit_json(d / "config.json", intermediate_size=96),
                       "has shape (128, 64); the config implies (96, 64)"),
    "tokenizer larger than vocab": (lambda d: _edit_json(d / "config.json", vocab_size=700),
                                    "tokenizer has 768 tokens"),
}


def _strip_key(d: Path, key: str) -> None:
    data = json.loads((d / "config.json").read_text())
    del data[key]
    (d / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_directory_names_the_problem(model_dir: Path, breakage: str) -> None:
    breaker, message = BREAKAGES[breakage]
    breaker(model_dir)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(model_dir))
    assert message in str(info.value)
    assert str(model_dir) in str(info.value)


def test_missing_shard_is_named(model_dir: Path) -> None:
    _shard(model_dir)
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_model(str(model_dir))


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model(str(tmp_path / "nope"))


def test_unknown_dtype(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="float8"):
        load_model(str(tiny_model_dir), dtype="float8")


def test_default_model_without_demo_package_is_the_cached_tiny_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "demo_gguf_path", lambda: None)
    path = default_model_path(tmp_path)
    assert default_model_path(tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]  # no temp dirs left
    m = load_model(None, cache_dir=tmp_path)
    assert m.name == "kvrelay-tiny" and m.path == path


def test_build_once_tolerates_a_concurrent_writer(tmp_path: Path) -> None:
    final = tmp_path / "model"

    def racing_build(out: Path) -> None:
        (out / "mine").write_text("late")
        final.mkdir()  # another process renamed its finished copy into place first
        (final / "theirs").write_text("first")

    assert build_once(final, racing_build) == final
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_build_once_cleans_up_a_failed_build(tmp_path: Path) -> None:
    def failing_build(out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "model", failing_build)
    assert list(tmp_path.iterdir()) == []
