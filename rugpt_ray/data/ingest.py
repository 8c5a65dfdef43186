"""Hand a prepared cache to Ray Train so that no worker waits forever at the end of an epoch.

With several workers, Ray Train splits each dataset with `streaming_split(num_workers, equal=True)`, which gives
every worker exactly the same number of rows but drops the remainder when the count does not divide. We add at most
num_workers - 1 padding rows (all `pad_id`, `idx` -1) instead, so the shards are disjoint, together hold every
block, and every worker gets the same number of batches for any batch size. A single worker reads its datasets
whole: a split of one only adds Ray Data's split coordinator, an actor process that cost a tiny 20-step run ~2 of
its ~23 CPU-seconds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rugpt_ray.data.cache import META_NAME, blocks_table, mismatches, read_meta
from rugpt_ray.errors import UserError
from rugpt_ray.ray_start import start_ray
from rugpt_ray.storage import filesystem, is_uri

if TYPE_CHECKING:
    from rugpt_ray.tokenizer import RuGPTTokenizer


def _configure(ds):
    """Ordered execution (a seed then gives the same order in every run) and no Ray progress bars in the logs."""
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    ds.context.execution_options.preserve_order = True
    return ds


def _read_shards(paths: list[str]):
    """`read_parquet` through Ray Data's V1 Parquet reader. The V2 reader (Ray's default since 2.5x) lists files by
    starting a pool of FooterReader actors (32 by default), a process each, at every execution, so every epoch; a
    cache's shards are few and named in meta.json, and on a small node those processes cost more than the epoch.
    This can go when V2 sizes its pool by the number of files, or when V1 is removed."""
    import ray.data

    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths)
    finally:
        context.use_datasource_v2 = v2


@dataclass(frozen=True)
class PreparedData:
    """An opened prepare-data cache: its meta.json and the Parquet shards of each split."""

    path: str
    meta: dict

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def block_len(self) -> int:
        return self.meta["block_len"]

    @property
    def pad_id(self) -> int:
        return self.meta["tokenizer"]["pad_id"]

    @property
    def chat_template(self) -> str | None:
        """The template chat data was rendered with (its blocks carry a loss mask); None for text."""
        return self.meta.get("chat_template")

    def blocks(self, split: str) -> int:
        return self._split(split)["blocks"]

    def _split(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise UserError(f"{self.path}: no {split!r} split (has {', '.join(self.splits)}); "
                            "pass --valid to prepare-data for a validation split")
        return self.meta["splits"][split]

    def head(self, split: str, rows: int, column: str = "input_ids") -> np.ndarray:
        """The first `rows` blocks of a split in cache order (their ids, or another column such as the loss mask),
        as a [n, block_len] array, read with pyarrow alone: validation needs a few fixed blocks, and a Ray Data
        pipeline per worker costs seconds to start."""
        import pyarrow.parquet as pq

        fs, root = filesystem(self.path)
        out, left = [], rows
        for shard in self._split(split)["shards"]:
            if left <= 0:
                break
            values = pq.read_table(f"{root.rstrip('/')}/{shard}", columns=[column], filesystem=fs)[column]
            ids = values.combine_chunks().flatten().to_numpy().reshape(-1, self.block_len)[:left]
            out.append(ids)
            left -= len(ids)
        return np.concatenate(out) if out else np.zeros((0, self.block_len), np.int32)

    def dataset(self, split: str = "train", *, shuffle_seed: int | None = None):
        """Blocks of one split as a Ray Dataset. With a seed, rows are reshuffled at every execution (every
        epoch), and a new dataset with the same seed repeats the same sequence; without one, they come in cache
        order. A global shuffle, not per shard file: a file holds consecutive text."""
        import ray.data

        paths = [f"{self.path.rstrip('/')}/{shard}" for shard in self._split(split)["shards"]]
        ds = _read_shards(paths)
        if shuffle_seed is not None:
            ds = ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
        return _configure(ds)


def open_prepared(path: str, *, tokenizer: RuGPTTokenizer | None = None, seq_len: int | None = None) -> PreparedData:
    """Open a cache, refusing one built with another tokenizer or seq_len than the given ones."""
    path = path if is_uri(path) else os.path.abspath(path)
    meta = read_meta(path)
    if meta is None:
        raise UserError(f"{path}: no {META_NAME}; run `rugpt-ray prepare-data ... --out {path}` first")
    diffs = mismatches(meta, tokenizer=tokenizer, seq_len=seq_len)
    if diffs:
        raise UserError(f"{path}: prepared cache refused: {'; '.join(diffs)}; run prepare-data again")
    return PreparedData(path, meta)


def rank_rows(blocks: np.ndarray, rank: int, world: int, pad_id: int) -> np.ndarray:
    """Rank `rank`'s share of `blocks`: every rank gets the same number of rows (under ZeRO-3 a forward is a
    collective), the last ones padded with all-`pad_id` rows whose labels are masked."""
    per_rank = -(-len(blocks) // world)
    padded = np.full((per_rank * world, blocks.shape[1]), pad_id, blocks.dtype)
    padded[:len(blocks)] = blocks
    return padded[rank * per_rank:(rank + 1) * per_rank]


@dataclass
class TrainIngest:
    """What TorchTrainer needs: `TorchTrainer(..., datasets=ingest.datasets, dataset_config=ingest.dataset_config,
    scaling_config=ScalingConfig(num_workers, resources_per_worker=ingest.resources_per_worker))`.

    In a worker, `ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=B)` yields exactly
    `batches_per_epoch(split, B)` batches on every worker. Padding rows are all `pad_id` (and loss mask 0): mask
    labels equal to `pad_id` (the seed's rule) and divide the loss by max(1, unmasked tokens).
    """

    datasets: dict
    dataset_config: object
    rows_per_worker: dict[str, int]
    resources_per_worker: dict[str, float]
    pad_id: int

    def batches_per_epoch(self, split: str, batch_size: int) -> int:
        return math.ceil(self.rows_per_worker[split] / batch_size)


def train_ingest(prepared: PreparedData, num_workers: int, *, seed: int | None = None,
                 splits: list[str] | None = None) -> TrainIngest:
    """Datasets, split config and worker resources for `num_workers` Ray Train workers.

    The training split is reshuffled every epoch from `seed` (default: the seed it was prepared with); the others
    keep cache order. Each worker asks for at most 1 CPU and together they leave one CPU of the cluster free,
    because Ray Data's read tasks need one: on 2 CPUs, 2 workers of 1 CPU each deadlock the ingest.
    """
    import ray
    import ray.data
    from ray.train import DataConfig as RayDataConfig

    if num_workers < 1:
        raise UserError(f"num_workers must be >= 1, got {num_workers}")
    start_ray(log_to_driver=False, dashboard=False)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    per_worker = math.floor(min(1.0, (cpus - 1) / num_workers) * 100) / 100
    if per_worker <= 0:
        raise UserError(f"{num_workers} training workers on {cpus:g} CPUs leave no CPU for Ray Data's reads; "
                        "the cluster needs at least 2 CPUs")
    seed = prepared.meta["seed"] if seed is None else seed
    datasets, rows = {}, {}
    for split in splits or prepared.splits:
        ds = prepared.dataset(split, shuffle_seed=seed if split == "train" else None)
        n = prepared.blocks(split)
        pad = -n % num_workers
        if pad:
            shape = (pad, prepared.block_len)
            mask = np.zeros(shape, np.int8) if prepared.chat_template is not None else None
            padding = blocks_table(np.full(shape, prepared.pad_id, np.int32), np.full(pad, -1), mask)
            ds = _configure(ds.union(ray.data.from_arrow(padding)))
        datasets[split] = ds
        rows[split] = (n + pad) // num_workers
    # Train replaces each dataset's options with these. Not RayDataConfig.default_ingest_options(): in Ray 2.60 it
    # passes the deprecated exclude_resources on, and every run printed the RayDeprecationWarning for it.
    current = ray.data.DataContext.get_current().execution_options
    options = ray.data.ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                                        verbose_progress=current.verbose_progress)
    split = "all" if num_workers > 1 else []  # one worker: unsplit (see the module's docstring)
    return TrainIngest(datasets, RayDataConfig(datasets_to_split=split, execution_options=options), rows,
                       {"CPU": per_worker}, prepared.pad_id)
