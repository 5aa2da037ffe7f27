"""Triton SSD (refrag_kernels.ssd) against the reference oracles: forward, every gradient, varlen,
doc_mode, grouped B/C, padding, every autotune config, and input validation.

Tolerance rule: the kernel's error against the fp64 reference is at most twice the error
of the same reference code run in the kernel's dtype, plus a small dtype-tied atol.
"""
import pytest
import torch

from refrag_kernels import reference as R
from refrag_kernels import ssd_scan
from refrag_kernels.layout import DocLayout
from refrag_kernels.ssd import CONFIGS, ssd_scan_triton
from refrag_kernels.ssd.tuning import SMEM_LIMIT_BYTES, TILES, prune_by_shared_memory, smem_estimate

F64 = torch.float64
ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def cu(*lengths, device="cpu"):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def doc_row(length, spans):
    """(length,) doc ids: the k-th (start, end) span gets id k, the rest 0."""
    docs = torch.zeros(length, dtype=torch.int64)
    for k, (s, e) in enumerate(spans, start=1):
        docs[s:e] = k
    return docs


def make_case(b=1, L=63, h=2, p=16, n=16, g=1, seqs=None, D=None, z=False, dt_bias=False, softplus=False,
              init=False, docs=None, chunk_size=16, seed=0):
    """fp64 tensors (differentiable inputs) and static kwargs of one ssd_scan call."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    floats = dict(x=rnd(b, L, h, p), dt=torch.rand(b, L, h, generator=gen, dtype=F64) * 0.5 + 0.05,
                  A=-torch.rand(h, generator=gen, dtype=F64) * 1.5 - 0.1, B=rnd(b, L, g, n), C=rnd(b, L, g, n))
    if D == "h":
        floats["D"] = rnd(h)
    elif D == "hp":
        floats["D"] = rnd(h, p)
    if z:
        floats["z"] = rnd(b, L, h, p)
    if dt_bias:
        floats["dt_bias"] = rnd(h) * 0.5
        floats["dt"] = floats["dt"] - 0.3
    static = dict(chunk_size=chunk_size, dt_softplus=softplus)
    num_states = b
    if seqs is not None:
        static["cu_seqlens"] = cu(*seqs)
        num_states = len(seqs)
        end = int(static["cu_seqlens"][-1])
        for name in ("x", "dt", "B", "C", "z"):
            if name in floats:  # padding holds large garbage that must not leak anywhere
                floats[name][:, end:] = 1e3
    if init:
        floats["initial_states"] = rnd(num_states, h, p, n)
    if docs is not None:
        static.update(doc_ids=docs, doc_mode=True)
    return floats, static


def on(device, kwargs):
    """kwargs with every tensor moved to device."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def run(fn, floats, static, dtype, device, grad_seed=1, with_final=True):
    """Outputs and gradients of fn (y and final state, then d<name> per input)."""
    leaves = {}
    for name, t in floats.items():
        state_dtype = F64 if dtype == F64 else torch.float32
        leaves[name] = t.to(device, state_dtype if name == "initial_states" else dtype).clone().requires_grad_()
    y, final = fn(**leaves, **on(device, static), return_final_states=True)
    gen = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=gen, dtype=F64).to(device, y.dtype)
    gf = torch.randn(final.shape, generator=gen, dtype=F64).to(device, final.dtype)
    if with_final:
        torch.autograd.backward([y, final], [gy, gf])
    else:
        y.backward(gy)
    out = {"y": y, "final": final}
    out.update({"d" + k: v.grad for k, v in leaves.items()})
    return out


def check_against_reference(floats, static, dtype, device, fn=ssd_scan, with_final=True):
    got = run(fn, floats, static, dtype, device, with_final=with_final)
    exact = run(R.ssd_scan, floats, static, F64, "cpu", with_final=with_final)
    low = run(R.ssd_scan, floats, static, dtype, "cpu", with_final=with_final)
    for name, ref in exact.items():
        assert got[name] is not None, f"{name}: no gradient"
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"
        err, ref_err = rel_err(got[name].cpu(), ref), rel_err(low[name], ref)
        assert err <= 2 * ref_err + ATOL[dtype], f"{name}: error {err:.3e} vs reference-in-{dtype} {ref_err:.3e}"
    return got


