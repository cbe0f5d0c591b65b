"""Self-tests of the Metal emulator (tests/metal_emu): each check must catch the bug it is
for, and the emulated MSL functions must match a NumPy model."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metal_emu import emu  # noqa: E402

SELFTEST = Path(__file__).resolve().parent / "metal_emu" / "selftest"
DTYPES = [0, 1, 2]  # float, half, bfloat


@pytest.fixture(scope="module", autouse=True)
def _emulator_available():
    emu.require()


def lib(name, dtype=0):
    return emu.build(SELFTEST / f"{name}.metal", defines={"MF_DTYPE": dtype})


# ------------------------------------------------------------------------------ utilities


def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (NaN kept quiet)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)


def bf16_to_f32(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_dtype(x, dtype):
    """(array to bind, its values as float32) for MF_DTYPE `dtype`."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == 0:
        return x.copy(), x.copy()
    if dtype == 1:
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    b = bf16_bits(x)
    return b, bf16_to_f32(b)


def empty(n, dtype):
    return np.zeros(n, dtype={0: np.float32, 1: np.float16, 2: np.uint16}[dtype])


def values(a, dtype):
    return bf16_to_f32(a) if dtype == 2 else np.asarray(a, dtype=np.float32)


def round_to(x, dtype):
    return to_dtype(x, dtype)[1]


def row(lane):
    return (lane >> 4) * 4 + ((lane >> 1) & 3)


def col(lane):
    return ((lane >> 3) & 1) * 4 + (lane & 1) * 2


def launch_error(library, kernel, **kw):
    with pytest.raises(emu.EmuError) as info:
        library.launch(kernel, **kw)
    msg = str(info.value)
    assert f"kernel '{kernel}'" in msg
    return msg


# ------------------------------------------------------------------------------ harness


def test_harness_basics():
    library = lib("sync")
    assert "st_neighbour_barrier" in library.kernels()
    assert emu.PARAMS_SIZE == 208 and emu.NUM_SLOTS == 13
    assert emu.build(SELFTEST / "sync.metal", defines={"MF_DTYPE": 0}) is library
    p = emu.pack_params(head_dim=64, seqlen_q=7, scale=0.5, q_stride_s=1 << 40)
    fields = emu.unpack_params(p)
    assert (fields["head_dim"], fields["seqlen_q"], fields["scale"], fields["q_stride_s"]) == (64, 7, 0.5, 1 << 40)
    with pytest.raises(KeyError):
        emu.pack_params(no_such_field=1)
    with pytest.raises(ValueError, match="208"):
        library.launch("st_neighbour_barrier", (1,), (32,), {9: b"\0" * 100})
    with pytest.raises(emu.EmuError, match="no kernel named 'nope'"):
        library.launch("nope", (1,), (32,), {})
    with pytest.raises(ValueError, match="schedule"):
        library.launch("st_neighbour_barrier", (1,), (32,), {}, schedule="sideways")


# ------------------------------------------------------------------------------ barriers


@pytest.mark.parametrize("tg", [(64, 1, 1), (16, 4, 2)])
def test_missing_barrier_caught_by_permuted_schedules(tg):
    library = lib("sync")
    n = tg[0] * tg[1] * tg[2]
    groups = 3
    q = np.random.default_rng(0).standard_normal(groups * n).astype(np.float32)
    idx = np.arange(groups * n)
    left = np.where(idx % n == 0, idx, idx - 1)
    expected = q[left] + 1.0

    runs = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2), ("random", 3)]
    for schedule, seed in runs:
        o = np.zeros_like(q)
        library.launch("st_neighbour_barrier", (groups,), tg, {0: q, 3: o}, schedule=schedule, seed=seed)
        np.testing.assert_array_equal(o, expected, err_msg=f"fixed kernel, {schedule} {seed}")

    # without the barrier: right only in the order the code was written for
    o = np.zeros_like(q)
    library.launch("st_neighbour_no_barrier", (groups,), tg, {0: q, 3: o}, schedule="forward")
    np.testing.assert_array_equal(o, expected)
    for schedule, seed in runs[1:]:
        o = np.zeros_like(q)
        library.launch("st_neighbour_no_barrier", (groups,), tg, {0: q, 3: o}, schedule=schedule, seed=seed)
        assert not np.array_equal(o, expected), f"missing barrier not exposed by {schedule} {seed}"
        assert np.isnan(o).any()  # the neighbour's slot still holds the poison


