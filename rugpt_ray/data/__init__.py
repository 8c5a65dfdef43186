"""Training data, text or chat: input resolution, the Ray Data prepare pipeline, the Parquet cache, Ray Train ingest.

Importing this package does not import Ray (the CLI starts fast); Ray is imported inside the functions that use it.
"""

from rugpt_ray.data.ingest import PreparedData, TrainIngest, open_prepared, rank_rows, train_ingest
from rugpt_ray.data.inputs import resolve_input_sizes, resolve_inputs
from rugpt_ray.data.prepare import DataConfig, check_inputs, format_summary, prepare_data
from rugpt_ray.data.text import Document, iter_documents

__all__ = [
    "DataConfig", "Document", "PreparedData", "TrainIngest", "check_inputs", "format_summary",
    "iter_documents", "open_prepared", "prepare_data", "rank_rows", "resolve_input_sizes", "resolve_inputs",
    "train_ingest",
]
