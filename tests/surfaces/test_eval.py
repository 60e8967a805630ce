"""The evaluation harness end to end: real file formats, resume after a kill, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conceptattention.cli import app
from conceptattention.eval.fixtures import write_imagenet_seg_mat, write_voc

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def imagenet_mat(tmp_path_factory):
    rng = np.random.default_rng(0)
    images, masks = [], []
    for h, w in [(40, 52), (48, 36), (44, 44), (36, 60), (50, 40), (40, 40)]:
        images.append(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
        masks.append(mask)
    path = tmp_path_factory.mktemp("imagenet") / "gtsegs_ijcv.mat"
    wnids = ["n02105162", "n02123045", "n02105162", "n01443537", "n02123045", "n04146614"]
    write_imagenet_seg_mat(path, images, masks, wnids)
    return path


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    rng = np.random.default_rng(1)
    items = {}
    for k, classes in enumerate([(12,), (8,), (12, 15), (1,), (15,)]):
        labels = np.zeros((40, 48), np.uint8)
        for j, c in enumerate(classes):
            labels[5 + 10 * j : 20 + 10 * j, 8 + 12 * j : 30 + 12 * j] = c
        labels[0, :] = 255
        items[f"2007_{k:06d}"] = (rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), labels)
    root = tmp_path_factory.mktemp("voc")
    write_voc(root, items)
    return root


def _rows(folder: Path) -> list[dict]:
    """Report rows without the timing column (wall-clock differs run to run)."""
    import csv

    with (folder / "report.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds_per_image"} for row in csv.DictReader(handle)]


def test_imagenet_seg_binary_protocol_report(saved_scene_model, imagenet_mat, tmp_path):
    out = tmp_path / "in"
    result, output = _cli("eval", "imagenet-seg", "--data", imagenet_mat, "--model", saved_scene_model, "--out", out,
                          "--method", "concept_attention", "--method", "cross_attention", "--num-samples", "2",
                          "--per-block")  # fmt: skip
    assert result.exit_code == 0, output
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["concept_attention", "cross_attention"]
    assert all(int(r["images"]) == 6 for r in rows)
    for row in rows:
        acc, compat = float(row["acc"]), float(row["miou_paper_compat"])
        assert compat == pytest.approx(acc / (2 - acc))
        assert 0 <= float(row["map"]) <= 1 and len(json.loads(row["blocks_miou"])) == 2
    records = [json.loads(x) for x in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {r["id"] for r in records} == {r["id"] for r in records[:6]}
    labelled = sum(n for r in records[:1] for _, _, n in r["stats"]["confusion"])
    assert labelled == 224 * 224  # GT compared at 224 x 224
    report = (out / "report.md").read_text()
    assert (out / "per_block.png").is_file() and "miou_paper_compat" in report
    acc = float(rows[0]["acc"])
    assert f"| concept_attention | 0.5 | 6 | {100 * acc:.2f} |" in report  # t as is, metrics in %


def test_batch_size_counts_forwards_and_does_not_change_results(saved_scene_model, imagenet_mat, tmp_path, monkeypatch):
    import conceptattention.eval.protocol as protocol

    calls = []
    encode = protocol.encode_image

    def counting(pipe, images, *args, **kwargs):
        calls.append((len(images), kwargs["max_batch"]))
        return encode(pipe, images, *args, **kwargs)

    monkeypatch.setattr(protocol, "encode_image", counting)
    reports = {}
    for batch_size in ("1", "6", "default"):
        calls.clear()
        out = tmp_path / f"b{batch_size}"
        option = [] if batch_size == "default" else ["--batch-size", batch_size]
        result, output = _cli("eval", "imagenet-seg", "--data", imagenet_mat, "--model", saved_scene_model, "--out",
                              out, "--num-samples", "3", *option)  # fmt: skip
        assert result.exit_code == 0, output
        reports[batch_size] = _rows(out)
        # 6 forwards per call with 3 draws each = 2 images per call (images sharing a concept list);
        # by default encode mode's rows per forward (4 on CPU): 1 image per call, its 3 draws in one forward
        expected = {"1": [(1, 1)] * 6, "6": [(2, 6), (2, 6), (1, 6), (1, 6)], "default": [(1, 4)] * 6}[batch_size]
        assert sorted(calls, reverse=True) == sorted(expected, reverse=True)
    numeric = ("acc", "miou", "miou_paper_compat", "map", "acc_argmax", "miou_argmax")
    for one, other in [*zip(reports["1"], reports["6"]), *zip(reports["1"], reports["default"])]:
        # maps equal to ~1e-7 whatever the batch (batched matmuls sum in another order); a pixel at a
        # threshold may flip, so the metrics agree to 1e-4 rather than bit for bit
        kept = [k for k in one if k not in numeric]
        assert [one[k] for k in kept] == [other[k] for k in kept]
        for key in numeric:
            assert float(one[key]) == pytest.approx(float(other[key]), abs=1e-4), key


def test_voc_single_and_multi(saved_scene_model, voc_root, tmp_path):
    result, output = _cli("eval", "voc-single", "--data", voc_root, "--model", saved_scene_model, "--out",
                          tmp_path / "single", "--num-samples", "1")  # fmt: skip
    assert result.exit_code == 0, output
    assert int(_rows(tmp_path / "single")[0]["images"]) == 4  # the image with two classes is excluded
    result, output = _cli("eval", "voc-multi", "--data", voc_root, "--model", saved_scene_model, "--out",
                          tmp_path / "multi", "--num-samples", "1", "--batch-size", "2")  # fmt: skip
    assert result.exit_code == 0, output
    assert int(_rows(tmp_path / "multi")[0]["images"]) == 5


def test_missing_dataset_file_is_a_clear_error(saved_scene_model, tmp_path):
    result, output = _cli("eval", "imagenet-seg", "--data", tmp_path / "gtsegs_ijcv.mat", "--model", saved_scene_model)
    assert result.exit_code == 2 and "calvin-vision.net" in " ".join(output.split()) and "Traceback" not in output
    result, output = _cli("eval", "coco", "--model", saved_scene_model)
    assert result.exit_code == 2 and "unknown dataset 'coco'" in output
    result, output = _cli("eval", "scenes", "--method", "gradcam", "--model", saved_scene_model)
    assert result.exit_code == 2 and "unknown method(s) ['gradcam']" in output


def _eval_command(model, out, *extra):
    return [sys.executable, "-m", "conceptattention.cli", "eval", "scenes", "--model", str(model), "--out", str(out),
            "--limit", "24", "--method", "concept_attention", "--method", "value_space", *extra]  # fmt: skip


def test_killed_run_resumes_to_the_same_report(saved_scene_model, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(_eval_command(saved_scene_model, tmp_path / "whole"), env=env, capture_output=True)
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(_eval_command(saved_scene_model, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    records = killed / "records.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or len(records.read_bytes().splitlines()) < 5):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(records.read_bytes().splitlines())
    assert 5 <= partial < 48, "the run should have been killed midway"
    resumed = subprocess.run(_eval_command(saved_scene_model, killed), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert _rows(killed) == _rows(tmp_path / "whole")
    ids = [json.loads(x)["key"] + json.loads(x)["id"] for x in records.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 48  # nothing lost, nothing twice


def test_two_processes_merge_without_duplicates_or_gaps(saved_scene_model, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run(_eval_command(saved_scene_model, tmp_path / "one"), env=env, capture_output=True)
    assert single.returncode == 0, single.stderr.decode()[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
              *_eval_command(saved_scene_model, tmp_path / "two")[2:]]  # fmt: skip
    double = subprocess.run(launch, env=env, capture_output=True, timeout=600)
    assert double.returncode == 0, double.stderr.decode()[-3000:]
    ranks = sorted(p.name for p in (tmp_path / "two").glob("records.rank*.jsonl"))
    assert ranks == ["records.rank0.jsonl", "records.rank1.jsonl"]
    lines = [json.loads(x) for r in ranks for x in (tmp_path / "two" / r).read_text().splitlines()]
    keys = [(x["key"], x["id"]) for x in lines]
    assert len(keys) == len(set(keys)) == 48
    for got, want in zip(_rows(tmp_path / "two"), _rows(tmp_path / "one"), strict=True):
        assert got["method"] == want["method"] and got["images"] == want["images"] == "24"
        for column in ("acc", "miou", "map"):
            assert float(got[column]) == pytest.approx(float(want[column]), abs=1e-6)


def test_timestep_sweep_gives_one_row_per_t(saved_scene_model, tmp_path):
    result, output = _cli("eval", "scenes", "--model", saved_scene_model, "--out", tmp_path / "sweep", "--limit", "3",
                          "--t", "0.3", "--t", "0.7", "--per-block", "--layers", "1")  # fmt: skip
    assert result.exit_code == 0, output
    rows = _rows(tmp_path / "sweep")
    assert [(r["method"], r["t"], r["images"]) for r in rows] == [("concept_attention", "0.3", "3"),
                                                                  ("concept_attention", "0.7", "3")]  # fmt: skip
    assert rows[0]["miou"] != rows[1]["miou"]  # each noise level really ran
    assert json.loads(rows[0]["blocks_miou"])[0] == pytest.approx(float(rows[0]["miou"]), abs=1e-5)  # 1 block = all


def test_single_stream_blocks_are_evaluated_recorded_and_guard_the_folder(saved_scene_model, tmp_path):
    out = tmp_path / "single"
    base = ("eval", "scenes", "--model", saved_scene_model, "--out", out, "--limit", "3", "--per-block")
    result, output = _cli(*base, "--layers", "1", "--single-layers", "all")
    assert result.exit_code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == [1] and manifest["single_layers"] == [0]
    records = [json.loads(line) for line in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert all(r["block_labels"] == ["double 1", "single 0"] and len(r["blocks"]) == 2 for r in records)
    assert (out / "per_block.png").is_file()
    result, output = _cli(*base, "--layers", "1")  # the same folder without the single-stream block: refused
    assert result.exit_code == 2 and "single_layers" in " ".join(output.split()), output
    result, output = _cli(*base, "--layers", "none", "--single-layers", "0", "--overwrite")
    assert result.exit_code == 0, output
    rows = _rows(out)
    assert len(json.loads(rows[0]["blocks_miou"])) == 1


def test_a_model_made_only_of_single_stream_layers_is_evaluated_on_its_default_layers(tmp_path):
    from tiny_zimage import make_tiny_zimage_pipeline

    make_tiny_zimage_pipeline(seed=0, n_layers=3).save_pretrained(tmp_path / "zimage")
    out = tmp_path / "eval"
    result, output = _cli("eval", "scenes", "--model", tmp_path / "zimage", "--out", out, "--limit", "2",
                          "--resolution", "32", "--per-block")  # fmt: skip
    assert result.exit_code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == [] and manifest["single_layers"] == [0, 1]
    records = [json.loads(line) for line in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["block_labels"] == ["single 0", "single 1"] for r in records)
    assert (out / "per_block.png").is_file()


def test_stray_record_lines_are_skipped_with_one_warning(saved_scene_model, tmp_path, caplog):
    from conceptattention.eval.harness import read_records

    out = tmp_path / "stray"
    command = ("eval", "scenes", "--model", saved_scene_model, "--out", out, "--limit", "3")
    result, output = _cli(*command)
    assert result.exit_code == 0, output
    records = out / "records.rank0.jsonl"
    good = records.read_bytes()
    records.write_bytes(good + b"{}\n42\n\xff\xfe not utf-8\n" + b'{"key": "cut by a kill')
    with caplog.at_level("WARNING"):
        kept = read_records(out)
    assert sum(len(v) for v in kept.values()) == 3
    warnings = [r.getMessage() for r in caplog.records if "unreadable record" in r.getMessage()]
    assert warnings == [f"{records}: skipped 3 unreadable record line(s) (line 4, 5, 6)"]
    result, output = _cli(*command)  # a later eval of the folder still works and recomputes nothing
    assert result.exit_code == 0, output
    assert len(read_records(out)["concept_attention@t=0.5"]) == 3


def test_rerun_with_other_settings_is_refused_and_overwrite_recomputes(saved_scene_model, tmp_path):
    out = tmp_path / "manifest"
    base = ("eval", "scenes", "--model", saved_scene_model, "--out", out, "--limit", "3")
    result, output = _cli(*base)
    assert result.exit_code == 0, output
    first = _rows(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "scenes" and manifest["limit"] == 3 and manifest["seed"] == 0
    assert manifest["model"]["fingerprint"] and manifest["layers"] == [0, 1]
    cases = [
        (("--seed", "1"), "seed (0 there, 1 now)"),
        (("--layers", "0"), "layers ([0, 1] there, [0] now)"),
        (("--limit", "2"), "limit (3 there, 2 now)"),
        (("--per-block",), "per_block (false there, true now)"),
        (("--num-samples", "2"), "protocol"),
    ]
    for extra, setting in cases:
        result, output = _cli(*base[:-2], *(["--limit", "3"] if "--limit" not in extra else []), *extra)
        text = " ".join(output.split())
        assert result.exit_code == 2 and setting in text and "--overwrite" in text, text
    assert _rows(out) == first  # nothing was recomputed or mixed in
    # adding a method or a timestep with everything else equal is allowed
    result, output = _cli(*base, "--method", "concept_attention", "--method", "cross_attention", "--t", "0.5")
    assert result.exit_code == 0, output
    assert {r["method"] for r in _rows(out)} == {"concept_attention", "cross_attention"}
    result, output = _cli(*base[:-2], "--limit", "3", "--layers", "0", "--overwrite")
    assert result.exit_code == 0, output
    assert json.loads((out / "manifest.json").read_text())["layers"] == [0]
    assert {r["method"] for r in _rows(out)} == {"concept_attention"}  # the old results were removed first


def test_a_folder_being_written_is_refused_and_a_stale_lock_is_taken_over(saved_scene_model, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    (out / "eval.lock").write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(),
                                               "since": "2026-11-28 10:00:00"}))  # fmt: skip
    result, output = _cli("eval", "scenes", "--model", saved_scene_model, "--out", out, "--limit", "2")
    text = " ".join(output.split())
    assert result.exit_code == 2 and f"being written by another eval (process {os.getpid()}" in text
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = json.loads((out / "eval.lock").read_text())
    (out / "eval.lock").write_text(json.dumps({**lock, "pid": int(dead.stdout)}))  # its process has ended
    result, output = _cli("eval", "scenes", "--model", saved_scene_model, "--out", out, "--limit", "2")
    assert result.exit_code == 0, output
    assert not (out / "eval.lock").exists()


@pytest.mark.parametrize("dataset", ["scenes", "imagenet-seg"])
def test_score_dataset_gives_the_numbers_of_the_cli(saved_scene_model, imagenet_mat, tmp_path, dataset):
    """The CLI's report and score_dataset (in memory, or into a folder) agree to the last digit."""
    from conceptattention.eval.config import EvalConfig
    from conceptattention.eval.harness import score_dataset
    from conceptattention.loading import load_pipeline

    data = imagenet_mat if dataset == "imagenet-seg" else None
    t_values = (0.4, 0.6) if dataset == "scenes" else (0.5,)
    options = ["--limit", "3", "--num-samples", "2", "--method", "concept_attention", "--method", "value_space",
               "--per-block", "--batch-size", "4", "--seed", "3"]  # fmt: skip
    options += [x for t in t_values for x in ("--t", t)]
    result, output = _cli("eval", dataset, *(["--data", data] if data else []), "--model", saved_scene_model,
                          "--out", tmp_path / "cli", *options)  # fmt: skip
    assert result.exit_code == 0, output
    config = EvalConfig(dataset=dataset, data=data, model=str(saved_scene_model), limit=3, num_samples=2,
                        methods=("concept_attention", "value_space"), t_values=t_values, per_block=True,
                        batch_size=4, seed=3)  # fmt: skip
    pipe = load_pipeline(config.model)
    pipe.set_progress_bar_config(disable=True)
    in_memory = score_dataset(pipe, config.open_dataset(), config)
    into_folder = score_dataset(pipe, config.open_dataset(), config, out=tmp_path / "api")
    columns = ["acc", "miou", "miou_paper_compat", "map"] + (["acc_argmax", "miou_argmax"] if data else [])
    cli_rows = _rows(tmp_path / "cli")
    assert [(r["method"], float(r["t"]), int(r["images"])) for r in cli_rows] == [
        (m, t, 3) for m in ("concept_attention", "value_space") for t in t_values
    ]
    for cli, memory, folder in zip(cli_rows, in_memory, into_folder, strict=True):
        assert (memory["method"], memory["t"], memory["missing"]) == (cli["method"], float(cli["t"]), [])
        for column in columns:  # the CSV holds repr(float): exact round trip
            assert memory[column] == folder[column] == float(cli[column]), column
        blocks = [round(b["miou"], 6) for b in memory["blocks"]]
        assert len(blocks) == 2 and blocks == json.loads(cli["blocks_miou"])


def test_two_processes_both_stop_when_another_eval_holds_the_folder(saved_scene_model, tmp_path):
    """The main process cannot take the lock: the launch fails with the holder named (the launcher stops the
    rank waiting at the barrier), computes nothing and leaves the holder's lock alone."""
    out = tmp_path / "held"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": __import__("socket").gethostname(), "since": "now"}  # a live process
    (out / "eval.lock").write_text(json.dumps(holder))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
              *_eval_command(saved_scene_model, out)[2:]]  # fmt: skip
    done = subprocess.run(launch, env=env, capture_output=True, timeout=300)
    assert done.returncode != 0
    err = " ".join((done.stderr.decode() + done.stdout.decode()).split())  # the console wraps long lines
    assert "is being written by another eval" in err and f"process {os.getpid()}" in err
    assert not list(out.glob("records.rank*.jsonl"))  # nothing computed
    assert json.loads((out / "eval.lock").read_text()) == holder  # the holder's lock is left alone