# Document layouts: a block of 12 documents (one of a single token) opening a sequence,
# a length-1 sequence, then shared text, a 3-document block, shared text and a block of
# two documents (the last of one token) that ends the sequence.
DOCS_12 = doc_row(90, [(0, 2), (2, 5), (5, 6), (6, 9), (9, 12), (12, 14), (14, 17), (17, 20), (20, 22), (22, 25),
                       (25, 28), (28, 30), (45, 52), (52, 53), (53, 71), (81, 89), (89, 90)])
TINY_SEQS = [int(v) for v in torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(3))]

CASES = [
    pytest.param(dict(b=2, L=63, D="h", z=True, init=True), id="b2-T63-H2-g1-D_h-z-init"),
    pytest.param(dict(L=70, seqs=[1, 0, 16, 33, 13], h=2, g=2, D="hp", dt_bias=True, softplus=True, init=True),
                 id="varlen-len1-len0-T63-pad7-g2-D_hp-softplus-init"),
    pytest.param(dict(L=sum(TINY_SEQS) + 2, seqs=TINY_SEQS, h=1, p=8, n=8), id="varlen-40-tiny"),
    pytest.param(dict(L=200, seqs=[197], h=1, chunk_size=32, z=True), id="one-long-T197-chunk32"),
    pytest.param(dict(L=90, seqs=[40, 1, 49], h=2, g=1, D="h", z=True, dt_bias=True, softplus=True, init=True,
                      docs=DOCS_12), id="docmode-17docs-g1-all-options"),
    pytest.param(dict(b=2, L=37, docs=torch.stack([doc_row(37, [(5, 20)]), doc_row(37, [(0, 10), (10, 11)])]),
                      init=True), id="docmode-b2-doc-at-row-start"),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_fp32(case, device):
    check_against_reference(*make_case(**case), torch.float32, device)


@pytest.mark.parametrize("case", CASES[:2])
def test_forward_and_gradients_fp16(case, device):
    check_against_reference(*make_case(**case), torch.float16, device)


def test_gradients_without_final_state_gradient(device):
    floats, static = make_case(L=45, seqs=[20, 25], init=True, D="h", docs=doc_row(45, [(3, 9), (9, 15)]))
    check_against_reference(floats, static, torch.float32, device, with_final=False)


def test_matches_token_by_token_recurrence(device):
    floats, static = make_case(**CASES[4].values[0])
    y, final = ssd_scan(**{k: v.to(device, torch.float32) for k, v in floats.items()}, **on(device, static),
                        return_final_states=True)
    static.pop("chunk_size")
    y_seq, final_seq = R.ssd_scan_sequential(**floats, **static, return_final_states=True)
    assert rel_err(y.cpu(), y_seq) < 1e-5
    assert rel_err(final.cpu(), final_seq) < 1e-5


def test_padding_rows_are_zero_with_zero_gradients(device):
    floats, static = make_case(**CASES[1].values[0])
    got = run(ssd_scan, floats, static, torch.float32, device)
    end = int(static["cu_seqlens"][-1])
    assert got["y"][0, end:].abs().max() == 0
    for name in ("dx", "ddt", "dB", "dC", "dz"):
        if got.get(name) is not None:
            assert got[name][0, end:].abs().max() == 0, name


def test_all_sequences_empty_pass_initial_states_through(device):
    floats, static = make_case(L=5, seqs=[0, 0], init=True, D="h")
    leaves = {k: v.to(device, torch.float32).requires_grad_() for k, v in floats.items()}
    y, final = ssd_scan(**leaves, **on(device, static), return_final_states=True)
    grad_final = torch.randn_like(final)
    torch.autograd.backward([y, final], [torch.ones_like(y), grad_final])
    assert y.abs().max() == 0 and leaves["x"].grad.abs().max() == 0
    assert torch.equal(final, leaves["initial_states"].detach())
    assert torch.equal(leaves["initial_states"].grad, grad_final)


# doc_mode chunks are not split at documents (kernels.ssd.chunks): layouts that put every kind
# of document boundary inside a 16-token chunk. Sequence 1 (70 tokens): shared text, a
# document longer than a chunk starting mid-chunk, documents ending and starting mid-chunk, a
# block opening mid-chunk after shared text and a block that ends the sequence. Sequence 2:
# a block of many tiny (and single-token) documents at the sequence start. Sequence 3: two
# blocks within one chunk (the chunk ends before the second) and a single-token block.
DOC_GEOMETRY = doc_row(130, [(5, 30), (30, 34), (34, 53), (60, 61), (61, 70),
                             (70, 71), (71, 72), (72, 74), (74, 75), (75, 78), (78, 79), (79, 80), (80, 83),
                             (83, 84), (84, 86), (86, 87), (87, 88), (88, 96),
                             (100, 102), (102, 103), (104, 107), (110, 111), (112, 129)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_doc_mode_boundaries_inside_chunks(dtype, device):
    floats, static = make_case(L=132, seqs=[70, 30, 30], h=2, g=2, p=8, n=8, D="h", z=dtype == torch.float32,
                               dt_bias=True, softplus=True, init=True, docs=torch.nn.functional.pad(DOC_GEOMETRY, (0, 2)))
    check_against_reference(floats, static, dtype, device)


def test_doc_mode_chunks_are_full():
    """Documents no longer split chunks: only examples (and two blocks in one chunk) do."""
    layout = DocLayout.from_cu_seqlens(cu(70, 30, 30), DOC_GEOMETRY)
    table = layout.chunk_table(16, doc_mode=True)
    plain = [row[:2] for row in layout.chunk_table(16).chunks.tolist()]
    assert [row[:2] for row in table.chunks.tolist() if row[0] < 100] == [row for row in plain if row[0] < 100]
    # sequence 3 holds four blocks in 30 tokens: a chunk ends where a second block would start a document
    assert [row[:3] for row in table.chunks.tolist() if row[0] >= 100] == [
        [100, 104, 0], [104, 110, 0], [110, 112, 0], [112, 128, 0], [128, 130, 23]]


# Under the interpreter num_warps and num_stages change nothing: one config per tile shape there.
TESTED_CONFIGS = CONFIGS if torch.cuda.is_available() else [
    next(c for c in CONFIGS if (c.kwargs["BK"], c.kwargs["BV"]) == tile) for tile in TILES]


@pytest.mark.parametrize("config", [pytest.param(c, id=f"BK{c.kwargs['BK']}-BV{c.kwargs['BV']}-w{c.num_warps}"
                                                  f"-s{c.num_stages}") for c in TESTED_CONFIGS])
def test_every_config_is_correct(config, device):
    floats, static = make_case(L=36, seqs=[14, 20], p=40, n=40, D="h", init=True,
                               docs=doc_row(36, [(16, 22), (22, 23)]))

    def pinned(*args, **kwargs):
        return ssd_scan_triton(*args, **kwargs, config=config)

    check_against_reference(floats, static, torch.float32, device, fn=pinned)


def test_autotune_space_is_pruned_to_the_rtx4070_shared_memory():
    """num_stages 2-4 and num_warps 2-8 are in the space; at chunk 64 the pruned list keeps
    only configs under 99 KB (bf16, fp32), and a chunk no config fits keeps the smallest."""
    assert {c.num_stages for c in CONFIGS} == {2, 3, 4} and {c.num_warps for c in CONFIGS} == {2, 4, 8}
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(1, 1, 1, dtype=dtype)
        kept = prune_by_shared_memory(CONFIGS, {"x": x}, BT=64)
        assert kept and all(smem_estimate(c, 64, x.element_size()) <= SMEM_LIMIT_BYTES for c in kept)
        assert len(kept) < len(CONFIGS)
    assert len(prune_by_shared_memory(CONFIGS, {"x": torch.empty(1)}, BT=256)) >= 1


def _bad(**changes):
    floats, static = make_case(L=20, seqs=[8, 12], init=True)
    kwargs = {k: v.float() for k, v in floats.items()}
    kwargs.update(static)
    kwargs.update(changes)
    return kwargs


BAD_INPUTS = [
    pytest.param(_bad(x=torch.randn(1, 20, 2, 16, 1)), "x must be", id="x-5d"),
    pytest.param(_bad(dt=torch.rand(1, 20, 3)), "dt must have shape", id="dt-heads"),
    pytest.param(_bad(A=torch.rand(3)), "A must have shape", id="A-shape"),
    pytest.param(_bad(B=torch.randn(1, 20, 3, 16), C=torch.randn(1, 20, 3, 16)), "multiple of the number of groups",
                 id="groups-not-dividing-heads"),
    pytest.param(_bad(C=torch.randn(1, 20, 1, 8)), "C must have shape", id="C-vs-B"),
    pytest.param(_bad(D=torch.randn(3)), "D must have shape", id="D-shape"),
    pytest.param(_bad(z=torch.randn(1, 19, 2, 16)), "z must have shape", id="z-shape"),
    pytest.param(_bad(dt_bias=torch.randn(2, 1)), "dt_bias must have shape", id="dt_bias-shape"),
    pytest.param(_bad(chunk_size=48), "power of two", id="chunk-not-pow2"),
    pytest.param(_bad(chunk_size=8), "power of two >= 16", id="chunk-too-small"),
    pytest.param(_bad(x=torch.randn(2, 20, 2, 16), dt=torch.rand(2, 20, 2), B=torch.randn(2, 20, 1, 16),
                      C=torch.randn(2, 20, 1, 16)), "batch size 1", id="varlen-batch2"),
    pytest.param(_bad(cu_seqlens=torch.tensor([0, 12, 8], dtype=torch.int32)), "non-decreasing", id="cu-decreasing"),
    pytest.param(_bad(cu_seqlens=torch.tensor([0, 8, 21], dtype=torch.int32)), "only 20 tokens", id="cu-too-long"),
    pytest.param(_bad(initial_states=torch.randn(3, 2, 16, 16)), "initial_states must have shape", id="init-count"),
    pytest.param(_bad(doc_mode=True), "doc_mode=True needs doc_ids", id="docmode-no-ids"),
    pytest.param(_bad(doc_ids=torch.zeros(19, dtype=torch.int64), doc_mode=True), "doc_ids must have shape",
                 id="doc-ids-shape"),
    pytest.param(_bad(x=torch.zeros(1, 20, 2, 16, dtype=torch.int32)), "x must be fp16", id="x-int"),
    pytest.param(_bad(doc_ids=torch.zeros(20, dtype=torch.int64)), "doc_ids given with doc_mode=False",
                 id="doc-ids-without-doc-mode"),
    pytest.param(_bad(cu_seqlens=[0, 8, 20]), "cu_seqlens must be a torch.Tensor", id="cu-list"),
    pytest.param(_bad(layout=DocLayout.from_examples([(8, []), (12, [])])), "either layout or cu_seqlens",
                 id="layout-and-cu"),
    pytest.param(_bad(cu_seqlens=None, layout=DocLayout.from_examples([(21, [])])), "layout covers 21 tokens",
                 id="layout-too-long"),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUTS)
def test_bad_inputs_raise(kwargs, match, device):
    with pytest.raises(ValueError, match=match):
        ssd_scan(**on(device, kwargs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp64 is rejected only on the Triton path")
def test_fp64_is_rejected_on_the_triton_path():
    floats, static = make_case(L=20)
    with pytest.raises(ValueError, match="computes in fp32"):
        ssd_scan(**floats, **static)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_bf16(case, device):
    check_against_reference(*make_case(**case), torch.bfloat16, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mamba2_sizes_autotuned(dtype, device):
    docs = doc_row(1500, [(100, 400), (400, 401), (401, 900)])
    case = dict(L=1500, seqs=[1000, 1, 450], h=8, p=64, n=128, g=2, D="h", z=True, dt_bias=True, softplus=True,
                init=True, docs=docs, chunk_size=64)
    check_against_reference(*make_case(**case), dtype, device)


@pytest.mark.gpu
def test_offsets_past_int32(device):
    """x holds more than 2^31 elements: the last sequence must match the reference run alone."""
    h, p, n, L, tail = 128, 64, 16, 270_000, 100
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, L, h, p, device=device, dtype=torch.bfloat16, generator=gen)
    assert x.numel() > 2**31
    dt = torch.rand(1, L, h, device=device, generator=gen) * 0.1
    A = -torch.rand(h, device=device, generator=gen) - 0.1
    B = torch.randn(1, L, 1, n, device=device, dtype=torch.bfloat16, generator=gen)
    C = torch.randn(1, L, 1, n, device=device, dtype=torch.bfloat16, generator=gen)
    cu_seqlens = torch.tensor([0, L - tail, L], dtype=torch.int32, device=device)
    y, final = ssd_scan(x, dt, A, B, C, cu_seqlens=cu_seqlens, return_final_states=True)
    part = [t[:, L - tail:] for t in (x, dt)]
    y_ref, final_ref = R.ssd_scan(part[0], part[1], A, B[:, L - tail:], C[:, L - tail:], return_final_states=True)
    assert rel_err(y[:, L - tail:], y_ref) < 2e-2
    assert rel_err(final[1:], final_ref) < 2e-2


@pytest.mark.parametrize("doc_mode", [False, True], ids=["plain", "doc_mode"])
def test_layout_equals_keyword_form(doc_mode, device):
    """layout= and cu_seqlens/doc_ids give bitwise the same outputs and gradients; without
    doc_mode a layout's documents are ignored."""
    layout = DocLayout.from_examples([(1, []), (0, []), (16, [(2, 5), (5, 9)]), (33, [(0, 1), (20, 30)])],
                                     device=device)
    floats, static = make_case(L=56, seqs=[1, 0, 16, 33], D="h", z=True, dt_bias=True, softplus=True, init=True)
    keyword = dict(static)
    if doc_mode:
        keyword.update(doc_ids=torch.nn.functional.pad(layout.doc_ids.cpu(), (0, 6)), doc_mode=True)
    want = run(ssd_scan, floats, keyword, torch.float32, device)
    static.pop("cu_seqlens")
    got = run(ssd_scan, floats, dict(static, layout=layout, doc_mode=doc_mode), torch.float32, device)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA a positive A is a device-side assert, which ends "
                                                      "the process's CUDA context")
def test_positive_A_is_rejected():
    with pytest.raises(ValueError, match="A must be <= 0"):
        ssd_scan(**_bad(A=torch.tensor([-0.5, 0.25])))


# ---------------------------------------------------------------- the "torch" path (CPU without the interpreter)
TORCH_PATH_CASES = CASES + [pytest.param(
    dict(L=132, seqs=[70, 30, 30], h=2, g=2, p=8, n=8, D="h", z=True, dt_bias=True, softplus=True, init=True,
         docs=torch.nn.functional.pad(DOC_GEOMETRY, (0, 2))), id="docmode-geometry-g2"),
    # rows that are whole sequences (no cu_seqlens, no documents) take the path's row branch
    pytest.param(dict(b=3, L=7, h=2, g=2, D="hp", z=True, dt_bias=True, softplus=True, init=True),
                 id="rows-shorter-than-a-chunk"),
    pytest.param(dict(b=2, L=1, D="h", init=True), id="rows-one-token"),
    pytest.param(dict(b=1, L=48, init=True, z=True), id="rows-three-full-chunks"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TORCH_PATH_CASES)
def test_torch_path_forward_and_gradients(case, dtype):
    from refrag_kernels.ssd import torch_path

    check_against_reference(*make_case(**case), dtype, "cpu", fn=torch_path.ssd_scan)


@pytest.mark.parametrize("case", TORCH_PATH_CASES)
def test_torch_path_matches_the_recurrence_in_fp64(case):
    """In fp64 the vectorised path and the token-by-token recurrence agree to rounding, every gradient too."""
    from refrag_kernels.ssd import torch_path

    floats, static = make_case(**case)
    got = run(torch_path.ssd_scan, floats, static, F64, "cpu")
    static.pop("chunk_size")
    want = run(R.ssd_scan_sequential, floats, static, F64, "cpu")
    for name, ref in want.items():
        assert rel_err(got[name], ref) < 1e-10, name


def test_torch_path_empty_sequences_and_the_backend_switch():
    from refrag_kernels import use_backend
    from refrag_kernels.ssd import torch_path

    floats, static = make_case(L=5, seqs=[0, 0], init=True, D="h")
    y, final = torch_path.ssd_scan(**floats, **static, return_final_states=True)
    assert y.abs().max() == 0 and torch.equal(final, floats["initial_states"])
    floats, static = make_case(**CASES[4].values[0])
    with use_backend("torch", ops="ssd_scan"):
        y = ssd_scan(**{k: v.float() for k, v in floats.items()}, **static)
    assert torch.equal(y, torch_path.ssd_scan(**{k: v.float() for k, v in floats.items()}, **static))
