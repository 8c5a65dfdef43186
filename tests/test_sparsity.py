"""Block-sparse layouts: checked against DeepSpeed 0.19.6 itself, and the ruGPT3XL layout's known shape.

The oracle is DeepSpeed's own ``sparsity_config.py`` from the 0.19.6 sdist (the last release that had it), fetched
once from PyPI, checked against its published sha256 and cached in ``$XDG_CACHE_HOME/rugpt-ray`` (default
``~/.cache/rugpt-ray``). Only that one file is extracted and imported; it needs nothing but torch and random.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import random
import tarfile
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import torch

from rugpt_ray.errors import UserError
from rugpt_ray.sparse_config import XL_SPARSE_ATTENTION, normalize_sparse_config
from rugpt_ray.sparsity import layout_density, make_layout

DS_VERSION = "0.19.6"
DS_SDIST = f"deepspeed-{DS_VERSION}.tar.gz"
DS_SHA256 = "31593acffbe4794c74446094122b1bc29d8c73a137e37aff899ca4a6480df2d8"
DS_MEMBER = f"deepspeed-{DS_VERSION}/deepspeed/ops/sparse_attention/sparsity_config.py"
PYPI_SIMPLE = os.environ.get("RUGPT_PYPI_SIMPLE", "https://pypi.org/simple")

DS_CLASSES = {
    "dense": "DenseSparsityConfig",
    "fixed": "FixedSparsityConfig",
    "variable": "VariableSparsityConfig",
    "bigbird": "BigBirdSparsityConfig",
    "bslongformer": "BSLongformerSparsityConfig",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download_sdist(target: Path) -> None:
    """Find the sdist through PyPI's simple API (JSON form, PEP 691) and download it next to `target`."""
    with httpx.Client(timeout=120, follow_redirects=True) as client:
        index = client.get(f"{PYPI_SIMPLE}/deepspeed/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        index.raise_for_status()
        files = [f for f in index.json()["files"] if f["filename"] == DS_SDIST]
        if not files:
            raise RuntimeError(f"{DS_SDIST} is not listed at {index.url}")
        url = index.url.join(files[0]["url"])
        partial = target.with_suffix(".part")
        with client.stream("GET", url) as response, partial.open("wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                out.write(chunk)
    if _sha256(partial) != DS_SHA256:
        partial.unlink()
        raise RuntimeError(f"{url} does not have the published sha256 {DS_SHA256}")
    partial.replace(target)


@pytest.fixture(scope="session")
def ds(tmp_path_factory) -> ModuleType:
    """DeepSpeed 0.19.6's sparsity_config module, imported on its own from the cached sdist."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rugpt-ray"
    sdist = cache / DS_SDIST
    if not sdist.is_file() or _sha256(sdist) != DS_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            _download_sdist(sdist)
        except (httpx.HTTPError, OSError, RuntimeError, KeyError, ValueError) as exc:
            pytest.fail(
                f"cannot fetch the DeepSpeed {DS_VERSION} oracle sdist from {PYPI_SIMPLE} into {sdist}: {exc!r}",
                pytrace=False,
            )
    with tarfile.open(sdist) as tar:
        source = tar.extractfile(DS_MEMBER).read()
    path = tmp_path_factory.mktemp("oracle") / f"ds_sparsity_config_{DS_VERSION.replace('.', '_')}.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def oracle(ds: ModuleType, cfg: dict, num_heads: int, seq_len: int) -> torch.Tensor:
    """What DeepSpeed built for the same config, with the global `random` seeded as our `seed` key says."""
    rest = {k: v for k, v in cfg.items() if k not in ("mode", "seed")}
    random.seed(cfg.get("seed", 0))
    return getattr(ds, DS_CLASSES[cfg["mode"]])(num_heads=num_heads, **rest).make_layout(seq_len)


# ---------------------------------------------------------------------------------------------------------------
# The grid: (config, num_heads, seq_len). Block counts stay small (the oracle loops in Python) but cover short last
# windows, windows longer than the sequence, and out-of-range global indices.


def _grid() -> list[tuple[dict, int, int]]:
    cases: list[tuple[dict, int, int]] = []
    dirs = ("unidirectional", "bidirectional")
    for per_head in (False, True):
        for block, seq_len in ((16, 64), (32, 96), (8, 8)):
            cases.append(({"mode": "dense", "block": block, "different_layout_per_head": per_head}, 3, seq_len))

    # fixed: (local, global, patterns) with patterns > 1 only when every head has its own layout
    for attention in dirs:
        for per_head in (False, True):
            for local, glob, patterns in ((4, 1, 1), (4, 1, 4), (8, 2, 3), (6, 3, 2), (8, 4, 2), (3, 1, 1)):
                if patterns > 1 and not per_head:
                    continue
                for block, seq_len in ((16, 16 * 24), (16, 16 * 17), (8, 8 * 5), (4, 4 * 2), (4, 4 * 1)):
                    for horizontal in (False, True) if attention == "bidirectional" else (False,):
                        cfg = {
                            "mode": "fixed",
                            "block": block,
                            "different_layout_per_head": per_head,
                            "num_local_blocks": local,
                            "num_global_blocks": glob,
                            "attention": attention,
                            "horizontal_global_attention": horizontal,
                            "num_different_global_patterns": patterns,
                        }
                        cases.append((cfg, 5, seq_len))
    cases.append(({"mode": "fixed"}, 2, 16 * 10))  # constructor defaults
    cases.append((XL_SPARSE_ATTENTION, 16, 2048))
    cases.append((XL_SPARSE_ATTENTION, 16, 16 * 133))  # short last window of 5 blocks
    cases.append((XL_SPARSE_ATTENTION, 16, 16 * 3))

    # variable: windows, globals (with and without end indices, some past the end), random blocks, seeds
    windows = ([4], [2, 3, 5], [1, 6], [30])
    globals_ = (([0], None), ([0, 5, 40], None), ([], None), ([0, 7], [3, 50]), ([2], [3]))
    for attention in dirs:
        for per_head in (False, True):
            for i, (starts, ends) in enumerate(globals_):
                for j, window in enumerate(windows):
                    cfg = {
                        "mode": "variable",
                        "different_layout_per_head": per_head,
                        "num_random_blocks": (0, 1, 3)[(i + j) % 3],
                        "local_window_blocks": window,
                        "global_block_indices": starts,
                        "global_block_end_indices": ends,
                        "attention": attention,
                        "horizontal_global_attention": attention == "bidirectional" and (i + j) % 2 == 1,
                        "seed": i * 7 + j,
                        "block": 16,
                    }
                    cases.append((cfg, 3, 16 * (13 + i + j)))
    cases.append(({"mode": "variable", "seed": 11}, 2, 16 * 9))
    cases.append(({"mode": "variable", "num_random_blocks": 9, "seed": 3}, 2, 16 * 9))  # as many as the row

    # bigbird: unidirectional rows can only draw 0 or 1 random block (row 0 has one candidate)
    for attention in dirs:
        for per_head in (False, True):
            for rnd in (0, 1) if attention == "unidirectional" else (0, 1, 3):
                for window, glob in ((3, 1), (0, 0), (4, 2), (7, 3), (1, 1)):
                    for seed in (0, 1, 2):
                        cfg = {
                            "mode": "bigbird",
                            "different_layout_per_head": per_head,
                            "num_random_blocks": rnd,
                            "num_sliding_window_blocks": window,
                            "num_global_blocks": glob,
                            "attention": attention,
                            "seed": seed,
                            "block": 8,
                        }
                        cases.append((cfg, 3, 8 * (7 + seed)))
    cases.append(({"mode": "bigbird", "seed": 5}, 4, 16 * 12))
    cases.append(({"mode": "bigbird", "num_random_blocks": 3, "num_sliding_window_blocks": 3, "seed": 1}, 2, 48))

    # bslongformer
    for attention in dirs:
        for per_head in (False, True):
            for window in (3, 0, 4, 5):
                for starts, ends in globals_:
                    cfg = {
                        "mode": "bslongformer",
                        "different_layout_per_head": per_head,
                        "num_sliding_window_blocks": window,
                        "global_block_indices": starts,
                        "global_block_end_indices": ends,
                        "attention": attention,
                        "block": 16,
                    }
                    cases.append((cfg, 2, 16 * 11))
    cases.append(({"mode": "bslongformer"}, 2, 16 * 8))
    return cases


GRID = _grid()


def _case_id(case: tuple[dict, int, int]) -> str:
    cfg, heads, seq_len = case
    parts = [cfg["mode"], f"h{heads}", f"L{seq_len}"]
    for key, value in cfg.items():
        if key != "mode":
            short = "".join(word[0] for word in key.split("_"))
            parts.append(f"{short}={value}".replace(" ", ""))
    return "-".join(parts)


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_layout_equals_deepspeed(ds, case):
    cfg, heads, seq_len = case
    expected = oracle(ds, cfg, heads, seq_len)
    state = random.getstate()
    got = make_layout(cfg, heads, seq_len)
    assert random.getstate() == state, "make_layout must not touch the global random state"
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert torch.equal(got, expected), f"differs from DeepSpeed at {(got != expected).nonzero()[:5].tolist()}"


def test_grid_covers_every_mode_and_quirk():
    modes = {cfg["mode"] for cfg, _, _ in GRID}
    assert modes == set(DS_CLASSES)
    short_last_window = [
        c for c, _, L in GRID if c["mode"] == "fixed" and (L // c.get("block", 16)) % c.get("num_local_blocks", 4)
    ]
    assert short_last_window
    assert len({c.get("seed") for c, _, _ in GRID if c["mode"] == "bigbird"}) >= 3


def test_seed_changes_random_layout_and_is_reproducible():
    cfg = {"mode": "bigbird", "num_random_blocks": 2, "seed": 1, "different_layout_per_head": True}
    a, b = make_layout(cfg, 4, 16 * 32), make_layout(cfg, 4, 16 * 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, make_layout({**cfg, "seed": 2}, 4, 16 * 32))
    assert not torch.equal(a[0], a[1]), "each head draws its own random blocks"


@pytest.mark.parametrize("mode", sorted(DS_CLASSES))
def test_defaults_and_keys_equal_deepspeed_constructor(ds, mode):
    params = inspect.signature(getattr(ds, DS_CLASSES[mode]).__init__).parameters
    ds_defaults = {name: p.default for name, p in params.items() if name not in ("self", "num_heads")}
    ours = normalize_sparse_config({"mode": mode})
    ours.pop("mode")
    if mode in ("bigbird", "variable"):
        assert ours.pop("seed") == 0
    assert ours == ds_defaults


def test_normalize_fills_defaults_without_mutating():
    cfg = {"mode": "variable", "local_window_blocks": (2, 3)}
    out = normalize_sparse_config(cfg)
    assert cfg == {"mode": "variable", "local_window_blocks": (2, 3)}
    assert out["local_window_blocks"] == [2, 3] and out["global_block_indices"] == [0] and out["seed"] == 0
    assert normalize_sparse_config(XL_SPARSE_ATTENTION) == XL_SPARSE_ATTENTION


# ---------------------------------------------------------------------------------------------------------------
# ruGPT3XL: fixed, 16-token blocks, 8-block (128-token) windows, one global block per window, 8 patterns.


@pytest.fixture(scope="module")
def xl() -> torch.Tensor:
    return make_layout(XL_SPARSE_ATTENTION, 16, 2048)


def test_xl_is_causal_with_full_local_windows(xl):
    assert xl.shape == (16, 128, 128)
    assert not xl.triu(1).any(), "a block above the diagonal would let a token see the future"
    causal_window = torch.ones(8, 8, dtype=torch.int64).tril()
    for w in range(16):
        assert torch.equal(xl[:, 8 * w : 8 * w + 8, 8 * w : 8 * w + 8], causal_window.expand(16, 8, 8))


def test_xl_one_global_block_per_earlier_window(xl):
    for h in range(16):
        expected_offset = 7 - h % 8
        for row in range(128):
            window = row // 8
            for earlier in range(window):
                seen = xl[h, row, 8 * earlier : 8 * earlier + 8].nonzero().flatten().tolist()
                assert seen == [expected_offset], (h, row, earlier, seen)
            # nothing but the local window and one block per earlier window
            assert xl[h, row].sum().item() == row % 8 + 1 + window
    assert xl.sum(-1).max().item() == 23


def test_xl_heads_repeat_every_eight(xl):
    for h in range(8):
        assert torch.equal(xl[h], xl[h + 8])
        for other in range(h + 1, 8):
            assert not torch.equal(xl[h], xl[other])


def test_xl_density(xl):
    # Block level: 16 windows * 36 causal blocks + 8 * (1 + ... + 15) global blocks, out of 128 * 129 / 2.
    assert layout_density(xl) == pytest.approx(1536 / 8256)
    assert layout_density(xl) == pytest.approx(0.186, abs=0.005)
    # Token level: the layout expanded to tokens AND q >= k, against dense causal attention.
    causal = torch.ones(2048, 2048, dtype=torch.bool).tril()
    kept = sum((xl[h].bool().repeat_interleave(16, 0).repeat_interleave(16, 1) & causal).sum().item() for h in (0, 5))
    token_density = kept / (2 * causal.sum().item())
    assert token_density == pytest.approx((16 * 128 * 129 // 2 + 128 * 16 * 120) / (2048 * 2049 // 2))
    assert token_density == pytest.approx(0.180, abs=0.005)


@pytest.mark.parametrize("seq_len", range(16, 129, 16))
def test_xl_short_sequences_are_dense_causal(seq_len):
    layout = make_layout(XL_SPARSE_ATTENTION, 16, seq_len)
    n = seq_len // 16
    assert torch.equal(layout, torch.ones(16, n, n, dtype=torch.int64).tril())


# ---------------------------------------------------------------------------------------------------------------
# Bad configs: one UserError line naming the key. `ds_rejects` marks those DeepSpeed refused too (constructor,
# TypeError for an unknown keyword, or make_layout); the rest are stricter checks of ours.

FIXED = {"mode": "fixed"}
BAD_CONFIGS = [
    # (cfg, num_heads, seq_len, word the message must name, ds_rejects)
    ({"mode": "sparse"}, 2, 64, "mode", False),
    ({"block": 16}, 2, 64, "mode", False),
    ({**FIXED, "num_random_blocks": 1}, 2, 64, "num_random_blocks", True),
    ({"mode": "bslongformer", "horizontal_global_attention": False}, 2, 64, "horizontal_global_attention", True),
    ({"mode": "dense", "attention": "bidirectional"}, 2, 64, "attention", True),
    ({**FIXED, "seed": 1}, 2, 64, "seed", False),
    ({**FIXED, "block": "16"}, 2, 64, "block", True),
    ({**FIXED, "block": 0}, 2, 64, "block", True),
    ({**FIXED, "different_layout_per_head": 1}, 2, 64, "different_layout_per_head", False),
    ({**FIXED, "num_local_blocks": 4.0}, 2, 64, "num_local_blocks", True),
    ({**FIXED, "attention": "causal"}, 2, 64, "attention", True),
    ({**FIXED, "num_local_blocks": 6, "num_global_blocks": 4}, 2, 64, "num_local_blocks", True),
    ({**FIXED, "num_global_blocks": 0}, 2, 64, "num_global_blocks", True),
    ({**FIXED, "attention": "unidirectional", "horizontal_global_attention": True}, 2, 64, "horizontal", True),
    ({**FIXED, "num_different_global_patterns": 2}, 2, 64, "num_different_global_patterns", True),
    (
        {
            **FIXED,
            "different_layout_per_head": True,
            "num_local_blocks": 4,
            "num_global_blocks": 2,
            "num_different_global_patterns": 3,
        },
        2,
        64,
        "num_different_global_patterns",
        True,
    ),
    ({"mode": "variable", "local_window_blocks": []}, 2, 64, "local_window_blocks", True),
    ({"mode": "variable", "local_window_blocks": [4, 0]}, 2, 64, "local_window_blocks", True),
    ({"mode": "variable", "global_block_indices": [-1]}, 2, 64, "global_block_indices", False),
    ({"mode": "variable", "global_block_indices": 0}, 2, 64, "global_block_indices", True),
    ({"mode": "variable", "global_block_end_indices": [2, 3]}, 2, 64, "global_block_end_indices", True),
    (
        {"mode": "bslongformer", "global_block_indices": [0, 4], "global_block_end_indices": [2, 4]},
        2,
        64,
        "global_block_end_indices",
        True,
    ),
    ({"mode": "variable", "attention": "unidirectional", "horizontal_global_attention": True}, 2, 64, "horiz", True),
    ({"mode": "variable", "num_random_blocks": -1}, 2, 64, "num_random_blocks", True),
    ({"mode": "bigbird", "attention": "unidirectional", "num_random_blocks": 2}, 2, 64, "num_random_blocks", True),
    ({"mode": "bslongformer", "attention": "both"}, 2, 64, "attention", False),
    # make_layout-time checks against the number of blocks
    ({**FIXED, "block": 16}, 2, 72, "block", True),
    ({"mode": "dense", "block": 32}, 2, 48, "block", True),
    ({"mode": "variable", "num_random_blocks": 5}, 2, 64, "num_random_blocks", True),
    ({"mode": "bigbird", "num_random_blocks": 0, "num_sliding_window_blocks": 5}, 2, 64, "num_sliding_window", True),
    ({"mode": "bigbird", "num_random_blocks": 0, "num_global_blocks": 5}, 2, 64, "num_global_blocks", True),
    ({"mode": "bigbird", "num_random_blocks": 5}, 2, 64, "num_random_blocks", True),
    ({"mode": "bslongformer", "num_sliding_window_blocks": 7}, 2, 64, "num_sliding_window_blocks", True),
    (FIXED, 0, 64, "num_heads", False),
    (FIXED, 2, 0, "seq_len", False),
]


@pytest.mark.parametrize(
    ("cfg", "heads", "seq_len", "key", "ds_rejects"),
    BAD_CONFIGS,
    ids=[f"{i}-{c[3]}" for i, c in enumerate(BAD_CONFIGS)],
)
def test_bad_config_is_one_clear_user_error(ds, cfg, heads, seq_len, key, ds_rejects):
    with pytest.raises(UserError) as info:
        make_layout(cfg, heads, seq_len)
    message = str(info.value)
    assert key in message and "\n" not in message, message
    if ds_rejects:
        with pytest.raises((ValueError, TypeError, NotImplementedError, ZeroDivisionError, NameError)):
            oracle(ds, cfg, heads, seq_len)


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(UserError, match=r"num_sliding_window_blocks.*allowed keys: mode, block, .*num_local_blocks"):
        normalize_sparse_config({"mode": "fixed", "num_sliding_window_blocks": 3})


def test_normalize_rejects_a_non_mapping():
    with pytest.raises(UserError, match="mapping"):
        normalize_sparse_config(["fixed"])