def test_random_schedule_depends_on_seed_only():
    library = lib("sync")
    q = np.arange(256, dtype=np.float32)
    outs = {}
    for seed in (5, 5, 6):
        o = np.zeros_like(q)
        library.launch("st_neighbour_no_barrier", (1,), (256,), {0: q, 3: o}, schedule="random", seed=seed)
        outs.setdefault(seed, []).append(np.isnan(o))
    assert np.array_equal(outs[5][0], outs[5][1])
    assert not np.array_equal(outs[5][0], outs[6][0])


def test_divergent_barrier_caught():
    msg = launch_error(lib("sync"), "st_divergent_barrier", grid=(1,), threadgroup=(64,),
                       buffers={3: np.zeros(64, np.float32)})
    assert "different barriers" in msg
    assert re.search(r"threads 0-15: wait at threadgroup_barrier \(sync\.metal:\d+\)", msg)
    assert re.search(r"threads 16-63: wait at threadgroup_barrier \(sync\.metal:\d+\)", msg)


def test_barrier_after_early_return_caught():
    msg = launch_error(lib("sync"), "st_barrier_after_return", grid=(1,), threadgroup=(64,),
                       buffers={3: np.zeros(64, np.float32)})
    assert "returned while others wait" in msg
    assert "threads 40-63: returned" in msg


def test_barrier_in_a_function_called_from_two_branches_caught():
    msg = launch_error(lib("sync"), "st_divergent_callee", grid=(1,), threadgroup=(64,),
                       buffers={3: np.zeros(64, np.float32)})
    assert "different call paths" in msg


def test_barrier_loop_trip_count_caught():
    msg = launch_error(lib("sync"), "st_barrier_loop_count", grid=(1,), threadgroup=(64,),
                       buffers={3: np.zeros(64, np.float32)})
    assert "threads 0-31: returned" in msg


def test_divergent_simd_collectives_caught():
    library = lib("sync")
    bufs = {3: np.zeros(64, np.float32)}
    msg = launch_error(library, "st_divergent_simd", grid=(1,), threadgroup=(64,), buffers=bufs)
    assert "divergent simdgroup synchronisation in simdgroup 0" in msg
    assert re.search(r"lanes 0-15: wait at simd_sum \(sync\.metal:\d+\)", msg)
    assert re.search(r"lanes 16-31: wait at simd_max \(sync\.metal:\d+\)", msg)
    msg = launch_error(library, "st_partial_simd", grid=(1,), threadgroup=(64,), buffers=bufs)
    assert "lanes 16-31: returned" in msg
    msg = launch_error(library, "st_divergent_simdgroup_barrier", grid=(1,), threadgroup=(64,), buffers=bufs)
    assert "simdgroup_barrier" in msg and "lanes 5: returned" in msg

    o = np.zeros(64, np.float32)
    library.launch("st_uniform_simd_branch", (1,), (64,), {3: o}, schedule="random")
    np.testing.assert_array_equal(o, np.concatenate([np.arange(32), np.full(32, 496.0)]))


# ------------------------------------------------------------------------------ bounds


@pytest.mark.parametrize("dtype", [0, 1])
def test_out_of_bounds_read_and_write_caught(dtype):
    library = lib("bounds", dtype)
    q, _ = to_dtype(np.ones(10), dtype)
    o = empty(10, dtype)
    p = emu.pack_params(seqlen_q=10)
    library.launch("st_read", (1,), (32,), {0: q, 3: o, 9: p})
    assert values(o, dtype)[0] == 10.0
    msg = launch_error(library, "st_read", grid=(1,), threadgroup=(32,),
                       buffers={0: q, 3: o, 9: emu.pack_params(seqlen_q=11)})
    size = q.itemsize
    assert f"out-of-bounds access to buffer 'q (slot 0)' ({10 * size} bytes)" in msg
    assert f"byte offset {10 * size} (element index 10)" in msg
    if "llvm-symbolizer" in emu._find_symbolizer():
        assert re.search(r"at bounds\.metal:\d+", msg), msg
    else:
        assert re.search(r"at (bounds\.metal:\d+|bounds-\w+\.so\+0x[0-9a-f]+)", msg), msg

    library.launch("st_write", (1,), (32,), {3: o, 9: p})
    np.testing.assert_array_equal(values(o, dtype), np.arange(10))
    o2 = empty(10, dtype)
    msg = launch_error(library, "st_write", grid=(1,), threadgroup=(32,),
                       buffers={3: o2, 9: emu.pack_params(seqlen_q=11)})
    assert "out-of-bounds access to buffer 'o (slot 3)'" in msg
    assert not values(o2, dtype).any()  # a failed launch writes nothing back

    library.launch("st_read_before_start", (1,), (32,), {0: q, 3: o, 9: emu.pack_params(seqlen_q=4)})
    msg = launch_error(library, "st_read_before_start", grid=(1,), threadgroup=(32,),
                       buffers={0: q, 3: o, 9: emu.pack_params(seqlen_q=5)})
    assert f"byte offset {-size} (element index -1)" in msg


