"""Population-based training over Train runs: the Tune checkpoint of a trial is a pointer to its Train run's
checkpoint, and an exploit starts the trial's run again from a copy of the donor's.

Ray 2.60's Train V2 cannot be handed another run's checkpoint by Tune, so each trial reports a small Tune
checkpoint (`pointer_checkpoint`: trial, run folder, step) with every Train checkpoint. When PBT exploits, Tune
restarts the trial with the donor's pointer and perturbed values; `exploit` then replaces the trial's own
checkpoints (and Train's record of them) with a copy of the donor's, which the trial's next Train run starts from
(`train(start_from=...)`) with its new lr and weight decay: the schedule goes on at the copied step with the new
peak. Each trial's run folder keeps its lineage (lineage.json): its first values and every exploit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from rugpt_ray.storage import filesystem, read_text, subfolders, write_file

POINTER_FILE = "pointer.json"
LINEAGE_FILE = "lineage.json"
TRAIN_RUN_STATE = CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
"""Ray Train's record of a run's checkpoints (what a re-run of the same name resumes from): removed on exploit, so
that the trial's next run starts from the copy. Ray's own name for it (a private constant: if Ray renames it, the
import fails here instead of an exploited trial quietly resuming its own checkpoint)."""


def pointer_checkpoint(folder: str, trial_id: str, run_dir: str, checkpoint_path: str):
    """A Tune checkpoint in `folder` (a temporary one: Tune copies it when it is reported) that names a Train
    checkpoint (run folder step_NNNNNNN) of this trial, in the run folder's terms (Train's path of one behind a URI
    has no scheme)."""
    from ray.tune import Checkpoint

    name = checkpoint_path.rstrip("/").rpartition("/")[2]
    pointer = {"trial": trial_id, "run": run_dir, "step": int(name.rpartition("_")[2]),
               "checkpoint": f"{run_dir}/{name}"}
    (Path(folder) / POINTER_FILE).write_text(json.dumps(pointer))
    return Checkpoint.from_directory(folder)


def read_pointer(checkpoint) -> dict[str, Any] | None:
    """The pointer of a Tune checkpoint (None: there is none, the trial starts)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / POINTER_FILE).read_text())


def donor_checkpoint(pointer: dict[str, Any]) -> str:
    """The pointed checkpoint while the donor keeps it whole (its manifest checks out), else the donor's newest
    complete one (num_to_keep may have removed the pointed one since)."""
    from rugpt_ray.checkpoints import checkpoint_problem, complete_checkpoint

    if checkpoint_problem(pointer["checkpoint"]) is None:
        return pointer["checkpoint"]
    return complete_checkpoint(pointer["run"])


def exploit(run_dir: str, pointer: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> str:
    """The trial's run starts again from a copy of the donor's checkpoint: its own checkpoints and Train's record of
    them go, the copy takes their place, and lineage.json records the exploit. Returns the copy."""
    import pyarrow.fs as pafs

    source = donor_checkpoint(pointer)
    name = source.rstrip("/").rpartition("/")[2]
    fs, inner = filesystem(run_dir)
    for own in subfolders(run_dir, "step_*"):
        fs.delete_dir(f"{inner}/{own}")
    if fs.get_file_info(f"{inner}/{TRAIN_RUN_STATE}").type != pafs.FileType.NotFound:
        fs.delete_file(f"{inner}/{TRAIN_RUN_STATE}")
    copy = f"{run_dir}/{name}"
    source_fs, source_inner = filesystem(source)
    pafs.copy_files(source_inner, f"{inner}/{name}", source_filesystem=source_fs, destination_filesystem=fs)
    lineage = read_lineage(run_dir) or {"initial": old, "exploits": []}
    event = {"step": int(name.rpartition("_")[2]), "donor": pointer["trial"], "donor_checkpoint": source, "new": new}
    if lineage["exploits"] and {k: lineage["exploits"][-1][k] for k in event} == event:
        return copy  # the same exploit again (the trial failed before its first checkpoint): recorded once
    lineage["exploits"].append({**event, "old": old})
    write_file(f"{run_dir}/{LINEAGE_FILE}", json.dumps(lineage, indent=2))
    return copy


def start_lineage(run_dir: str, params: dict[str, Any]) -> None:
    """A trial's first values, once (before any exploit)."""
    if read_lineage(run_dir) is None:
        write_file(f"{run_dir}/{LINEAGE_FILE}", json.dumps({"initial": params, "exploits": []}, indent=2))


def read_lineage(run_dir: str) -> dict[str, Any] | None:
    text = read_text(f"{run_dir}/{LINEAGE_FILE}")
    return json.loads(text) if text is not None else None


def schedule(runs: str, trial: str, before: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """The values a trial's weights were trained with, as (from step, values): its donors' up to each exploit,
    then the exploit's new values. `before`: only what happened before that step."""
    lineage = read_lineage(f"{runs}/{trial}")
    if lineage is None:
        return []
    points = [(0, lineage["initial"])]
    for event in lineage["exploits"]:
        if before is not None and event["step"] >= before:
            break
        points = [*schedule(runs, event["donor"], event["step"]), (event["step"], event["new"])]
    return points
