"""The guarded flash_attn import shim, tested in fresh interpreters.

Import-time behaviour is only meaningful in a new process, so almost every test runs
``python -c`` with a controlled environment. Two ways in:

* the finder installed by ``mtlflash.shim.install()`` (works from any checkout), and
* the real start-up path: the ``.pth`` line executed by ``site.addsitedir`` on a temporary
  site directory holding the repository's ``mtlflash_shim.pth`` and ``_shim_boot.py``, and
  the installed ``mtlflash_shim.pth`` in site-packages when mtlflash is installed.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PTH = REPO / "python" / "mtlflash_shim.pth"
START = REPO / "python" / "mtlflash_shim.start"
BOOT = REPO / "python" / "mtlflash" / "_shim_boot.py"


def run(code, *, env=None, pythonpath=(), args=()):
    """Run ``code`` in a fresh interpreter; MTLFLASH_* variables only as given."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MTLFLASH_")}
    full.update(env or {})
    if pythonpath:
        old = full.get("PYTHONPATH")
        full["PYTHONPATH"] = os.pathsep.join([str(p) for p in pythonpath] + ([old] if old else []))
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(r):
    assert r.returncode == 0, "stdout:\n%s\nstderr:\n%s" % (r.stdout, r.stderr)
    return r.stdout


def last_json(r):
    return json.loads(ok(r).strip().splitlines()[-1])


# -- what import flash_attn does under each switch (finder from mtlflash.shim.install) ---------

SERVE_AND_COMPARE = """
    import mtlflash.shim
    mtlflash.shim.install()
    import torch
    import flash_attn
    from flash_attn import flash_attn_func
    torch.manual_seed(0)
    q = torch.randn(2, 37, 4, 32)
    k = torch.randn(2, 45, 2, 32)
    v = torch.randn(2, 45, 2, 32)
    out = flash_attn_func(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    ).transpose(1, 2)
    err = (out - ref).abs().max().item()
    import json
    print(json.dumps({"version": flash_attn.__version__, "err": err,
                      "served": mtlflash.shim.is_served(), "file": flash_attn.__file__}))
"""


def test_on_serves_flash_attn_with_reference_results():
    res = last_json(run(SERVE_AND_COMPARE, env={"MTLFLASH_SHIM": "on"}))
    assert res["version"] == "2.8.3"
    assert res["served"] is True
    assert "_flash_attn_compat" in res["file"]
    assert res["err"] < 1e-5


@pytest.mark.parametrize("value", ["off", "0", "OFF"])
def test_off_raises_import_error(value):
    r = run(
        """
        import mtlflash.shim
        print(mtlflash.shim.install())
        try:
            import flash_attn
        except ImportError as e:
            print("ImportError", type(e).__name__)
        """,
        env={"MTLFLASH_SHIM": value},
    )
    assert ok(r).split() == ["None", "ImportError", "ModuleNotFoundError"]


def test_default_on_linux_raises_import_error():
    if sys.platform == "darwin":
        pytest.skip("the default serves flash_attn on a Mac with MPS")
    r = run(
        """
        import sys
        import mtlflash.shim
        mtlflash.shim.install()
        try:
            import flash_attn
            print("imported")
        except ModuleNotFoundError as e:
            print("ModuleNotFoundError", e.name)
        # a library's usual guard keeps working
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        print(flash_attn_func, "flash_attn" in sys.modules)
        """
    )
    assert ok(r).split() == ["ModuleNotFoundError", "flash_attn", "None", "False"]


def test_off_set_after_install_is_honoured_at_import_time():
    r = run(
        """
        import os
        import mtlflash.shim
        mtlflash.shim.install()
        os.environ["MTLFLASH_SHIM"] = "off"
        try:
            import flash_attn
            print("imported")
        except ImportError:
            print("ImportError")
        """,
        env={"MTLFLASH_SHIM": "on"},
    )
    assert ok(r).split() == ["ImportError"]


