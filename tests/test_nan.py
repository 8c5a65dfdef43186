"""Training never trains on through NaN, and never reports a made-up number: a step whose loss or gradient norm is
not finite is skipped and counted; max_nonfinite_steps of them in a row stop the run with one line naming the step,
its last good checkpoint still the newest. ZeRO stage 0 in fp32 (where DeepSpeed computes no norm) reports one."""

import math

import pytest
from test_train import base, metrics

from rugpt_ray.checkpoints import checkpoint_problem, load_model
from rugpt_ray.errors import UserError
from rugpt_ray.train import NAN_ENV, train


@pytest.fixture(scope="module")
def prepared(prepare_once, data_dir) -> str:
    corpus = data_dir / "corpus"
    return prepare_once("corpus-seq64", inputs=[str(corpus / "train")], valid=[str(corpus / "valid")],
                        tokenizer=str(data_dir / "tokenizer"), seq_len=64)["out"]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, prepared, ray_local, monkeypatch):
    """Rank 0's loss is NaN at step 3 (once: skipped, training goes on) and from step 6 (three in a row with
    max_nonfinite_steps=3: the run stops at step 8, before step 8's checkpoint)."""
    monkeypatch.setenv(NAN_ENV, "3,6,7,8,9,10")
    cfg = base(tmp_path, prepared, zero_stage=0, precision="fp32", max_steps=12, save_interval=4, log_interval=1,
               eval_interval=100, max_nonfinite_steps=3)
    with pytest.raises(UserError, match=r"^training stopped at step 8: 3 steps in a row had a non-finite loss or "
                                        r"gradient norm \(skipped, not applied\); the newest checkpoint is "
                                        r".*/run/step_0000004$"):
        train(cfg)
    rows = {row["step"]: row for row in metrics(tmp_path / "run")}
    assert sorted(rows) == list(range(1, 9))
    good, bad = (1, 2, 4, 5), (3, 6, 7)
    for step in good:  # DeepSpeed has no norm at stage 0: the optimizer computes it (train.CheckedAdamW)
        assert math.isfinite(rows[step]["loss"]) and 0 < rows[step]["grad_norm"] < 100, rows[step]
    for step in bad:  # no loss from a skipped step, and its norm as it was
        assert math.isnan(rows[step]["loss"]) and not math.isfinite(rows[step]["grad_norm"]), rows[step]
    assert [rows[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert rows[8]["stopped_nonfinite"] == 3
    assert rows[3]["lr"] == rows[2]["lr"] != rows[4]["lr"]  # a skipped step does not advance the schedule
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000004"]
    assert checkpoint_problem(str(run / "step_0000004")) is None
    model = load_model(run)
    assert all(p.isfinite().all() for p in model.parameters())  # the NaN steps changed no weight