def test_kv_slots_and_append_kernel_slots():
    library = lib("bounds")
    o = np.zeros(4, np.float32)
    ints = [np.array([v], np.int32) for v in (3, 5)] + [np.array([7, 9], np.int32)]
    library.launch("st_kv_slots", (1,), (32,), {3: o, 10: ints[0], 11: ints[1], 12: ints[2],
                                                 9: emu.pack_params(seqlen_q=1)})
    assert list(o[:3]) == [3.0, 5.0, 9.0]
    msg = launch_error(library, "st_kv_slots", grid=(1,), threadgroup=(32,),
                       buffers={3: o, 10: ints[0], 11: ints[1], 12: ints[2], 9: emu.pack_params(seqlen_q=2)})
    assert "out-of-bounds access to buffer 'leftpad_k (slot 12)'" in msg
    msg = launch_error(library, "st_kv_slots", grid=(1,), threadgroup=(32,), buffers={3: o})
    assert "'kv_index (slot 10)', which is not bound" in msg
    with pytest.raises(ValueError, match="slot"):
        library.launch("st_kv_slots", (1,), (32,), {13: o})

    k, v, qr = (np.zeros(2, np.float32) for _ in range(3))
    ones = [np.ones(2, np.float32) for _ in range(5)]
    ap = np.frombuffer(emu.pack_append_params(rotary_dim=16, seqlen_new=2), np.uint8).copy()
    assert emu.unpack_append_params(bytes(ap))["rotary_dim"] == 16 and emu.APPEND_PARAMS_SIZE == 112
    bufs = {0: ones[0], 1: k, 2: v, 3: qr, 4: ones[1], 5: ones[2], 6: ones[3], 7: ones[4], 8: ap,
            9: emu.pack_params(head_dim=10), 10: ints[0], 11: ints[1]}
    library.launch("st_append_slots", (1,), (32,), bufs)
    assert (k[0], v[0], qr[0]) == (16.0, 2.0 + 3.0 + 5.0, 5.0 + 10.0)
    bufs[8] = ap[:100]
    msg = launch_error(library, "st_append_slots", grid=(1,), threadgroup=(32,), buffers=bufs)
    assert "slot 8 must hold the 112 bytes of mf_append_params" in msg


def test_unbound_slot_threadgroup_index_and_alignment_caught():
    library = lib("bounds")
    o = np.zeros(4, np.float32)
    msg = launch_error(library, "st_read_unbound", grid=(1,), threadgroup=(32,), buffers={3: o})
    assert "'alibi (slot 7)', which is not bound" in msg

    library.launch("st_threadgroup_index", (1,), (64,), {3: o, 9: emu.pack_params(seqlen_q=63)})
    assert o[0] == 1.0
    msg = launch_error(library, "st_threadgroup_index", grid=(1,), threadgroup=(64,),
                       buffers={3: o, 9: emu.pack_params(seqlen_q=64)})
    assert "out-of-bounds access to threadgroup array 't' (256 bytes)" in msg

    scratch = np.arange(16, dtype=np.float32)
    library.launch("st_misaligned_vector", (1,), (32,), {3: o, 8: scratch, 9: emu.pack_params(seqlen_q=4)})
    assert o[0] == 4 + 5 + 6 + 7
    msg = launch_error(library, "st_misaligned_vector", grid=(1,), threadgroup=(32,),
                       buffers={3: o, 8: scratch, 9: emu.pack_params(seqlen_q=1)})
    assert "misaligned access to buffer 'scratch (slot 8)'" in msg