def test_unknown_value_warns_and_acts_as_auto():
    r = run(
        """
        import warnings
        warnings.simplefilter("always")
        import mtlflash.shim
        finder = mtlflash.shim.install()
        finder._mps_available = lambda: False   # a machine that cannot serve
        try:
            import flash_attn
            print("imported")
        except ImportError:
            print("ImportError")
        finder._mps_available = lambda: True    # a Mac with MPS
        import flash_attn
        print(flash_attn.__version__)
        """,
        env={"MTLFLASH_SHIM": "maybe"},
    )
    assert ok(r).split() == ["ImportError", "2.8.3"]
    assert "MTLFLASH_SHIM='maybe' is not understood" in r.stderr
    assert "RuntimeWarning" in r.stderr


@pytest.mark.parametrize("mps,expected", [(True, "2.8.3"), (False, "ImportError")])
def test_auto_serves_only_where_mps_is_available(mps, expected):
    r = run(
        """
        import mtlflash.shim
        finder = mtlflash.shim.install()
        finder._mps_available = lambda: %s
        try:
            import flash_attn
            print(flash_attn.__version__)
        except ImportError:
            print("ImportError")
        """
        % mps,
        env={"MTLFLASH_SHIM": "auto"},
    )
    assert ok(r).split() == [expected]


def test_mps_check_does_not_import_torch_off_macos():
    if sys.platform == "darwin":
        pytest.skip("on macOS the check imports torch by design")
    r = run(
        """
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_boot_copy", %r)
        boot = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(boot)
        print(boot._mps_available(), "torch" in sys.modules)
        """
        % str(BOOT)
    )
    assert ok(r).split() == ["False", "False"]


def test_install_force_serves_without_env():
    r = run(
        """
        import mtlflash.shim
        mtlflash.shim.install(force=True)
        import flash_attn
        print(flash_attn.__version__, mtlflash.shim.is_served())
        """
    )
    assert ok(r).split() == ["2.8.3", "True"]


def test_install_is_idempotent_and_uninstall_restores_import_error():
    r = run(
        """
        import sys
        import mtlflash.shim as shim
        n0 = len(sys.meta_path)
        a = shim.install(); b = shim.install()
        assert a is b
        finders = [f for f in sys.meta_path if getattr(f, "_mtlflash_flash_attn_shim", False)]
        assert len(finders) == 1 and sys.meta_path[-1] is a, sys.meta_path
        import flash_attn, flash_attn.bert_padding
        assert shim.status()["served"]
        assert shim.uninstall() is True
        assert not any(getattr(f, "_mtlflash_flash_attn_shim", False) for f in sys.meta_path)
        assert not [m for m in sys.modules if m.split(".")[0] == "flash_attn"]
        try:
            import flash_attn
            print("imported")
        except ImportError:
            print("ImportError")
        print(shim.uninstall())
        """,
        env={"MTLFLASH_SHIM": "on"},
    )
    assert ok(r).split() == ["ImportError", "False"]


# -- a real flash_attn always wins -------------------------------------------------------------


@pytest.fixture
def fake_real_flash_attn(tmp_path):
    pkg = tmp_path / "realfa" / "flash_attn"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "9.9.9"\nREAL = True\n')
    (pkg / "bert_padding.py").write_text("REAL = True\n")
    return tmp_path / "realfa"


def test_real_flash_attn_on_sys_path_wins(fake_real_flash_attn):
    r = run(
        """
        import mtlflash.shim
        mtlflash.shim.install(force=True)
        import flash_attn, flash_attn.bert_padding
        print(flash_attn.__version__, flash_attn.REAL, flash_attn.bert_padding.REAL,
              mtlflash.shim.is_served(), mtlflash.shim.status()["real_flash_attn"] is not None)
        """,
        env={"MTLFLASH_SHIM": "on"},
        pythonpath=[fake_real_flash_attn],
    )
    assert ok(r).split() == ["9.9.9", "True", "True", "False", "True"]


