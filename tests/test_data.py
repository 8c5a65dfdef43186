"""Data pipeline on the shared corpus with the real tokenizer and a real local Ray (issue 3)."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rugpt_ray.cli import build_parser
from rugpt_ray.data import (
    DataConfig,
    format_summary,
    iter_documents,
    open_prepared,
    prepare_data,
    rank_rows,
    resolve_inputs,
    train_ingest,
)
from rugpt_ray.data.text import tokenize_piece
from rugpt_ray.errors import UserError
from rugpt_ray.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(data_dir: Path) -> Path:
    return data_dir / "corpus"


@pytest.fixture(scope="module")
def reference(corpus: Path, tokenizer) -> dict[str, list[int]]:
    """Each corpus file tokenized directly in one call: what the pipeline must reproduce."""
    return {str(p): tokenizer.encode(p.read_text(encoding="utf-8")) for p in sorted(corpus.glob("*/*.txt"))}


@pytest.fixture(scope="module")
def prepared_2048(prepare_once, corpus: Path, data_dir: Path) -> dict:
    return prepare_once("corpus-2048", inputs=[str(corpus / "train")], valid=[str(corpus / "valid")],
                        tokenizer=str(data_dir / "tokenizer"), seq_len=2048, blocks_per_shard=64)


@pytest.fixture(scope="module")
def prepared_plain(prepare_once, corpus: Path, data_dir: Path) -> dict:
    """Unshuffled, short blocks, and 64 KiB pieces so that most files are tokenized by several tasks."""
    return prepare_once("corpus-plain-127", inputs=[str(corpus / "train")], tokenizer=str(data_dir / "tokenizer"),
                        seq_len=127, shuffle=False, piece_bytes=64 << 10)


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# ---------------------------------------------------------------- inputs (no Ray)


def test_resolve_inputs_accepts_every_form(tmp_path: Path):
    a = _write(tmp_path / "a.txt", "а")
    b = _write(tmp_path / "sub" / "b.txt", "б")
    c = _write(tmp_path / "sub" / "deeper" / "c.txt", "в")
    md = _write(tmp_path / "sub" / "notes.md", "г")
    lst = _write(tmp_path / "lists" / "train.list", "# the seed's file list\n\n../a.txt\n  ../sub/notes.md  \n")
    assert resolve_inputs(lst) == [str(a), str(md)]  # relative to the list's folder; blank and # lines skipped
    assert resolve_inputs(tmp_path / "sub") == [str(b), str(c)]  # folders give their .txt files, recursively
    assert resolve_inputs(str(tmp_path / "sub" / "*")) == [str(b), str(c), str(md)]  # a glob takes what it names
    assert resolve_inputs(str(a)) == [str(a)]
    assert resolve_inputs([str(lst), tmp_path / "sub", str(a)]) == sorted({str(a), str(b), str(c), str(md)})
    assert resolve_inputs(f"file://{tmp_path}/sub") == [f"file://{b}", f"file://{c}"]  # through pyarrow


def test_resolve_inputs_reports_every_missing_path_at_once(tmp_path: Path):
    _write(tmp_path / "ok.txt", "text")
    lst = _write(tmp_path / "train.list", "ok.txt\nmissing1.txt\n# gone.txt\nsub/missing2.txt\n")
    with pytest.raises(UserError) as e:
        resolve_inputs([str(lst), str(tmp_path / "nope"), str(tmp_path / "*.none"), f"file://{tmp_path}/gone.txt"])
    msg = str(e.value)
    assert msg.startswith("5 input paths not found:") and "\n" not in msg
    assert f"missing1.txt ({lst}:2)" in msg and f"missing2.txt ({lst}:4)" in msg
    assert "nope" in msg and "*.none (matches nothing)" in msg and "gone.txt" in msg


# ---------------------------------------------------------------- documents and pieces (no Ray)


def test_iter_documents_warns_skips_and_replaces(tmp_path: Path, caplog):
    paras = _write(tmp_path / "p.txt", "Первый абзац.\nЕщё строка.\n\n  \nВторой.\n\n\nТретий\n")
    bad = _write(tmp_path / "bad.txt", "до ".encode() + b"\xff\xfe" + " после".encode())
    empty = _write(tmp_path / "empty.txt", "")
    blank = _write(tmp_path / "blank.txt", " \n\n ")
    binary = _write(tmp_path / "img.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    paths = [str(p) for p in (paras, bad, empty, blank, binary)]
    with caplog.at_level(logging.WARNING, logger="rugpt_ray.data"):
        docs = list(iter_documents(paths, paragraphs=True))
    assert [d.text for d in docs] == ["Первый абзац.\nЕщё строка.", "Второй.", "Третий", "до \ufffd\ufffd после"]
    assert [(Path(d.path).name, d.index) for d in docs] == [("p.txt", 0), ("p.txt", 1), ("p.txt", 2), ("bad.txt", 0)]
    log = caplog.text
    assert f"{bad}: 2 bytes are not valid UTF-8 (first at byte 5)" in log
    assert f"{empty}: skipped, empty" in log and f"{blank}: skipped, empty" in log
    assert f"{binary}: skipped, not text" in log
    assert [d.text for d in iter_documents([str(paras)])] == [paras.read_text(encoding="utf-8")]  # whole file
    with pytest.raises(UserError, match=r"bad.txt: not valid UTF-8 \(2 invalid bytes, first at byte 5"):
        list(iter_documents([str(bad)], strict_utf8=True))


@pytest.mark.parametrize("paragraphs", [False, True])
def test_file_pieces_give_the_ids_of_the_whole_file(tmp_path: Path, tokenizer, corpus: Path, paragraphs: bool):
    """Cuts fall where the pre-tokenizer splits anyway: any piece size gives the ids of tokenizing in one go."""
    tricky = ("Строка.\nВторая  \n третья\n\n\n — Да!\n\u00a0отступ\nкон\u00a0\nец\r\nQ\n\n \n\nпоследний абзац\n"
              "без\tконца ") * 3
    texts = {tricky: (1, 2, 3, 5, 17, 64), (corpus / "train" / "gogol_nos.txt").read_text(encoding="utf-8"): (4999,)}
    for i, (text, pieces) in enumerate(texts.items()):
        path = _write(tmp_path / f"{i}.txt", text)
        size = path.stat().st_size
        docs = [d.text for d in iter_documents([str(path)], paragraphs=paragraphs)]
        want = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]
        for piece in (*pieces, size):
            got = [tokenize_piece(tokenizer, str(path), s, min(s + piece, size), size, paragraphs=paragraphs,
                                  strict_utf8=False) for s in range(0, size, piece)]
            assert all(r.status == "ok" for r in got)
            assert piece == size or sum(len(r.tokens) > 0 for r in got) > 1  # really cut into pieces
            assert np.concatenate([r.tokens for r in got]).tolist() == want, (i, piece)
            assert sum(r.documents for r in got) == len(docs)


def test_rank_rows_give_every_rank_as_many_rows_padding_the_last():
    blocks = np.arange(5 * 3, dtype=np.int32).reshape(5, 3) + 10
    shares = [rank_rows(blocks, rank, 3, pad_id=0) for rank in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2]  # under ZeRO-3 every rank must run as many forwards
    assert (np.concatenate(shares)[:5] == blocks).all() and (shares[2][1] == 0).all()  # one all-pad row
    assert (rank_rows(blocks, 0, 1, pad_id=0) == blocks).all()


# ---------------------------------------------------------------- the Ray Data pipeline


@pytest.mark.slow
def test_prepare_keeps_tokens_in_full_blocks(prepared_2048: dict, reference: dict, corpus: Path):
    for split in ("train", "valid"):
        s = prepared_2048["splits"][split]
        files = {p: t for p, t in reference.items() if f"/{split}/" in p}
        direct = sum(len(t) + 1 for t in files.values())  # + one EOS per document
        assert s["tokens"] == direct  # exactly the ids of tokenizing each file directly
        assert s["tokens_kept"] == s["blocks"] * 2049 and s["tokens"] - s["tokens_kept"] == s["tokens_dropped"] < 2049
        assert {f["path"]: f["bytes"] for f in s["files"]} == {p: Path(p).stat().st_size for p in files}
        rows = 0
        for shard in s["shards"]:
            table = pq.read_table(Path(prepared_2048["out"]) / shard)
            ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False))
            assert ids.shape[1] == 2049 and table.column("idx").to_pylist() == list(range(rows, rows + len(ids)))
            rows += len(ids)
        assert rows == s["blocks"]
    train = prepared_2048["splits"]["train"]
    assert train["tokens_kept"] / train["tokens"] >= 0.99
    both = [prepared_2048["splits"][k] for k in ("train", "valid")]
    assert sum(s["tokens_kept"] for s in both) / sum(s["tokens"] for s in both) >= 0.99  # short files included
    assert len(train["shards"]) == math.ceil(train["blocks"] / 64)
    order = sorted(str(p) for p in (corpus / "train").glob("*.txt"))
    random.Random(0).shuffle(order)
    assert [f["path"] for f in train["files"]] == order  # seeded file order


@pytest.mark.slow
def test_unshuffled_blocks_decode_back_to_the_documents(prepared_plain: dict, reference: dict, tokenizer):
    prepared = open_prepared(prepared_plain["out"])
    blocks = prepared.dataset("train").take_batch(prepared.blocks("train"), batch_format="numpy")
    assert blocks["idx"].tolist() == list(range(prepared.blocks("train")))
    assert (prepared.head("train", 5) == np.stack(blocks["input_ids"][:5])).all()  # validation's reader: pyarrow
    stream = np.concatenate(list(blocks["input_ids"])).tolist()
    files = [p for p in sorted(reference) if "/train/" in p]
    want = [t for p in files for t in reference[p] + [tokenizer.eos_id]]
    assert len(want) - len(stream) < 128 and stream == want[: len(stream)]
    texts = tokenizer.decode(stream).split("</s>")
    assert len(texts) in (len(files), len(files) + 1)
    for path, text in zip(files, texts, strict=False):
        full = Path(path).read_text(encoding="utf-8")
        assert text == full or (path == files[-1] and full.startswith(text.rstrip("\ufffd")))
    assert prepared_plain["splits"]["train"]["tokens"] == sum(len(reference[p]) + 1 for p in files)


@pytest.mark.slow
def test_epochs_reshuffle_blocks_reproducibly(prepared_2048: dict):
    prepared = open_prepared(prepared_2048["out"])
    n = prepared.blocks("train")
    ds = prepared.dataset("train", shuffle_seed=7)
    epoch1, epoch2 = ([int(i) for i in ds.to_pandas()["idx"]] for _ in range(2))
    assert sorted(epoch1) == sorted(epoch2) == list(range(n))
    assert epoch1 != epoch2 and epoch1 != list(range(n))
    again = prepared.dataset("train", shuffle_seed=7)
    assert [int(i) for i in again.to_pandas()["idx"]] == epoch1


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_workers_get_disjoint_complete_equal_shards(prepared_2048: dict, tmp_path: Path, workers: int):
    # one worker reads the datasets unsplit (no split coordinator), two get streaming splits
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rugpt_ray.train import without_placement_group_cleaner

    prepared = open_prepared(prepared_2048["out"])
    ingest = train_ingest(prepared, num_workers=workers)
    assert ingest.resources_per_worker == {"CPU": {1: 1.0, 2: 0.5}[workers]}  # one of the 2 CPUs stays for Ray Data

    def loop(config):
        import ray.train

        seen = {}
        for epoch, split in ((0, "train"), (0, "valid"), (1, "train")):  # the second train epoch: reshuffled
            ids, widths, batches = [], set(), 0
            for batch in ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=8):
                ids += batch["idx"].tolist()
                widths.add(tuple(batch["input_ids"].shape[1:]))
                batches += 1
            seen[f"{split}{epoch}"], seen[f"{split}{epoch}/batches"] = ids, batches
            seen[f"{split}{epoch}/widths"] = sorted(widths)
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))

    trainer = TorchTrainer(
        loop, train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker=ingest.resources_per_worker),
        datasets=ingest.datasets, dataset_config=ingest.dataset_config,
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="ingest"),
    )
    without_placement_group_cleaner(trainer)  # as train() runs it
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(workers)]
    for split, epochs in (("train", 2), ("valid", 1)):
        n = prepared.blocks(split)
        for epoch in range(epochs):
            shards = [r[f"{split}{epoch}"] for r in ranks]
            every = [i for shard in shards for i in shard]
            assert all(len(shard) == ingest.rows_per_worker[split] == math.ceil(n / workers) for shard in shards)
            assert sorted(i for i in every if i >= 0) == list(range(n))  # complete, and disjoint
            assert every.count(-1) == -n % workers  # padding rows only to even the shards
            assert all(r[f"{split}{epoch}/batches"] == ingest.batches_per_epoch(split, 8) for r in ranks)
            assert all(r[f"{split}{epoch}/widths"] == [[2049]] for r in ranks)
    assert prepared.blocks("train") % 2 == 1  # so that two workers exercise the padding
    assert [i for r in ranks for i in r["train0"]] != [i for r in ranks for i in r["train1"]]  # reshuffled


@pytest.mark.slow
def test_cache_built_with_other_tokenizer_or_seq_len_is_refused(prepared_2048: dict, data_dir: Path, tmp_path: Path,
                                                                tokenizer):
    out = prepared_2048["out"]
    assert open_prepared(out, tokenizer=tokenizer, seq_len=2048).blocks("valid") == prepared_2048["splits"]["valid"][
        "blocks"]
    with pytest.raises(UserError, match="built with seq_len 2048, not 1024"):
        open_prepared(out, tokenizer=tokenizer, seq_len=1024)
    other = tmp_path / "tok"
    other.mkdir()
    shutil.copy(data_dir / "tokenizer" / "vocab.json", other)
    merges = (data_dir / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (other / "merges.txt").write_text("".join(merges[:-1]), encoding="utf-8")
    refused = rf"built with tokenizer .*tokenizer \(fingerprint .*\), not {re.escape(str(other))} \(fingerprint"
    with pytest.raises(UserError, match=refused):
        open_prepared(out, tokenizer=load_tokenizer(other), seq_len=2048)
    # prepare-data on the same folder: same settings -> reused without work; another seq_len -> refused
    cfg = DataConfig(inputs=[str(data_dir / "corpus" / "train")], valid=[str(data_dir / "corpus" / "valid")],
                     tokenizer=str(data_dir / "tokenizer"), seq_len=2048, out=out)
    assert prepare_data(cfg, progress=False)["reused"] is True
    cfg.seq_len = 1024
    with pytest.raises(UserError, match="built with seq_len 2048, not 1024; pass --overwrite"):
        prepare_data(cfg, progress=False)


@pytest.mark.slow
def test_bad_files_are_warned_counted_and_replaced(ray_local, tmp_path: Path, data_dir: Path, tokenizer, caplog):
    text = (data_dir / "corpus" / "valid" / "chekhov_dama_s_sobachkoy.txt").read_text(encoding="utf-8")[:3000]
    folder = tmp_path / "in"
    good = _write(folder / "good.txt", text)
    bad = _write(folder / "bad.txt", text[:500].encode() + b"\xff\xfe\xfd" + text[500:].encode())
    _write(folder / "empty.txt", "")
    _write(folder / "blank.txt", "\n \n")
    binary = _write(folder / "zip.txt", b"PK\x03\x04" + bytes(4000))
    cfg = DataConfig(inputs=[str(folder)], tokenizer=str(data_dir / "tokenizer"), seq_len=63, out=str(tmp_path / "c"),
                     shuffle=False)
    with caplog.at_level(logging.WARNING, logger="rugpt_ray.data"):
        meta = prepare_data(cfg, progress=False)
    log = caplog.text
    offset = len(text[:500].encode())
    assert f"{bad}: 3 bytes are not valid UTF-8 (first at byte {offset})" in log
    assert f"{binary}: skipped, not text" in log
    assert f"{folder / 'empty.txt'}: skipped, empty" in log and f"{folder / 'blank.txt'}: skipped, empty" in log
    s = meta["splits"]["train"]
    assert s["files_skipped"] == {"empty": 2, "binary": 1} and s["bad_utf8_files"] == 1 and s["documents"] == 2
    stats = {Path(f["path"]).name: f for f in s["files"]}
    assert stats["bad.txt"]["bad_bytes"] == 3
    replaced = text[:500] + "\ufffd" * 3 + text[500:]
    assert stats["bad.txt"]["tokens"] == len(tokenizer.encode(replaced)) + 1
    assert s["tokens"] == stats["bad.txt"]["tokens"] + len(tokenizer.encode(good.read_text(encoding="utf-8"))) + 1
    summary = format_summary(meta)
    assert "train: skipped 2 empty, 1 binary" in summary and len(summary.splitlines()) <= 24

    cfg.strict_utf8, cfg.out = True, str(tmp_path / "strict")
    with pytest.raises(UserError, match=rf"{bad}: not valid UTF-8 \(first invalid byte at {offset}; --strict-utf8"):
        prepare_data(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "in"]  # nothing half-written is left


@pytest.mark.slow
def test_nothing_usable_is_a_clear_error(ray_local, tmp_path: Path, data_dir: Path):
    tok = str(data_dir / "tokenizer")
    _write(tmp_path / "e" / "empty.txt", "")
    with pytest.raises(UserError, match="no usable text in the train inputs: all 1 files are empty"):
        prepare_data(DataConfig(inputs=[str(tmp_path / "e")], tokenizer=tok, seq_len=8, out=str(tmp_path / "o")))
    _write(tmp_path / "b" / "bin.txt", bytes(100))
    _write(tmp_path / "b" / "empty.txt", "")
    with pytest.raises(UserError, match="no usable text in the train inputs: 2 files, 1 empty and 1 binary"):
        prepare_data(DataConfig(inputs=[str(tmp_path / "b")], tokenizer=tok, seq_len=8, out=str(tmp_path / "o")))
    _write(tmp_path / "s" / "short.txt", "Коротко.")
    with pytest.raises(UserError, match=r"give \d+ tokens, fewer than one block of seq_len \+ 1 = 2049"):
        prepare_data(DataConfig(inputs=[str(tmp_path / "s")], tokenizer=tok, seq_len=2048, out=str(tmp_path / "o")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "e", "s"]


@pytest.mark.slow
def test_prepare_data_command(ray_local, tmp_path: Path, corpus: Path, data_dir: Path, capsys):
    parser = build_parser()
    lst = _write(tmp_path / "train.list", f"# two short works\n{corpus}/train/gogol_nos.txt\n\n"
                                          f"{corpus}/train/turgenev_mumu.txt\n")
    out = tmp_path / "cache"
    argv = ["prepare-data", "--inputs", str(lst), "--valid", f"file://{corpus}/valid", "--tokenizer",
            str(data_dir / "tokenizer"), "--seq-len", "512", "--out", f"file://{out}", "--paragraphs", "--seed", "3"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert f"prepare-data -> file://{out}: done in" in printed.out and "prepare train: 100.0%" in printed.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "train.list"]  # published, temp folder gone
    assert args.func(parser.parse_args(argv)) == 0 and "up to date, reused" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seq_len"] == 512 and meta["paragraphs"] and meta["seed"] == 3
    paragraphs = list(iter_documents(resolve_inputs(lst), paragraphs=True))
    assert meta["splits"]["train"]["documents"] == len(paragraphs) > 2  # one document per paragraph
    assert [f["path"] for f in meta["splits"]["valid"]["files"]] == [
        f"file://{p}" for p in sorted(str(p) for p in (corpus / "valid").glob("*.txt"))]
    args = parser.parse_args(["prepare-data", "--inputs", str(tmp_path / "missing.list"), "--tokenizer",
                              str(data_dir / "tokenizer"), "--seq-len", "8", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="1 input path not found: .*missing.list"):
        args.func(args)