# ------------------------------------------------------------------------------ limits


def test_thread_and_threadgroup_memory_limits():
    library = lib("bounds")
    s = np.zeros(2 * 1024, np.float32)
    library.launch("st_count_threads", (2,), (1024,), {8: s})
    np.testing.assert_array_equal(s, np.tile(np.arange(1024), 2))
    for tg in [(1025,), (32, 33, 1), (16, 8, 9)]:
        msg = launch_error(library, "st_count_threads", grid=(1,), threadgroup=tg, buffers={8: s})
        assert "threads per threadgroup" in msg and "1 to 1024" in msg

    o = np.zeros(64, np.float32)
    msg = launch_error(library, "st_threadgroup_too_big", grid=(1,), threadgroup=(64,), buffers={3: o})
    assert "over the 32 KiB limit" in msg and "'big' (32800 bytes" in msg
    msg = launch_error(library, "st_threadgroup_two_arrays", grid=(1,), threadgroup=(64,), buffers={3: o})
    assert "over the 32 KiB limit" in msg and "'b' (20000 bytes" in msg and "'a' 20000 bytes" in msg
    library.launch("st_threadgroup_at_limit", (2,), (64,), {3: o})
    np.testing.assert_array_equal(o, 3.0)


# ------------------------------------------------------------------------------ simd functions


def tree_reduce(vals, op):
    """The emulator's pairwise order over 32 lane slots (missing lanes skipped)."""
    v = list(vals) + [None] * (32 - len(vals))
    s = 1
    while s < 32:
        for i in range(0, 32 - s, 2 * s):
            if v[i] is not None and v[i + s] is not None:
                v[i] = op(v[i], v[i + s])
            elif v[i + s] is not None:
                v[i] = v[i + s]
        s *= 2
    return v[0]


def simd_model(x, src, dtype, n):
    """Expected st_simd_ops results (as float32) for threads 0..n-1."""
    rnd = lambda a: float(round_to(np.float32(a), dtype))  # noqa: E731
    out = np.zeros((17, n), np.float32)
    for base in range(0, n, 32):
        w = min(32, n - base)
        xs = [float(v) for v in x[base:base + w]]
        total = tree_reduce(xs, lambda a, b: rnd(a + b))
        mx, mn = max(xs), min(xs)
        acc = 0.0
        for ln in range(w):
            t = base + ln
            out[0, t], out[1, t], out[2, t] = total, mx, mn
            out[3, t] = acc
            acc = rnd(acc + xs[ln])
            out[4, t] = acc
            out[5, t] = xs[src[t]]
            out[6, t] = xs[ln ^ 5]
            out[7, t] = xs[ln + 3] if ln + 3 < 32 else xs[ln]
            out[8, t] = xs[ln - 3] if ln >= 3 else xs[ln]
            out[9, t] = xs[7]
            out[10, t] = xs[0]
            out[11, t] = 1.0 if all(v > -100 for v in xs) else 0.0
            out[12, t] = 1.0 if any(v > 5 for v in xs) else 0.0
            out[13, t] = 1.0 if ln == 0 else 0.0
            y = xs[ln ^ 1]
            out[14, t] = np.float32(y) + np.float32(y + 1) * 10 + np.float32(y * 2) * 100 + np.float32(-y) * 1000
            xf = np.array(xs, np.float32)
            out[15, t] = tree_reduce(list(2 * xf), lambda a, b: np.float32(a + b))
            out[16, t] = max(src[base:base + w])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_simd_functions_match_numpy(dtype):
    library = lib("simd", dtype)
    n = 64
    rng = np.random.default_rng(dtype)
    # small integers: every sum is exact in half and bfloat, so the model compares exactly
    x = rng.integers(-8, 9, n).astype(np.float32)
    src = rng.integers(0, 32, n).astype(np.int32)
    scratch = np.zeros(17 * n, np.float32)
    library.launch("st_simd_ops", (1,), (n,), {7: x, 5: src, 8: scratch}, schedule="random", seed=4)
    expected = simd_model(x, src, dtype, n)
    np.testing.assert_array_equal(scratch.reshape(17, n), expected)

    if dtype == 0:  # general floats: the same order of operations gives the same bits
        x = rng.standard_normal(n).astype(np.float32)
        library.launch("st_simd_ops", (1,), (n,), {7: x, 5: src, 8: scratch})
        expected = simd_model(x, src, 0, n)
        np.testing.assert_allclose(scratch.reshape(17, n), expected, rtol=1e-6, atol=1e-6)


