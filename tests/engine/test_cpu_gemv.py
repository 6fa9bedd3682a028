"""kvrelay's single-row kernel (``engine.cpu_gemv``): built on first use with the machine's
C compiler, equal to ``F.linear`` to float rounding, and simply not offered where it cannot
be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import ckernels, cpu_gemv, matmul
from engine.matmul import GEMV, linear, set_form
from engine.model import _column_major

TOL: dict[str, float] = {"atol": 1e-4, "rtol": 1e-5}
needs_kernel = pytest.mark.skipif(cpu_gemv.kernel() is None, reason="no C compiler here")


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(5, 3), (960, 576), (577, 131),
                                                      (64, 1000), (1, 700)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_row_equals_f_linear(out_features: int, in_features: int, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(out_features + in_features)
        weight = _column_major(torch.randn(out_features, in_features))
        row, bias = torch.randn(1, in_features), torch.randn(out_features)
        torch.testing.assert_close(cpu_gemv.gemv(row, weight, bias), F.linear(row, weight, bias),
                                   **TOL)
        torch.testing.assert_close(cpu_gemv.gemv(row, weight, None), F.linear(row, weight), **TOL)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_what_it_cannot_multiply_is_refused_not_misread() -> None:
    weight = _column_major(torch.randn(48, 32))
    with pytest.raises(RuntimeError):
        cpu_gemv.gemv(torch.randn(2, 32), weight, None)  # two rows
    with pytest.raises(RuntimeError):
        cpu_gemv.gemv(torch.randn(1, 32), weight.contiguous(), None)  # row-major
    with pytest.raises(RuntimeError):
        cpu_gemv.gemv(torch.randn(1, 32), weight.double(), None)
    with pytest.raises(RuntimeError):
        cpu_gemv.gemv(torch.randn(1, 31), weight, None)
    assert not cpu_gemv.supports(weight[:40])  # a band of rows of a bigger weight


@needs_kernel
def test_the_plan_sends_single_rows_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matmul, "_plan", {})
    weight = _column_major(torch.randn(96, 64))
    set_form(weight, 1, GEMV)
    calls: list[int] = []
    real = cpu_gemv.gemv

    def counted(row, w, bias):  # type: ignore[no-untyped-def]
        calls.append(row.shape[0])
        return real(row, w, bias)

    monkeypatch.setattr(cpu_gemv, "gemv", counted)
    x = torch.randn(1, 1, 64)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), **TOL)
    linear(torch.randn(3, 64), weight)  # another bucket: not this form
    assert calls == [1]


@pytest.mark.usefixtures("no_c_compiler")
def test_without_a_compiler_the_form_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_gemv, "_kernel", [])
    assert cpu_gemv.kernel() is None
    assert GEMV not in matmul.available_forms(_column_major(torch.randn(48, 32)))
    with pytest.raises(RuntimeError):
        cpu_gemv.gemv(torch.randn(1, 32), _column_major(torch.randn(48, 32)), None)


def test_the_kernel_is_built_once_and_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if cpu_gemv._compiler() is None:
        pytest.skip("no C compiler here")
    built = cpu_gemv._build(tmp_path)
    assert built is not None and built.exists()
    monkeypatch.setattr(ckernels.subprocess, "run", None)  # would fail if called again
    assert cpu_gemv._build(tmp_path) == built
