"""engine.model's building blocks: the measured matmul forms and in-place rotary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import matmul
from engine.matmul import LINEAR, ONEDNN, SPLIT, TRANSPOSED, linear, set_form
from engine.model import _column_major
from engine.rope import apply_rope_

TOL: dict[str, float] = {"atol": 1e-5, "rtol": 1e-5}
FORMS = [LINEAR, TRANSPOSED, SPLIT] + ([ONEDNN] if matmul._ONEDNN is not None else [])


@pytest.fixture(autouse=True)
def fresh_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an empty process-wide matmul plan and leaves none behind."""
    monkeypatch.setattr(matmul, "_plan", {})


def test_onednn_is_available_in_the_pinned_cpu_build() -> None:
    assert matmul._ONEDNN is not None  # torch==2.13.0's CPU wheel ships oneDNN


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 17, 63, 64, 65, 300])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear_in_every_form(rows: int, form: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    weight = _column_major(torch.randn(48, 32, generator=g))
    bias = torch.randn(48, generator=g) if with_bias else None
    x = torch.randn(rows, 1, 32, generator=g)  # (B, T, in) as in decode
    set_form(weight, rows, form)
    expected = F.linear(x, weight, bias)
    got = linear(x, weight, bias)
    assert got.shape == (rows, 1, 48)
    assert got.is_contiguous()  # a strided last dim sends SDPA to its slow math path
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_split_form_slices_outputs_by_thread_and_else_falls_back(threads: int,
                                                                     rows: int) -> None:
    weight = _column_major(torch.randn(48, 32))  # 48 outputs: 24 or 16 per thread
    bias, x = torch.randn(48), torch.randn(rows, 32)
    set_form(weight, rows, SPLIT)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert (SPLIT in matmul.available_forms(weight)) == (threads > 1)
        for b in (None, bias):
            torch.testing.assert_close(linear(x, weight, b), F.linear(x, weight, b), **TOL)
        row_major = weight.contiguous()  # not sliceable in place: plain F.linear
        assert SPLIT not in matmul.available_forms(row_major)
        torch.testing.assert_close(matmul._split(x, row_major, None), F.linear(x, row_major),
                                   **TOL)
    finally:
        torch.set_num_threads(before)


def test_a_form_is_used_only_for_its_shape_and_row_bucket(
        monkeypatch: pytest.MonkeyPatch) -> None:
    weight, other = torch.randn(48, 32), torch.randn(40, 32)
    set_form(weight, 16, TRANSPOSED)  # bucket 16: 16-31 rows
    calls: list[tuple[int, ...]] = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(tuple(a.shape)) or real_mm(a, b))
    for rows in (8, 16, 31, 32):
        linear(torch.randn(rows, 32), weight)
    linear(torch.randn(16, 32), other)
    assert calls == [(48, 32), (48, 32)]  # 16 and 31 rows of ``weight`` only


def test_row_counts_from_large_rows_up_share_one_bucket() -> None:
    weight = torch.randn(48, 32)
    set_form(weight, matmul.LARGE_ROWS, TRANSPOSED)
    assert matmul._key(weight, 4096) == matmul._key(weight, matmul.LARGE_ROWS)
    assert matmul._key(weight, matmul.LARGE_ROWS - 1) != matmul._key(weight, matmul.LARGE_ROWS)


@pytest.mark.parametrize("form", FORMS)
def test_linear_result_can_be_split_into_heads(form: int) -> None:
    weight = _column_major(torch.randn(4 * 8, 16))
    set_form(weight, 32, form)
    x = torch.randn(2, 16, 16)  # (B, T, in): 32 rows
    out = linear(x, weight).view(2, 16, 4, 8)  # (B, T, heads, hd)
    torch.testing.assert_close(out, F.linear(x, weight).view(2, -1, 4, 8), **TOL)


def test_tune_follows_the_measurement_and_measures_each_case_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[tuple[int, int]] = []

    def fake_speedups(group: list[torch.Tensor], rows: int, forms: list[int],
                      repeats: int) -> dict[int, float]:
        measured.append((len(group), rows))
        if rows >= 32:  # W @ x.T twice as fast from 32 rows up, oneDNN 1.5x
            return {LINEAR: 1.0, TRANSPOSED: 2.0, ONEDNN: 1.5}
        if rows == 16:  # oneDNN wins, but by less than MIN_GAIN
            return {LINEAR: 1.0, TRANSPOSED: 0.5, ONEDNN: 1.05}
        return {LINEAR: 1.0, TRANSPOSED: 0.9, ONEDNN: 1.3}

    monkeypatch.setattr(matmul, "_speedups", fake_speedups)
    group = [torch.randn(48, 32) for _ in range(matmul.TIMED_WEIGHTS + 2)]
    report = matmul.tune([group], rows=(8, 16, 32, matmul.LARGE_ROWS))
    assert report["48x32@32"] == {"linear": 1.0, "transposed": 2.0, "onednn-packed": 1.5}
    assert set(report) == {"48x32@8", "48x32@16", "48x32@32", f"48x32@{matmul.LARGE_ROWS}"}
    assert matmul.tune([group], rows=(8, 16, 32)) == {}  # the plan is kept
    # some layers' weights stream as in a decode step; large rows time only a few
    assert measured == [(matmul.TIMED_WEIGHTS, 8), (matmul.TIMED_WEIGHTS, 16),
                        (matmul.TIMED_WEIGHTS, 32), (matmul.LARGE_WEIGHTS, matmul.LARGE_ROWS)]
    assert matmul._plan[matmul._key(group[0], 40)] == TRANSPOSED
    assert matmul._plan[matmul._key(group[0], 20)] == LINEAR
    assert matmul._plan[matmul._key(group[0], 12)] == ONEDNN