def test_real_flash_attn_from_a_later_finder_wins(fake_real_flash_attn):
    # e.g. another package's editable-install finder appended after the shim's
    r = run(
        """
        import sys, importlib.machinery
        import mtlflash.shim
        mtlflash.shim.install(force=True)

        class EditableFinder:
            def find_spec(self, name, path=None, target=None):
                if name == "flash_attn":
                    return importlib.machinery.PathFinder.find_spec(name, [%r])
                return None

        sys.meta_path.append(EditableFinder())
        import flash_attn
        print(flash_attn.__version__)
        """
        % str(fake_real_flash_attn),
        env={"MTLFLASH_SHIM": "on"},
    )
    assert ok(r).split() == ["9.9.9"]


def test_no_fake_distribution_metadata():
    r = run(
        """
        import importlib.metadata as md
        import mtlflash.shim
        mtlflash.shim.install()
        import flash_attn
        found = []
        for name in ("flash_attn", "flash-attn"):
            try:
                md.distribution(name)
                found.append(name)
            except md.PackageNotFoundError:
                pass
        dists = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
        print(found, "flash-attn" in dists)
        """,
        env={"MTLFLASH_SHIM": "on"},
    )
    assert ok(r).split() == ["[]", "False"]


# -- the start-up path: .pth / .start files and the stdlib-only boot module -------------------


@pytest.fixture
def site_dir(tmp_path):
    """A site directory laid out like an installed wheel's site-packages root."""
    d = tmp_path / "site"
    d.mkdir()
    shutil.copy(PTH, d / PTH.name)
    shutil.copy(START, d / START.name)
    shutil.copy(BOOT, d / "_mtlflash_shim_boot.py")
    return d


