"""kvrelay's few-row kernel (``engine.cpu_gemm``): a packed copy of the weight in column
blocks, equal to ``F.linear`` to float rounding, chosen by the matmul plan for a few rows,
kept only for weights the plan multiplies that way, and not offered without a compiler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_gemm, matmul
from engine.matmul import LINEAR, ROWS, linear, set_form
from engine.model import _column_major

TOL: dict[str, float] = {"atol": 1e-4, "rtol": 1e-5}
needs_kernel = pytest.mark.skipif(cpu_gemm.kernel() is None, reason="no C compiler here")


@pytest.fixture(autouse=True)
def fresh_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matmul, "_plan", {})


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(48, 1), (96, 40), (960, 576),
                                                      (144, 1537)])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 33, 64])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_equal_f_linear(out_features: int, in_features: int, rows: int,
                             threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(out_features + in_features + rows)
        weight = _column_major(torch.randn(out_features, in_features))
        x, bias = torch.randn(rows, in_features), torch.randn(out_features)
        torch.testing.assert_close(cpu_gemm.rows(x, weight, bias), F.linear(x, weight, bias),
                                   **TOL)
        torch.testing.assert_close(cpu_gemm.rows(x, weight, None), F.linear(x, weight), **TOL)
        row_major = weight.contiguous()  # the packed copy does not care how W is stored
        torch.testing.assert_close(cpu_gemm.rows(x, row_major, None), F.linear(x, weight),
                                   **TOL)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_what_it_cannot_multiply_is_refused_not_misread() -> None:
    weight = _column_major(torch.randn(96, 32))
    with pytest.raises(RuntimeError, match="multiple of 48"):
        cpu_gemm.rows(torch.randn(2, 32), _column_major(torch.randn(40, 32)), None)
    with pytest.raises(RuntimeError):
        cpu_gemm.rows(torch.randn(2, 32), weight.double(), None)
    with pytest.raises(RuntimeError, match="takes 32 floats"):
        cpu_gemm.rows(torch.randn(2, 31), weight, None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_gemm.rows(torch.randn(2, 32), weight, torch.randn(95))
    with pytest.raises(RuntimeError):
        set_form(_column_major(torch.randn(40, 32)), 8, ROWS)
    assert ROWS not in matmul.available_forms(_column_major(torch.randn(40, 32)))


@needs_kernel
def test_the_plan_sends_a_few_rows_through_it_and_prepare_keeps_only_used_copies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    used, unused = _column_major(torch.randn(96, 64)), _column_major(torch.randn(144, 64))
    set_form(used, 8, ROWS)
    calls: list[int] = []
    real = cpu_gemm.rows

    def counted(x, w, bias):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return real(x, w, bias)

    monkeypatch.setattr(cpu_gemm, "rows", counted)
    x = torch.randn(3, 4, 64)  # 12 rows: the bucket of 8
    bias = torch.randn(96)
    torch.testing.assert_close(linear(x, used, bias), F.linear(x, used, bias), **TOL)
    linear(torch.randn(4, 64), used)  # another bucket: not this form
    assert calls == [12]
    set_form(unused, 8, ROWS)
    linear(torch.randn(8, 64), unused)  # packed on first use
    assert cpu_gemm.has_packed(unused)
    set_form(unused, 8, LINEAR)
    assert matmul.prepare([used, unused]) == 96 * 64 * 4
    assert cpu_gemm.has_packed(used) and not cpu_gemm.has_packed(unused)


@needs_kernel
def test_tune_times_it_for_a_few_rows_only() -> None:
    group = [_column_major(torch.randn(96, 32)) for _ in range(2)]
    report = matmul.tune([group], rows=(1, 8, matmul.LARGE_ROWS))
    assert "rows-packed" not in report["96x32@1"]
    assert "rows-packed" in report["96x32@8"]
    assert "rows-packed" not in report[f"96x32@{matmul.LARGE_ROWS}"]


@pytest.mark.usefixtures("no_c_compiler")
def test_without_a_compiler_the_form_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_gemm, "_kernel", [])
    assert cpu_gemm.kernel() is None
    assert ROWS not in matmul.available_forms(_column_major(torch.randn(96, 32)))
    with pytest.raises(RuntimeError):
        cpu_gemm.rows(torch.randn(2, 32), _column_major(torch.randn(96, 32)), None)


@needs_kernel
def test_a_model_decoding_through_it_gives_the_reference_logits() -> None:
    """Every projection and the LM head of a batch-4 decode step through the kernel (a tiny
    Llama whose widths are multiples of 48) give transformers' logits."""
    from engine.runner import ModelRunner
    from engine.sequence import Sequence
    from tests.engine.conftest import llama_of

    hf, config, model = llama_of(5, vocab_size=240, hidden_size=192, intermediate_size=96,
                                 num_attention_heads=3, num_key_value_heads=3)
    runner = ModelRunner((config, model), num_blocks=64, block_size=16, tune_matmuls=False)
    weights = [w for group in model.projection_groups() for w in group] + [model.head_weight]
    for w in weights:
        set_form(w, 4, ROWS)
    gen = torch.Generator().manual_seed(6)
    seqs = [Sequence(f"s{i}", torch.randint(0, 240, (n,), generator=gen).tolist())
            for i, n in enumerate((5, 17, 30, 9))]
    runner.prefill(seqs)
    for i, seq in enumerate(seqs):
        seq.token_ids.append(11 * i + 1)
    logits = runner.decode(seqs)
    assert all(cpu_gemm.has_packed(w) for w in weights)  # the step went through the kernel
    with torch.inference_mode():
        for seq, got in zip(seqs, logits):
            want = hf(torch.tensor([seq.token_ids])).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@needs_kernel
def test_switched_off_it_is_not_offered_and_the_plan_key_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    weight = _column_major(torch.randn(96, 32))
    jobs = [([[weight]], (8,))]
    on = matmul.plan_key(jobs)
    monkeypatch.setenv("KVRELAY_CPU_GEMM", "0")
    assert ROWS not in matmul.available_forms(weight)
    with pytest.raises(RuntimeError):
        set_form(weight, 8, ROWS)
    assert matmul.plan_key(jobs) != on  # a plan measured with it is not read without it