@pytest.mark.skipif(matmul._ONEDNN is None, reason="no oneDNN in this build")
def test_prepare_packs_the_weights_that_use_onednn_and_drops_the_others() -> None:
    used = [_column_major(torch.randn(40, 24)) for _ in range(2)]
    unused = _column_major(torch.randn(56, 24))
    set_form(used[0], 16, ONEDNN)
    x = torch.randn(16, 24)
    linear(x, unused)  # linear everywhere: never packed
    set_form(unused, 16, ONEDNN)
    linear(x, unused)  # packed on first use
    assert hasattr(unused, matmul._PACKED)
    set_form(unused, 16, LINEAR)
    assert matmul.prepare([*used, unused]) == 2 * 40 * 24 * 4
    assert not hasattr(unused, matmul._PACKED)
    assert all(getattr(w, matmul._PACKED).is_mkldnn for w in used)
    bias = torch.randn(40)
    for w in used:  # the packed copy multiplies exactly what the plain weight does
        torch.testing.assert_close(linear(x, w, bias), F.linear(x, w, bias), **TOL)


def test_tune_times_real_matmuls_and_keeps_results_exact() -> None:
    group = [_column_major(torch.randn(64, 32)) for _ in range(2)]
    report = matmul.tune([group], rows=(1, 8, 16))
    assert set(report) == {"64x32@1", "64x32@8", "64x32@16"}
    forms = {matmul.FORMS[f] for f in matmul.available_forms(group[0])}
    assert set(report["64x32@1"]) == forms  # gemv only multiplies one row
    assert all(set(report[k]) == forms - {"gemv"} for k in ("64x32@8", "64x32@16"))
    assert all(v > 0 for s in report.values() for v in s.values())
    assert matmul._scratch == []  # the cache-evicting buffer does not outlive the tuning
    x = torch.randn(16, 32)
    torch.testing.assert_close(linear(x, group[0]), F.linear(x, group[0]), **TOL)


def test_rope_in_place_on_a_strided_view_matches_rotate_half() -> None:
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3, 5, 8, generator=g)  # (B, T, heads, hd); the first 3 heads rotate
    cos, sin = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    x = qkv[:, :, :3].clone()
    expected = x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin  # HF's rotate_half
    untouched = qkv[:, :, 3:].clone()
    apply_rope_(qkv[:, :, :3], cos, torch.cat((-sin[..., :4], sin[..., 4:]), dim=-1))
    torch.testing.assert_close(qkv[:, :, :3], expected, **TOL)
    assert torch.equal(qkv[:, :, 3:], untouched)


@pytest.mark.parametrize("form", FORMS)
def test_batched_decode_attention_uses_the_fused_sdpa_kernel(tmp_path, form: int) -> None:  # type: ignore[no-untyped-def]
    """16 decoding rows over a held context must not fall back to SDPA's math path."""
    from engine.config import ModelConfig
    from engine.model import build_model
    from engine.runner import ModelRunner
    from engine.sequence import Sequence

    config = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5})
    model = build_model(config)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    runner = ModelRunner((config, model), num_blocks=128, block_size=4, tune_matmuls=False)
    for group in model.projection_groups():
        set_form(group[0], 16, form)  # W @ x.T once left SDPA a strided input
    seqs = [Sequence(f"s{i}", list(range(1, 10 + i))) for i in range(16)]
    runner.prefill(seqs)
    for s in seqs:
        s.token_ids.append(3)
    with torch.profiler.profile() as prof:
        runner.decode(seqs)
    kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert "aten::_scaled_dot_product_attention_math" not in kernels, kernels


@pytest.mark.parametrize(("batch", "t", "tk"), [(1, 5, 12), (3, 1, 9), (2, 4, 4)])
def test_grouped_attention_matches_gqa_sdpa_with_a_mask(batch: int, t: int, tk: int) -> None:
    from engine.attention import _grouped_attention

    g = torch.Generator().manual_seed(batch * 100 + t)
    heads, kvh, hd = 6, 2, 8
    q = torch.randn(batch, t, heads, hd, generator=g)
    keys, values = torch.randn(2, batch, kvh, tk, hd, generator=g)
    ends = torch.randint(1, tk + 1, (batch, t), generator=g)  # each query sees keys [0, end)
    allowed = torch.arange(tk)[None, None, :] < ends[:, :, None]  # (B, T, Tk)
    mask = torch.zeros(batch, t, tk).masked_fill_(~allowed, float("-inf")).unsqueeze(1)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                              scale=0.3, enable_gqa=True)
    got = _grouped_attention(q, keys, values, mask, 0.3)
    torch.testing.assert_close(got, expected, **TOL)