def test_pth_and_start_files_are_well_formed(site_dir):
    lines = [l for l in PTH.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("import ")
    entries = [l for l in START.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert entries == ["_mtlflash_shim_boot:boot"]
    r = run(
        """
        import pkgutil, sys
        sys.path.insert(0, %r)
        boot = pkgutil.resolve_name("_mtlflash_shim_boot:boot")
        finder = boot()
        print(callable(boot), sys.meta_path[-1] is finder)
        """
        % str(site_dir)
    )
    assert ok(r).split() == ["True", "True"]


STARTUP_PROBE = """
    import site, sys
    before = set(sys.modules)
    site.addsitedir(%r)
    heavy = sorted(m for m in set(sys.modules) - before
                   if m.split(".")[0] in ("torch", "numpy", "mtlflash"))
    finders = [f for f in sys.meta_path if getattr(f, "_mtlflash_flash_attn_shim", False)]
    print(len(finders), sys.meta_path[-1] is (finders[0] if finders else None), heavy,
          [m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "mtlflash")])
"""


def test_pth_line_appends_finder_without_heavy_imports(site_dir):
    # -S: no site-packages processing, so only our .pth runs (an installed copy cannot interfere)
    r = run(STARTUP_PROBE % str(site_dir), args=("-S",), env={"MTLFLASH_SHIM": "on"})
    assert ok(r).split() == ["1", "True", "[]", "[]"]


def test_pth_line_respects_off(site_dir):
    r = run(STARTUP_PROBE % str(site_dir), args=("-S",), env={"MTLFLASH_SHIM": "off"})
    assert ok(r).split() == ["0", "False", "[]", "[]"]


def _site_dirs_of_this_python():
    """The site-packages directories this (parent) interpreter really uses: a venv's own (plus the
    base ones with --system-site-packages), the user site, a global install. A `python -S` child
    cannot compute them itself: without site.main() it does not read pyvenv.cfg, so its
    site.getsitepackages() names the base interpreter's directories, not the venv's."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def _mtlflash_file():
    import mtlflash

    return mtlflash.__file__


def test_pth_line_then_import_flash_attn(site_dir):
    # our .pth first, then this Python's own site-packages (mtlflash itself, editable or not)
    r = run(
        """
        import site, sys
        site.addsitedir(%r)
        for d in %r:
            site.addsitedir(d)
        finders = [f for f in sys.meta_path if getattr(f, "_mtlflash_flash_attn_shim", False)]
        boot = sys.modules["_mtlflash_shim_boot"]
        import flash_attn
        from flash_attn.flash_attn_interface import flash_attn_varlen_func
        import mtlflash
        print(len(finders), boot.__file__.startswith(%r), flash_attn.__version__, "mtlflash" in sys.modules,
              mtlflash.__file__ == %r)
        """
        % (str(site_dir), _site_dirs_of_this_python(), str(site_dir), _mtlflash_file()),
        args=("-S",),
        env={"MTLFLASH_SHIM": "on"},
    )
    # the last field: the child imported the mtlflash under test, not another install of it
    assert ok(r).split() == ["1", "True", "2.8.3", "True", "True"]


def _installed_shim():
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        if (Path(d) / "mtlflash_shim.pth").is_file():
            return Path(d)
    return None


needs_installed = pytest.mark.skipif(
    _installed_shim() is None, reason="mtlflash (with its shim .pth) is not installed in this Python"
)


@needs_installed
def test_installed_files_at_site_packages_root():
    d = _installed_shim()
    assert (d / "mtlflash_shim.start").is_file()
    assert (d / "_mtlflash_shim_boot.py").is_file()
    import importlib.metadata as md

    files = [str(f) for f in (md.files("mtlflash") or [])]
    assert "mtlflash_shim.pth" in files and "_mtlflash_shim_boot.py" in files
    # mtlflash installs no flash_attn package or flash_attn metadata of its own
    assert not [f for f in files if f.split("/")[0].startswith(("flash_attn", "flash-attn"))]


@needs_installed
def test_installed_interpreter_startup_is_light():
    r = run(
        """
        import sys
        finders = [f for f in sys.meta_path if getattr(f, "_mtlflash_flash_attn_shim", False)]
        print(len(finders), sys.meta_path[-1] is finders[0],
              sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "mtlflash")))
        """
    )
    assert ok(r).split() == ["1", "True", "[]"]


@needs_installed
def test_installed_shim_serves_with_on_and_not_by_default():
    code = """
        import sys
        try:
            import flash_attn
            from flash_attn import flash_attn_func
            print(flash_attn.__version__)
        except ImportError:
            print("ImportError", "torch" in sys.modules)
        """
    assert ok(run(code, env={"MTLFLASH_SHIM": "on"})).split() == ["2.8.3"]
    assert ok(run(code, env={"MTLFLASH_SHIM": "off"})).split() == ["ImportError", "False"]
    if sys.platform != "darwin":
        # the default on Linux: ImportError, and torch was never imported to decide that
        assert ok(run(code)).split() == ["ImportError", "False"]


# -- the served modules -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fa():
    """The served modules, imported in this process and removed afterwards."""
    import mtlflash.shim as shim

    if "flash_attn" in sys.modules and not shim.is_served():
        pytest.skip("a real flash_attn is installed")
    shim.install(force=True)
    import flash_attn
    import flash_attn.bert_padding
    import flash_attn.flash_attn_interface
    import flash_attn.layers.rotary

    assert shim.is_served(flash_attn)
    yield flash_attn
    shim.uninstall()


def test_public_functions_and_signatures(fa):
    import inspect

    import mtlflash

    for name in (
        "flash_attn_func",
        "flash_attn_qkvpacked_func",
        "flash_attn_kvpacked_func",
        "flash_attn_varlen_func",
        "flash_attn_varlen_qkvpacked_func",
        "flash_attn_varlen_kvpacked_func",
    ):
        f = getattr(fa, name)
        assert f is getattr(fa.flash_attn_interface, name)
        assert inspect.signature(f) == inspect.signature(getattr(mtlflash, name))
    params = list(inspect.signature(fa.flash_attn_func).parameters)
    assert params[:3] == ["q", "k", "v"] and "return_attn_probs" in params


def test_kvcache_is_not_exported_broken(fa):
    import mtlflash

    if callable(getattr(mtlflash, "flash_attn_with_kvcache", None)):
        assert fa.flash_attn_with_kvcache is mtlflash.flash_attn_with_kvcache
        return
    assert not hasattr(fa, "flash_attn_with_kvcache")
    with pytest.raises(AttributeError, match="not implement"):
        fa.flash_attn_with_kvcache
    with pytest.raises(ImportError):
        exec("from flash_attn import flash_attn_with_kvcache", {})


def _sdpa_bshd(q, k, v, **kw):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw
    ).transpose(1, 2)


def test_wrapped_forward_as_diffusers_calls_it(fa):
    from flash_attn.flash_attn_interface import _wrapped_flash_attn_backward, _wrapped_flash_attn_forward

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 24, 3, 16) for _ in range(3))
    scale = 0.3
    # diffusers: (q, k, v, dropout_p, scale, is_causal, wl, wr, softcap, alibi, return_lse)
    out, lse, s_dmask, rng_state = _wrapped_flash_attn_forward(q, k, v, 0.0, scale, True, -1, -1, 0.0, None, True)
    ref = _sdpa_bshd(q, k, v, is_causal=True, scale=scale)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (2, 3, 24) and lse.dtype == torch.float32
    assert torch.allclose(lse, torch.logsumexp(scores, dim=-1), atol=1e-5)
    assert s_dmask.numel() == 0
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    # keyword form used by flash_attn's own autograd functions
    out2 = _wrapped_flash_attn_forward(
        q, k, v, 0.0, scale, causal=False, window_size_left=-1, window_size_right=-1,
        softcap=0.0, alibi_slopes=None, return_softmax=False,
    )[0]
    assert torch.allclose(out2, _sdpa_bshd(q, k, v, scale=scale), atol=1e-5)
    # the backward writes into the given buffers and returns softmax_d (tests/test_backward_fa2.py has more)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    softmax_d = _wrapped_flash_attn_backward(out, q, k, v, out, lse, dq, dk, dv, 0.0, scale, True, -1, -1, 0.0, None,
                                             False, rng_state)
    assert softmax_d.shape == lse.shape and torch.isfinite(dq).all()
    # dropout runs (diffusers passes 1e-30 to get lse back)
    assert _wrapped_flash_attn_forward(q, k, v, 0.1, scale, False)[0].shape == q.shape


def test_bert_padding_round_trip_and_varlen(fa):
    from flash_attn import flash_attn_varlen_func
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input

    torch.manual_seed(2)
    b, s, h, d = 3, 10, 2, 16
    lengths = torch.tensor([10, 4, 7])
    mask = torch.arange(s)[None, :] < lengths[:, None]
    x = torch.randn(b, s, h, d)
    unpadded, indices, cu, max_len, used = unpad_input(x, mask)
    assert unpadded.shape == (int(lengths.sum()), h, d)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 10, 14, 21]
    assert max_len == 10 and isinstance(max_len, int)
    assert used.dtype == torch.int32 and used.tolist() == [10, 4, 7]
    assert torch.equal(indices, torch.nonzero(mask.flatten()).flatten())
    assert torch.equal(index_first_axis(x.reshape(b * s, h, d), indices), unpadded)
    back = pad_input(unpadded, indices, b, s)
    assert torch.equal(back, x * mask[:, :, None, None])

    # varlen attention on the unpadded batch == SDPA with a key padding mask (real rows)
    out = pad_input(flash_attn_varlen_func(unpadded, unpadded, unpadded, cu, cu, max_len, max_len), indices, b, s)
    ref = _sdpa_bshd(x, x, x, attn_mask=mask[:, None, None, :])
    assert torch.allclose(out[mask], ref[mask], atol=1e-5)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))

    # unused_mask: kept tokens not counted as used
    unused = torch.zeros_like(mask)
    unused[1, 4:6] = True
    u2, idx2, cu2, max2, used2 = unpad_input(x, mask, unused)
    assert cu2.tolist() == [0, 10, 16, 23] and used2.tolist() == [10, 4, 7]


def test_unpad_concatenated_sequences(fa):
    from flash_attn.bert_padding import unpad_input_for_concatenated_sequences

    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)
    lens = torch.tensor([[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    h, idx, cu, mx = unpad_input_for_concatenated_sequences(x, lens)
    assert cu.tolist() == [0, 2, 5, 11] and mx == 6
    assert h.flatten().tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]


def _rotary_expected(x, cos, sin, positions, interleaved):
    """Rotation as complex multiplication, per token position."""
    rd = cos.shape[-1] * 2
    xr = x[..., :rd].double()
    if interleaved:
        pairs = torch.view_as_complex(xr.reshape(*xr.shape[:-1], rd // 2, 2).contiguous())
    else:
        pairs = torch.complex(xr[..., : rd // 2], xr[..., rd // 2 :])
    rot = torch.polar(torch.ones_like(cos[positions].double()), torch.atan2(sin[positions].double(), cos[positions].double()))
    rot = rot.unsqueeze(-2)  # broadcast over heads
    y = pairs * rot
    if interleaved:
        yr = torch.view_as_real(y).flatten(-2)
    else:
        yr = torch.cat([y.real, y.imag], dim=-1)
    return torch.cat([yr.to(x.dtype), x[..., rd:]], dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_matches_complex_rotation(fa, interleaved):
    from flash_attn.layers.rotary import apply_rotary_emb

    torch.manual_seed(3)
    b, s, h, d, rd = 2, 7, 3, 16, 12
    theta = torch.rand(32, rd // 2) * 6.0
    cos, sin = theta.cos(), theta.sin()
    x = torch.randn(b, s, h, d)
    pos = torch.arange(s).expand(b, s)
    got = apply_rotary_emb(x, cos, sin, interleaved=interleaved)
    assert torch.allclose(got, _rotary_expected(x, cos, sin, pos, interleaved), atol=1e-5)
    # per-sequence offsets (decoding with a cache)
    offs = torch.tensor([3, 9])
    got = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offs)
    assert torch.allclose(got, _rotary_expected(x, cos, sin, pos + offs[:, None], interleaved), atol=1e-5)
    # varlen layout: positions restart in each sequence
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    xt = torch.randn(7, h, d)
    got = apply_rotary_emb(xt, cos, sin, interleaved=interleaved, cu_seqlens=cu, max_seqlen=4)
    vpos = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    assert torch.allclose(got, _rotary_expected(xt, cos, sin, vpos, interleaved), atol=1e-5)
    # inplace returns x itself, rotated
    y = x.clone()
    assert apply_rotary_emb(y, cos, sin, interleaved=interleaved, inplace=True) is y
    assert torch.allclose(y, _rotary_expected(x, cos, sin, pos, interleaved), atol=1e-5)


def test_install_swaps_an_older_startup_finder_in_place():
    # the start-up copy of the boot module can lag behind the package (editable installs)
    r = run(
        """
        import sys
        import mtlflash.shim as shim

        class OldFinder:
            _mtlflash_flash_attn_shim = True
            forced = True
            def find_spec(self, *a):
                return None

        for f in [f for f in sys.meta_path if getattr(f, "_mtlflash_flash_attn_shim", False)]:
            sys.meta_path.remove(f)
        sys.meta_path.append(OldFinder())
        sys.meta_path.append(object.__new__(type("Other", (), {"find_spec": lambda *a: None})))
        finder = shim.install()
        print(type(finder).__name__, sys.meta_path.index(finder) == len(sys.meta_path) - 2,
              finder.forced, sum(getattr(f, "_mtlflash_flash_attn_shim", False) for f in sys.meta_path))
        import flash_attn
        print(flash_attn.__version__)
        """
    )
    assert ok(r).split() == ["FlashAttnShimFinder", "True", "True", "1", "2.8.3"]
