"""The performance meter (bench.meter) counts exactly what it claims, on kernels and torch code
whose traffic, FLOPs and host reads are known in closed form, and restores every hook it installs."""
import pytest
import torch
import triton
import triton.language as tl

from bench.meter import interpreting, measure, metering

pytestmark = pytest.mark.skipif(not interpreting(), reason="the meter counts Triton launches in the interpreter")


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _reread(src, dst, BLOCK: tl.constexpr):
    """Every program reads the same block and writes its own."""
    offs = tl.arange(0, BLOCK)
    tl.store(dst + tl.program_id(0) * BLOCK + offs, tl.load(src + offs))


@triton.jit
def _every_other(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = (offs % 2 == 0) & (offs < n)
    x = tl.load(src + offs, mask=keep, other=0.0)
    tl.store(dst + offs, x.to(tl.float16), mask=offs < n)


@triton.jit
def _gemm(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        rk = k + tl.arange(0, BK)
        x = tl.load(a + rm[:, None] * K + rk[None, :])
        y = tl.load(b + rk[:, None] * N + rn[None, :])
        acc += tl.dot(x, y)
    tl.store(c + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def _count(counter, BLOCK: tl.constexpr):
    tl.atomic_add(counter + tl.arange(0, BLOCK), 1)


def test_copy_kernel_with_masked_tail():
    n, block = 1000, 128
    src, dst = torch.randn(n), torch.empty(n)
    m = measure(lambda: _copy[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block))
    assert torch.equal(src, dst)
    stats = m.kernels["_copy"]
    assert (m.launches, stats.programs) == (1, 8)
    assert (m.read_bytes, m.write_bytes) == (4 * n, 4 * n)  # the masked tail (1024 - 1000) moves nothing
    assert m.unique_bytes == m.logical_bytes == 8 * n
    assert not m.dot_flops and m.num_aten_ops == 0 and m.host_syncs == 0


def test_unique_bytes_count_each_address_once_per_launch():
    block, programs = 64, 5
    src, dst = torch.randn(block, dtype=torch.float16), torch.empty(programs * block, dtype=torch.float16)

    def twice():
        _reread[(programs,)](src, dst, BLOCK=block)
        _reread[(programs,)](src, dst, BLOCK=block)

    m = measure(twice)
    stats = m.kernels["_reread"]
    assert (stats.launches, stats.programs) == (2, 2 * programs)
    assert stats.read_bytes == 2 * programs * block * 2
    assert stats.unique_read_bytes == 2 * block * 2  # once per launch: nothing is cached between kernels
    assert stats.write_bytes == stats.unique_write_bytes == 2 * programs * block * 2


def test_masked_elements_move_no_bytes():
    n, block = 50, 64
    src, dst = torch.randn(n), torch.empty(n, dtype=torch.float16)
    m = measure(lambda: _every_other[(1,)](src, dst, n, BLOCK=block))
    assert m.read_bytes == m.kernels["_every_other"].unique_read_bytes == 4 * 25  # even offsets below 50
    assert m.write_bytes == 2 * n


def test_gemm_dot_flops_dtypes_and_bytes():
    M, N, K, BM, BN, BK = 32, 48, 64, 16, 16, 32
    a, b = torch.randn(M, K, dtype=torch.float16), torch.randn(K, N, dtype=torch.float16)
    c = torch.empty(M, N)
    m = measure(lambda: _gemm[(M // BM, N // BN)](a, b, c, M, N, K, BM=BM, BN=BN, BK=BK))
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-3, atol=1e-3)
    assert m.dot_flops == {"fp16": 2 * M * N * K}
    programs = (M // BM) * (N // BN)
    assert m.read_bytes == programs * K * (BM + BN) * 2  # each program streams its A rows and B columns
    assert m.kernels["_gemm"].unique_read_bytes == (M * K + K * N) * 2
    assert m.write_bytes == m.kernels["_gemm"].unique_write_bytes == M * N * 4

    a32, b32 = a.float(), b.float()
    m32 = measure(lambda: _gemm[(M // BM, N // BN)](a32, b32, c, M, N, K, BM=BM, BN=BN, BK=BK))
    assert m32.dot_flops == {"fp32/tf32": 2 * M * N * K}


def test_atomics_read_and_write():
    counter = torch.zeros(16, dtype=torch.int32)
    m = measure(lambda: _count[(3,)](counter, BLOCK=16))
    assert counter.tolist() == [3] * 16
    assert m.read_bytes == m.write_bytes == 3 * 16 * 4
    assert m.kernels["_count"].unique_read_bytes == 16 * 4


def test_torch_ops_bytes_views_and_host_reads():
    x = torch.randn(8, 16)

    def step():
        y = x.view(16, 8).t()  # views: free
        z = y + 1  # 128 floats in, 128 out
        flag = bool(z.sum() > 0)  # sum, gt, then a host read
        n = int(torch.nonzero(z > 0).shape[0])  # nonzero syncs; int() of a Python int is free
        values = z[0].tolist()  # host read
        first = z[0, 0].item()  # host read (its _local_scalar_dense is not a second sync)
        return flag, n, values, first

    m = measure(step, kernels=False)
    assert "view" not in m.aten_ops and "t" not in m.aten_ops
    assert m.aten_ops["add.Tensor"] == 1 and m.aten_op_bytes["add.Tensor"] == 2 * 128 * 4
    assert m.host_reads == {"bool": 1, "tolist": 1, "item": 1}
    assert m.sync_ops == {"nonzero": 1}
    assert m.host_syncs == 4
    assert m.launches == 0


def test_torch_gemm_flops_by_dtype():
    """torch GEMMs (torch's FLOP formulas: 2 M N K) by operand dtype; elementwise ops have none."""
    a, b = torch.randn(8, 4, dtype=torch.float16), torch.randn(4, 6, dtype=torch.float16)
    c = torch.zeros(8, 6)
    m = measure(lambda: (a @ b, torch.addmm(c, a.float(), b.float(), out=c), c + 1), kernels=False)
    assert m.aten_op_flops == {"mm": {"fp16": 2 * 8 * 6 * 4}, "addmm.out": {"fp32/ieee": 2 * 8 * 6 * 4}}
    assert m.aten_flops == {"fp16": 384, "fp32/ieee": 384} and m.summary()["aten_flops"] == dict(m.aten_flops)
    assert (m + m).aten_flops == {"fp16": 768, "fp32/ieee": 768}


def test_hooks_are_restored_even_on_error():
    from triton.runtime import interpreter

    before = (interpreter.InterpreterBuilder.create_masked_load, interpreter.GridExecutor.__call__,
              torch.Tensor.item, torch.Tensor.__bool__)
    with pytest.raises(ZeroDivisionError):
        with metering():
            torch.ones(1).item()
            1 / 0
    after = (interpreter.InterpreterBuilder.create_masked_load, interpreter.GridExecutor.__call__,
             torch.Tensor.item, torch.Tensor.__bool__)
    assert before == after
    assert "item" not in vars(torch.Tensor) or torch.Tensor.item is before[2]
    with pytest.raises(RuntimeError, match="nest"):
        with metering():
            with metering():
                pass


def test_regions_add_up():
    n, block = 256, 128
    src, dst = torch.randn(n), torch.empty(n)
    launch = lambda: _copy[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)  # noqa: E731
    one = measure(lambda: (launch(), src.sum().item()))
    two = one + measure(launch)
    assert (two.launches, two.kernels["_copy"].programs, two.logical_bytes) == (2, 4, 2 * one.logical_bytes)
    assert two.host_reads == {"item": 1} and two.aten_ops == one.aten_ops


@pytest.fixture(scope="module")
def small_rows():
    """The meter's own runner on small shapes: the SSD scan, the cross-entropy (10% and 100% of
    targets counted) and the attention block, each forward and forward+backward."""
    import dataclasses

    from bench.meter.__main__ import meter_case
    from bench.meter.cases import CASES

    first = {}
    for c in CASES:
        if c.name in ("ssd_scan", "fused_linear_cross_entropy", "AttentionBlock") and "fwd" in c.modes:
            first.setdefault((c.name, c.variant), c)
    return [row for case in first.values() for row in meter_case(dataclasses.replace(case, L=64))]


def test_meter_rows_are_consistent(small_rows):
    assert {r["case"] for r in small_rows} == {"ssd_scan", "fused_linear_cross_entropy", "AttentionBlock"}
    for r in small_rows:
        assert r["launches"] > 0 and r["min_bytes"] > 0
        assert 0 < r["unique_bytes"] <= r["logical_bytes"]
        assert r["total_over_min"] >= r["unique_over_min"] > 0
        for gpu in ("H100", "RTX4070"):
            assert r[f"model_us_{gpu}"] > r[f"min_us_{gpu}"] > 0
        assert sum(k["launches"] for k in r["detail"]["kernels"].values()) == r["launches"]
    by = {(r["case"], r["variant"], r["mode"]): r for r in small_rows}
    for (case, variant, mode), r in by.items():
        if mode == "fwd_bwd":
            fwd = by[(case, variant, "fwd")]
            assert r["launches"] >= fwd["launches"] and r["min_bytes"] > fwd["min_bytes"]  # CE: grads in fwd
    ssd = by[("ssd_scan", "D,z,dt_bias,softplus,varlen,doc_mode", "fwd")]
    # the kernels' tiles cover at least the cost model's useful work
    assert sum(ssd["dot_flops"].values()) >= ssd["min_flops"] > 0


def test_meter_markdown_names_the_model(small_rows):
    from bench.meter.__main__ import markdown

    table = markdown(small_rows, {"torch": "x", "triton": "y"})
    assert "roofline MODEL, not measurements" in table
    assert table.count("| ssd_scan |") == 2


def test_check_reports_changed_counts(small_rows):
    import copy

    from bench.meter.__main__ import compare

    assert compare(small_rows, small_rows) == []
    changed = copy.deepcopy(small_rows)
    changed[0]["unique_bytes"] += 1
    diffs = compare(small_rows, changed)
    assert len(diffs) == 1 and "unique_bytes" in diffs[0]