def test_building_a_model_stays_off_torchs_python_reference_ops() -> None:
    """Meta-tensor init and ``to_empty`` ran torch's Python reference ops, whose first use
    imports sympy and torch._dynamo: most of a worker's start on a busy machine."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from engine.config import ModelConfig\n"
        "from engine.model import build_model\n"
        "config = ModelConfig.from_hf({'architectures': ['LlamaForCausalLM'], 'vocab_size': 64,"
        " 'hidden_size': 64, 'intermediate_size': 96, 'num_hidden_layers': 2,"
        " 'num_attention_heads': 4, 'num_key_value_heads': 2, 'max_position_embeddings': 256,"
        " 'rms_norm_eps': 1e-5, 'tie_word_embeddings': True})\n"
        "model = build_model(config, dtype=__import__('torch').bfloat16)\n"
        "assert all(p.device.type == 'cpu' and p.dtype == __import__('torch').bfloat16 for p in model.parameters())\n"
        "assert model.lm_head.weight is model.model.embed_tokens.weight\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _counting_speedups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake(group: list[torch.Tensor], rows: int, forms: list[int],
             repeats: int) -> dict[int, float]:
        calls.append(rows)
        return {LINEAR: 1.0, TRANSPOSED: 2.0 if rows >= 16 else 0.5}

    monkeypatch.setattr(matmul, "_speedups", fake)
    return calls


def test_a_kept_plan_is_read_by_the_next_start_instead_of_measured(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls = _counting_speedups(monkeypatch)
    group = [torch.randn(48, 32) for _ in range(2)]
    jobs = [([group], (8, 16)), ([[torch.randn(40, 32)]], (1,))]
    assert matmul.tune_cached(jobs, tmp_path) == "measured"
    measured = dict(matmul._plan)
    assert len(calls) == 3 and measured[matmul._key(group[0], 16)] == TRANSPOSED
    monkeypatch.setattr(matmul, "_plan", {})  # a new process
    assert matmul.tune_cached(jobs, tmp_path) == "read"
    assert len(calls) == 3 and matmul._plan == measured
    # other shapes are another plan, which holds every case of its jobs, measured before or not
    more = [*jobs, ([[torch.randn(64, 32)]], (8,))]
    assert matmul.tune_cached(more, tmp_path) == "measured"
    assert len(calls) == 4 and len(list(tmp_path.glob("plan-*.json"))) == 2
    monkeypatch.setattr(matmul, "_plan", {})
    assert matmul.tune_cached(more, tmp_path) == "read" and len(matmul._plan) == 4


def test_a_broken_plan_file_is_measured_anew_and_replaced(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls = _counting_speedups(monkeypatch)
    jobs = [([[torch.randn(48, 32)]], (8, 16))]
    path = tmp_path / f"plan-{matmul.plan_key(jobs)}.json"
    for broken in ('[[48, 32, "torch.float32", 8, "no-such-form"]]', "{not json", "[[1, 2]]"):
        path.write_text(broken)
        monkeypatch.setattr(matmul, "_plan", {})
        assert matmul.tune_cached(jobs, tmp_path) == "measured"
        assert matmul._read_plan(path) == matmul._plan
    assert len(calls) == 6


def test_without_a_directory_or_with_an_unwritable_one_the_plan_is_only_measured(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls = _counting_speedups(monkeypatch)
    jobs = [([[torch.randn(48, 32)]], (16,))]
    assert matmul.tune_cached(jobs, None) == "measured, not stored"
    monkeypatch.setattr(matmul, "_plan", {})
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert matmul.tune_cached(jobs, blocker / "matmul") == "measured, not stored"
    assert len(calls) == 2 and matmul._plan[matmul._key(jobs[0][0][0][0], 16)] == TRANSPOSED


@pytest.mark.parametrize("rows", [7, 8, 9, 23, 40])
def test_a_long_pass_goes_through_the_mlp_in_tiles_with_the_same_result(
        rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import model as model_module
    from engine.config import ModelConfig
    from engine.model import LlamaMLP

    config = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5})
    torch.manual_seed(0)
    mlp = LlamaMLP(config)
    mlp.fuse_()
    x = torch.randn(2, rows, 32)
    whole = mlp(x)  # 14-80 rows: one piece under the default tile
    tiles: list[int] = []
    real = LlamaMLP._rows

    def counted(self: LlamaMLP, part: torch.Tensor) -> torch.Tensor:
        tiles.append(part.reshape(-1, part.shape[-1]).shape[0])
        return real(self, part)

    monkeypatch.setattr(model_module, "MLP_TILE_ROWS", 8)
    monkeypatch.setattr(LlamaMLP, "_rows", counted)
    tiled = mlp(x)
    assert max(tiles) <= 8 and sum(tiles) == 2 * rows and len(set(tiles[:-1])) <= 1
    expected = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                        mlp.down_proj.weight)
    torch.testing.assert_close(tiled, expected, **TOL)
    torch.testing.assert_close(tiled, whole, **TOL)
