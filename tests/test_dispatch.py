"""The backend switch (refrag_kernels.use_backend): which path an op takes, and that the choice is
scoped, per op when asked, and restored on errors."""
import pytest
import torch

import refrag_kernels
from refrag_kernels import reference
from refrag_kernels.common import dispatch


def _conv_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 12, 8, generator=gen), torch.randn(8, 3, generator=gen)


def test_reference_backend_runs_the_oracle_exactly():
    x, w = _conv_inputs()
    with refrag_kernels.use_backend("reference"):
        y = refrag_kernels.causal_conv1d(x, w)
    assert torch.equal(y, reference.causal_conv1d(x, w))


@pytest.mark.skipif(not dispatch.INTERPRET, reason="needs the Triton interpreter on CPU")
def test_per_op_choice_leaves_the_other_ops_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "causal_conv1d", lambda *a, **k: calls.append("conv") or a[0])
    x, w = _conv_inputs()
    with refrag_kernels.use_backend("reference", ops="doc_attention"):
        assert refrag_kernels.current_backend("doc_attention") == "reference"
        assert refrag_kernels.current_backend("causal_conv1d") == "auto"
        refrag_kernels.causal_conv1d(x, w)  # still the Triton kernel (interpreter)
    assert calls == []
    with refrag_kernels.use_backend("reference", ops=["causal_conv1d"]):
        refrag_kernels.causal_conv1d(x, w)
    assert calls == ["conv"]


def test_choice_is_restored_after_an_error_and_nests():
    with pytest.raises(RuntimeError, match="boom"), refrag_kernels.use_backend("reference"):
        with refrag_kernels.use_backend("auto", ops="ssd_scan"):
            assert refrag_kernels.current_backend("ssd_scan") == "auto"
            assert refrag_kernels.current_backend("doc_attention") == "reference"
        assert refrag_kernels.current_backend("ssd_scan") == "reference"
        raise RuntimeError("boom")
    assert refrag_kernels.current_backend() == "auto" and refrag_kernels.current_backend("ssd_scan") == "auto"


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        with refrag_kernels.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with refrag_kernels.use_backend("reference", ops="ssd"):
            pass
    assert refrag_kernels.current_backend() == "auto"


def test_triton_backend_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    x, w = _conv_inputs()
    # auto: the torch path (rows without a layout: the oracle's sums in another order)
    torch.testing.assert_close(refrag_kernels.causal_conv1d(x, w), reference.causal_conv1d(x, w), atol=1e-6, rtol=1e-6)
    with refrag_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        refrag_kernels.causal_conv1d(x, w)


def test_every_public_op_is_switchable():
    public = {name for name in refrag_kernels.__all__ if name[0].islower() and name not in
              ("use_backend", "set_backend", "current_backend")}
    assert public <= set(dispatch.OPS)


def test_interpreter_switched_on_after_import_warns_that_the_reference_runs():
    """TRITON_INTERPRET is read when the kernels are defined; set later, it cannot take effect."""
    import os
    import subprocess
    import sys

    code = (
        "import os, warnings, torch, refrag_kernels\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    refrag_kernels.causal_conv1d(torch.randn(1, 8, 4), torch.randn(4, 3))\n"
        "    refrag_kernels.causal_conv1d(torch.randn(1, 8, 4), torch.randn(4, 3))\n"
        "print(len(caught), caught[0].message if caught else '')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 ") and "set after `import refrag_kernels`" in out.stdout
    assert "reference" in out.stdout


def _attention_inputs(nonfinite=False):
    from refrag_kernels import DocLayout

    layout = DocLayout.from_examples([(9, [(2, 5), (5, 7)]), (6, [])])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 15, 2, 32, generator=gen) for _ in range(3))
    if nonfinite:
        v[0, 3, 1, 4] = float("nan")
    return q, k, v, layout


def test_auto_on_cpu_without_interpreter_takes_the_torch_path(monkeypatch):
    """doc_attention's fast path (dense-mask SDPA) is what CPU training without the interpreter runs;
    its answers are the oracle's (tests/test_doc_attention.py checks them in detail)."""
    import importlib

    attention_module = importlib.import_module("refrag_kernels.doc_attention")  # the name is also the function's
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    calls = []
    real = attention_module._sdpa_doc_attention
    monkeypatch.setattr(attention_module, "_sdpa_doc_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, layout = _attention_inputs()
    o = refrag_kernels.doc_attention(q, k, v, layout=layout)
    assert calls == [1]
    with refrag_kernels.use_backend("reference"):
        torch.testing.assert_close(o, refrag_kernels.doc_attention(q, k, v, layout=layout), rtol=1e-5, atol=1e-6)
    assert refrag_kernels.causal_conv1d(*_conv_inputs()) is not None  # ops without a torch path: the reference
    # the oracle serves what the torch path does not: lse, non-finite inputs (isolated there), fp16
    refrag_kernels.doc_attention(q, k, v, layout=layout, return_lse=True)
    refrag_kernels.doc_attention(*_attention_inputs(nonfinite=True)[:3], layout=layout)
    refrag_kernels.doc_attention(q.half(), k.half(), v.half(), layout=layout)
    assert calls == [1]