def test_simd_functions_on_a_partial_simdgroup():
    library = lib("simd")
    n = 48
    x = np.arange(n, dtype=np.float32) - 20
    scratch = np.zeros(7 * n, np.float32)
    library.launch("st_simd_partial", (1,), (n,), {7: x, 8: scratch})
    r = scratch.reshape(7, n)
    for base, w in ((0, 32), (32, 16)):
        xs = x[base:base + w]
        sl = slice(base, base + w)
        np.testing.assert_array_equal(r[0, sl], xs.sum())
        np.testing.assert_array_equal(r[1, sl], xs.max())
        np.testing.assert_array_equal(r[2, sl], xs.min())
        np.testing.assert_array_equal(r[3, sl], np.concatenate([[0], np.cumsum(xs)[:-1]]))
        np.testing.assert_array_equal(r[4, sl], np.cumsum(xs))
        np.testing.assert_array_equal(r[5, sl], xs[7])
        np.testing.assert_array_equal(r[6, sl], xs[np.arange(w) ^ 1])


def test_simd_shuffle_from_missing_lane_caught():
    library = lib("simd")
    s = np.zeros(64, np.float32)
    src = np.zeros(64, np.int32)
    src[3] = 40
    msg = launch_error(library, "st_shuffle_bad_lane", grid=(1,), threadgroup=(64,), buffers={5: src, 8: s})
    assert "simd_shuffle, lane 3" in msg and "outside the simdgroup" in msg
    src[:] = 0
    src[32 + 2] = 20  # simdgroup 1 has 16 lanes
    msg = launch_error(library, "st_shuffle_bad_lane", grid=(1,), threadgroup=(48,), buffers={5: src, 8: s})
    assert "does not exist in this partial simdgroup" in msg
    msg = launch_error(library, "st_broadcast_nonuniform", grid=(1,), threadgroup=(32,), buffers={8: s})
    assert "must be the same for the whole simdgroup" in msg


# ------------------------------------------------------------------------------ simdgroup_matrix


@pytest.mark.parametrize("dtype", DTYPES)
def test_simdgroup_matrix_lane_layout_round_trip(dtype):
    library = lib("matrix", dtype)
    q, qv = to_dtype(np.arange(64) * 1.0, dtype)
    o = empty(64, dtype)
    scratch = np.zeros(64, np.float32)
    library.launch("st_sgm_layout", (1,), (32,), {0: q, 3: o, 8: scratch})
    m = values(o, dtype).reshape(8, 8)
    for lane in range(32):
        for i in range(2):
            assert scratch[2 * lane + i] == qv[row(lane) * 8 + col(lane) + i]
            assert m[row(lane), col(lane) + i] == 2 * lane + i
    # every element is covered exactly once
    assert sorted(m.reshape(-1).tolist()) == list(range(64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_simdgroup_multiply_accumulate_matches_numpy(dtype, ta, tb):
    library = lib("matrix", dtype)
    rng = np.random.default_rng(10 * dtype + 2 * ta + tb)
    ld = 16
    q, qv = to_dtype(rng.standard_normal((16, ld)), dtype)
    k, kv = to_dtype(rng.standard_normal((8, ld)), dtype)
    v, vv = to_dtype(rng.standard_normal((8, 8)), dtype)
    cf = rng.standard_normal(64).astype(np.float32)
    scratch = np.concatenate([cf, np.zeros(128, np.float32)])
    o = empty(128, dtype)
    p = emu.pack_params(head_dim=ld, flags=ta | (tb << 1))
    library.launch("st_sgm_mma", (1,), (64,), {0: q, 1: k, 2: v, 3: o, 8: scratch, 9: p}, schedule="reverse")
    qv, kv, vv = qv.reshape(16, ld), kv.reshape(8, ld), vv.reshape(8, 8)
    b = kv[:8, :8].T if tb else kv[:8, :8]
    tol = {0: 1e-5, 1: 2e-3, 2: 1.6e-2}[dtype]
    for s in range(2):
        a = qv[:8, 8 * s:8 * s + 8].T if ta else qv[8 * s:8 * s + 8, :8]
        exact = a.astype(np.float64) @ b + vv
        got = values(o, dtype)[64 * s:64 * s + 64].reshape(8, 8)
        np.testing.assert_allclose(got, round_to(exact, dtype), rtol=tol, atol=tol)
        exact_f = a.astype(np.float64) @ b + cf.reshape(8, 8)
        np.testing.assert_allclose(scratch[64 + 64 * s:128 + 64 * s].reshape(8, 8), exact_f, rtol=1e-5, atol=1e-5)


def test_simdgroup_matrix_origin_and_divergence():
    library = lib("matrix")
    q = np.arange(16 * 16, dtype=np.float32)
    o = np.zeros(64, np.float32)
    library.launch("st_sgm_origin", (1,), (32,), {0: q, 3: o, 9: emu.pack_params(head_dim=16)})
    np.testing.assert_array_equal(o.reshape(8, 8), q.reshape(16, 16)[8:16, 4:12])
    msg = launch_error(library, "st_sgm_divergent", grid=(1,), threadgroup=(32,),
                       buffers={8: np.zeros(32, np.float32)})
    assert "lanes 0-15: returned" in msg and "simdgroup_multiply_accumulate" in msg


# ------------------------------------------------------------------------------ numerics, poison


def test_half_rounds_every_operation():
    library = lib("numeric", 1)
    vals_ = np.array([1.0] + [0.0004] * 40, dtype=np.float16)
    o = np.zeros(2, np.float16)
    scratch = np.zeros(1, np.float32)
    library.launch("st_half_sum", (1,), (1,), {0: vals_, 3: o, 8: scratch,
                                               9: emu.pack_params(seqlen_q=len(vals_))})
    acc = np.float16(0)
    for x in vals_:
        acc = np.float16(acc + x)
    assert o[0] == acc == np.float16(1.0)
    assert np.float16(scratch[0]) != acc  # the float sum, rounded once, differs
    assert o[1] == np.float16(1.0)  # q0 + q1 + q2 in one expression: still rounded per operation


@pytest.mark.parametrize("dtype", DTYPES)
def test_conversions_round_to_nearest_even(dtype):
    library = lib("numeric", dtype)
    n = 64
    rng = np.random.default_rng(7)
    x = rng.standard_normal(2 * n).astype(np.float32)
    # halfway cases for bfloat: low 16 bits exactly 0x8000
    x[:8].view(np.uint32)[:] = (x[:8].view(np.uint32) & 0xFFFF0000) | 0x8000
    o = empty(n, dtype)
    scratch = np.zeros(n, np.float32)
    library.launch("st_convert", (1,), (n,), {7: x, 3: o, 8: scratch})
    a, b = round_to(x[:n], dtype), round_to(x[n:], dtype)
    if dtype == 2:
        np.testing.assert_array_equal(o, bf16_bits(x[:n]))
    else:
        np.testing.assert_array_equal(values(o, dtype), a)
    np.testing.assert_array_equal(scratch, round_to(a * b, dtype))


@pytest.mark.parametrize("os_threads", ["1", "2"])
def test_threadgroup_memory_poisoned_before_each_threadgroup(monkeypatch, os_threads):
    monkeypatch.setenv("MFEMU_THREADS", os_threads)
    library = lib("numeric")
    n, groups = 64, 5
    scratch = np.zeros(groups * 3 * n, np.float32)
    library.launch("st_poison", (groups,), (n,), {8: scratch})
    r = scratch.reshape(groups, 3, n)
    assert np.isnan(r[:, 0]).all()
    assert (r[:, 1] == -1).all()
    assert np.isnan(r[:, 2]).all()


def test_math_functions_match_numpy():
    library = lib("numeric")
    n = 64
    x = np.random.default_rng(3).uniform(-3, 3, n).astype(np.float32)
    scratch = np.zeros(18 * n, np.float32)
    library.launch("st_math", (1,), (n,), {7: x, 8: scratch})
    r = scratch.reshape(18, n)
    ax = np.abs(x) + 1
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)  # noqa: E731
    close(r[0], np.exp(x))
    close(r[1], np.exp2(x))
    close(r[2], np.log(ax))
    close(r[3], np.log2(ax))
    close(r[4], np.tanh(x))
    close(r[5], 1 / np.sqrt(ax))
    close(r[6], x * x + 1)
    close(r[7], np.abs(x))
    close(r[8], np.clip(x, -1, 1))
    np.testing.assert_array_equal(r[9], (x.view(np.uint32) >> 16).astype(np.float32))
    close(r[10], np.maximum(x, 0.5) + np.minimum(x, -0.5))
    close(r[11], x * x + 14)
    np.testing.assert_array_equal(r[12], 2.0 + (x > 1.5))
    np.testing.assert_array_equal(r[13], 0.0)
    np.testing.assert_array_equal(r[14], 1.0)
    assert np.isnan(r[15]).all()  # max propagates NaN
    np.testing.assert_array_equal(r[16], (x.astype(np.float16) * np.float16(3)).astype(np.float32))
    close(r[17], np.sqrt(ax))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_loads_and_conversions(dtype):
    library = lib("numeric", dtype)
    n = 32
    q, qv = to_dtype(np.arange(4 * n) * 0.5 - 7, dtype)
    o = empty(4 * n, dtype)
    scratch = np.zeros(4 * n, np.float32)
    library.launch("st_vectors", (1,), (n,), {0: q, 3: o, 8: scratch})
    np.testing.assert_array_equal(scratch.reshape(n, 4), qv.reshape(n, 4)[:, ::-1] * 2)
    np.testing.assert_array_equal(values(o, dtype), qv)
    msg = launch_error(library, "st_vectors", grid=(1,), threadgroup=(n + 1,), buffers={0: q, 3: o, 8: scratch})
    assert "out-of-bounds access to buffer 'q (slot 0)'" in msg and f"{4 * q.itemsize}-byte element" in msg


def test_faults_inside_a_kernel_fail_the_launch_cleanly():
    library = lib("bounds")
    s = np.zeros(64, np.float32)
    library.launch("st_private_index", (1,), (32,), {8: s, 9: emu.pack_params(seqlen_q=3)})
    np.testing.assert_array_equal(s[:32], 3.0)
    for _ in range(2):  # the process stays usable after a fault
        msg = launch_error(library, "st_private_index", grid=(2,), threadgroup=(32,),
                           buffers={8: s, 9: emu.pack_params(seqlen_q=4)})
        assert "index out of range of a private (thread) array" in msg
    msg = launch_error(library, "st_stack_overflow", grid=(2,), threadgroup=(32,),
                       buffers={8: s, 9: emu.pack_params(seqlen_q=10)})
    assert "fiber stack overflow" in msg
    msg = launch_error(library, "st_int_div_zero", grid=(2,), threadgroup=(32,),
                       buffers={8: s, 9: emu.pack_params(seqlen_q=0)})
    assert "integer division by zero" in msg
    library.launch("st_int_div_zero", (1,), (32,), {8: s, 9: emu.pack_params(seqlen_q=2)})
    np.testing.assert_array_equal(s[:32], (np.arange(32) + 7) // 2)


def test_cpu_torch_tensors_bind_in_place():
    torch = pytest.importorskip("torch")
    library = lib("matrix", 2)
    q = torch.arange(64, dtype=torch.float32).to(torch.bfloat16)
    o = torch.zeros(64, dtype=torch.bfloat16)
    scratch = torch.zeros(64, dtype=torch.float32)
    library.launch("st_sgm_layout", (1,), (32,), {0: q, 3: o, 8: scratch})
    lanes = np.arange(32)
    got = o.float().numpy().reshape(8, 8)
    assert got[row(lanes), col(lanes)].tolist() == (2 * lanes).tolist()
    assert scratch[0].item() == 0.0 and scratch[2 * 17].item() == float(row(17) * 8 + col(17))
    assert emu.available() and emu.unavailable_reason() is None


def test_endless_kernel_is_interrupted_by_the_watchdog(monkeypatch):
    monkeypatch.setenv("MFEMU_TIMEOUT_S", "1")
    library = lib("bounds")
    s = np.zeros(64, np.float32)
    library.launch("st_endless", (2,), (32,), {8: s, 9: emu.pack_params(seqlen_q=100)})
    assert (s[:32] >= 1.0).all()
    msg = launch_error(library, "st_endless", grid=(4,), threadgroup=(32,),
                       buffers={8: s, 9: emu.pack_params(seqlen_q=0)})
    assert "ran past MFEMU_TIMEOUT_S" in msg
    library.launch("st_endless", (2,), (32,), {8: s, 9: emu.pack_params(seqlen_q=100)})
