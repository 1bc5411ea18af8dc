"""aligndet.pipeline (make demo): stage order, skipping finished stages, the report."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from aligndet import pipeline
from conftest import fake_runs


def test_stages_run_in_order_and_finished_ones_are_skipped(tmp_path, monkeypatch):
    calls = []
    fake_runs(monkeypatch, calls)
    out = str(tmp_path / "demo")
    seconds = pipeline.run_stages(out, 0.1, seed=0)
    assert list(seconds) == ["stage1", "proposals", "stage2", "finetune_a", "finetune_b"]
    assert [c[0] for c in calls] == ["train_image.py", "-m", "train_box.py", "finetune.py", "finetune.py"]
    image_ckpt = os.path.join(out, "image", "checkpoint.pth")
    assert calls[2][calls[2].index("--init") + 1] == image_ckpt  # stage 2 starts from stage 1
    assert calls[3][calls[3].index("--init") + 1] == image_ckpt  # (a) stage 1 alone
    assert calls[4][calls[4].index("--init") + 1] == os.path.join(out, "box", "checkpoint.pth")  # (b)
    for finetune in calls[3:]:  # same labels, seed and schedule for both
        assert finetune[finetune.index("--label-fraction") + 1] == "0.1" and "--resume" in finetune
    assert calls[3][:calls[3].index("--init")] == calls[4][:calls[4].index("--init")]
    assert json.load(open(os.path.join(out, "stages.json"))).keys() == seconds.keys()

    calls.clear()
    assert pipeline.run_stages(out, 0.1, seed=0).keys() == seconds.keys()
    assert calls == []  # everything was recorded as finished


def test_detector_reaches_stage2_and_both_finetunes(tmp_path, monkeypatch):
    calls = []
    fake_runs(monkeypatch, calls)
    pipeline.run_stages(str(tmp_path / "demo"), 0.1, seed=0, detector="fcos")
    assert [c[c.index("--detector") + 1] for c in calls if "--detector" in c] == ["fcos"] * 3
    assert "--detector" not in calls[0]  # stage 1 trains a backbone only


def test_mask_rcnn_uses_faster_rcnn_stage2_and_reports_mask_ap(tmp_path, monkeypatch):
    calls = []
    fake_runs(monkeypatch, calls)
    pipeline.run_stages(str(tmp_path / "demo"), 0.1, seed=0, detector="mask_rcnn")
    assert [c[c.index("--detector") + 1] for c in calls if "--detector" in c] == ["faster_rcnn", "mask_rcnn",
                                                                                  "mask_rcnn"]
    out = tmp_path / "report"
    for name, metrics in {"image": [{"epoch": 8, "top1": 0.84}],
                          "ft_a": [{"epoch": 20, "AP": 0.35, "AP50": 0.6, "mask_AP": 0.3, "mask_AP50": 0.55}],
                          "ft_b": [{"epoch": 20, "AP": 0.38, "AP50": 0.65, "mask_AP": 0.32, "mask_AP50": 0.6}]}.items():
        os.makedirs(out / name)
        json.dump(metrics, open(out / name / "metrics.json", "w"))
    seconds = {"stage1": 120, "proposals": 60, "stage2": 480, "finetune_a": 180, "finetune_b": 180}
    text = pipeline.report(str(out), seconds, 0.1, detector="mask_rcnn")
    assert "| fine-tuned from | AP | AP50 | mask AP | mask AP50 | pre-training min | fine-tuning min |" in text
    assert "| (b) stage 1 + box-domain (AlignDet) | 0.380 | 0.650 | 0.320 | 0.600 | 11.0 | 3.0 |" in text
    assert "Mask R-CNN" in text


def test_a_failed_stage_stops_with_its_name_and_is_not_recorded(tmp_path, monkeypatch):
    codes = iter([0, 0, 3])
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv, cwd: next(codes))
    out = str(tmp_path / "demo")
    with pytest.raises(SystemExit, match="stage2 failed"):
        pipeline.run_stages(out, 0.1, seed=0)
    assert list(json.load(open(os.path.join(out, "stages.json")))) == ["stage1", "proposals"]


def test_finetuning_runs_side_by_side_on_half_the_cores_each(tmp_path, monkeypatch):
    calls = []
    events = fake_runs(monkeypatch, calls)
    monkeypatch.setattr(pipeline, "cores", lambda: 4)
    out = str(tmp_path / "demo")
    pipeline.run_stages(out, 0.1, seed=0)
    assert [kind for kind, _ in events] == ["start", "start", "wait", "wait"]  # both started before either ends
    (_, a), (_, b) = events[:2]
    assert [a.argv[a.argv.index("--output-dir") + 1], b.argv[b.argv.index("--output-dir") + 1]] == \
        [os.path.join(out, "ft_a"), os.path.join(out, "ft_b")]
    assert a.env["OMP_NUM_THREADS"] == b.env["OMP_NUM_THREADS"] == "2"
    assert [a.stdout.name, b.stdout.name] == [os.path.join(out, "finetune_a.log"), os.path.join(out, "finetune_b.log")]
    records = json.load(open(os.path.join(out, "stages.json")))
    assert records["finetune_a"]["group"] == records["finetune_b"]["group"] == "finetune_a+finetune_b"
    stages = pipeline.Stages(out)
    longest = max(records["finetune_a"]["seconds"], records["finetune_b"]["seconds"])
    assert stages.wall_seconds == pytest.approx(sum(stages.done.values()) - min(
        records["finetune_a"]["seconds"], records["finetune_b"]["seconds"]))
    assert longest <= stages.wall_seconds

    calls.clear()
    pipeline.run_stages(str(tmp_path / "serial"), 0.1, seed=0, side_by_side=False)
    assert len(events) == 4 and [c[0] for c in calls][-2:] == ["finetune.py", "finetune.py"]  # no new process
    assert "group" not in json.load(open(tmp_path / "serial" / "stages.json"))["finetune_a"]


def test_a_failed_side_by_side_run_stops_after_the_other_is_recorded(tmp_path, monkeypatch):
    fake_runs(monkeypatch, [], codes={"ft_a": 2})
    out = str(tmp_path / "demo")
    with pytest.raises(SystemExit, match=r"finetune_a failed \(exit 2\); see .*finetune_a\.log"):
        pipeline.run_stages(out, 0.1, seed=0)
    assert "finetune_b" in json.load(open(os.path.join(out, "stages.json")))
    assert "finetune_a" not in json.load(open(os.path.join(out, "stages.json")))


def test_report_prints_the_table_and_draws_the_curves(tmp_path):
    out = tmp_path / "demo"
    for name, metrics in {"image": [{"epoch": 8, "top1": 0.84}],
                          "ft_a": [{"epoch": 10, "AP": 0.2, "AP50": 0.4}, {"epoch": 20, "AP": 0.35, "AP50": 0.6}],
                          "ft_b": [{"epoch": 10, "AP": 0.25, "AP50": 0.5}, {"epoch": 20, "AP": 0.38, "AP50": 0.65}]}.items():
        os.makedirs(out / name)
        json.dump(metrics, open(out / name / "metrics.json", "w"))
    seconds = {"stage1": 120, "proposals": 60, "stage2": 480, "finetune_a": 180, "finetune_b": 180}
    text = pipeline.report(str(out), seconds, 0.1)
    assert "| (a) stage 1 only | 0.350 | 0.600 | 2.0 | 3.0 |" in text
    assert "| (b) stage 1 + box-domain (AlignDet) | 0.380 | 0.650 | 11.0 | 3.0 |" in text
    assert "top-1 0.840" in text and "total 17.0" in text and "side by side" not in text
    assert open(out / "results.md").read().strip() == text
    # The fine-tuning runs side by side: the total is the wall-clock time, 3 minutes less.
    assert "fine-tuning 3.0 + 3.0 (side by side); total 14.0" in pipeline.report(str(out), seconds, 0.1,
                                                                                  total_seconds=840)
    image = Image.open(out / "curves.png")
    assert image.size == (900, 520)
    # Both runs are drawn in their own colour.
    colours = {tuple(int(v) for v in px) for px in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    assert (70, 110, 170) in colours and (230, 120, 20) in colours


def fake_gain_benchmark(monkeypatch, image_metrics, epochs):
    """benchmarks/pretrain_gain.py with every script replaced by one that records its argv and writes
    ``image_metrics`` (stage 1) or an AP of epoch / 100 at each of ``epochs``. Returns (module, calls)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    import pretrain_gain

    calls = []

    def fake_call(argv, cwd, stdout=None, stderr=None):
        argv = argv[1:]
        calls.append(argv)
        out = argv[argv.index("--output-dir") + 1]
        os.makedirs(out, exist_ok=True)
        metrics = ([image_metrics] if argv[0] == "train_image.py"
                   else [{"epoch": e, "AP": e / 100, "AP50": e / 50} for e in epochs])
        json.dump(metrics, open(os.path.join(out, "metrics.json"), "w"))
        return 0

    monkeypatch.setattr(pipeline.subprocess, "call", fake_call)
    monkeypatch.chdir(os.getcwd())  # main() moves to the repository root; restored afterwards
    return pretrain_gain, calls

def test_gain_benchmark_runs_each_stage_once_and_both_arms_on_one_schedule(tmp_path, monkeypatch, capsys):
    """benchmarks/pretrain_gain.py shares the stage runner: stage 1 and stage 2 once, then (a) and (b)
    on every fold with the same fine-tuning arguments; a second call reuses everything."""
    pretrain_gain, calls = fake_gain_benchmark(monkeypatch, {"epoch": 8, "top1": 0.8}, (5, 10, 15, 20))
    argv = ["pretrain_gain.py", "--workdir", str(tmp_path / "gain"), "--runs", "a", "b", "--fractions", "0.1"]
    monkeypatch.setattr("sys.argv", argv)
    pretrain_gain.main()
    assert [c[0] for c in calls] == ["train_image.py", "train_box.py"] + ["finetune.py"] * 4
    box = calls[1]
    assert box[box.index("--init") + 1] == os.path.join(str(tmp_path / "gain"), "stage1_sup", "checkpoint.pth")
    for a, b in ((calls[2], calls[3]), (calls[4], calls[5])):  # folds 0 and 1
        assert a[:a.index("--init")] == b[:b.index("--init")]
        assert a[a.index("--init") + 1].endswith(os.path.join("stage1_sup", "checkpoint.pth"))
        assert b[b.index("--init") + 1].endswith(os.path.join("stage2", "checkpoint.pth"))
    assert [c[c.index("--fold") + 1] for c in calls[2:]] == ["0", "0", "1", "1"]
    assert "| 10% | mean | 0.2000 | 0.2000 |" in capsys.readouterr().out

    calls.clear()
    pretrain_gain.main()
    assert calls == []  # every stage was recorded as finished

    # A tagged variant of stage 2 reuses stage 1 and the (a) runs; one of fine-tuning re-runs (a) too.
    monkeypatch.setattr("sys.argv", argv + ["--tag", "n2k", "--box-args=--num-samples 2048"])
    pretrain_gain.main()
    assert [c[0] for c in calls] == ["train_box.py", "finetune.py", "finetune.py"]
    box = calls[0]
    assert box[box.index("--num-samples") + 1] == "2048"
    assert box[box.index("--output-dir") + 1].endswith("stage2_n2k")
    assert all(c[c.index("--output-dir") + 1].endswith("_n2k") for c in calls[1:])
    calls.clear()
    monkeypatch.setattr("sys.argv", argv + ["--tag", "recipe", "--finetune-args=--lr 0.03 --weight-decay 5e-5"])
    pretrain_gain.main()
    assert [c[0] for c in calls] == ["finetune.py"] * 4  # the untagged stage 2 is reused
    assert all(c[-4:] == ["--lr", "0.03", "--weight-decay", "5e-5"] for c in calls[1:])
    lines = [json.loads(line) for line in open(tmp_path / "gain" / "ablation.jsonl")]
    assert [r["tag"] for r in lines] == ["default", "default", "n2k", "recipe"]
    assert lines[2]["box_args"] == ["--num-samples", "2048"] and lines[2]["gain"] == 0.0
    assert set(lines[2]["folds"]) == {"0", "1"}
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["pretrain_gain.py", "--workdir", str(tmp_path / "gain"), "--summary"])
    pretrain_gain.main()
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 3  # header, rule, one row per variant (the repeated default once)
    assert table[2].startswith("| default | faster_rcnn | 10% | 0.200 → 0.200, 0.200 → 0.200 | +0.0 |")
    assert "n2k (`--num-samples 2048`)" in table[3] and "recipe (`--lr 0.03 --weight-decay 5e-5`)" in table[4]

    # The held-out fold of a variant: only that fold runs, and the table shows all three folds in one row.
    calls.clear()
    monkeypatch.setattr("sys.argv", argv + ["--tag", "n2k", "--box-args=--num-samples 2048", "--folds", "2"])
    pretrain_gain.main()
    assert [c[c.index("--fold") + 1] for c in calls] == ["2", "2"]
    assert calls[0][calls[0].index("--output-dir") + 1].endswith("ft_a_0.1_fold2")  # (a) is shared by the variants
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["pretrain_gain.py", "--workdir", str(tmp_path / "gain"), "--summary"])
    pretrain_gain.main()
    n2k = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| n2k")]
    assert len(n2k) == 1 and n2k[0].count("0.200 → 0.200") == 3

    # A variant of the transfer changes (b) only: (a) and stage 2 are reused.
    calls.clear()
    monkeypatch.setattr("sys.argv", argv + ["--tag", "regonly", "--transfer-args=--init-skip head.classification_head."])
    pretrain_gain.main()
    assert [c[c.index("--fold") + 1] for c in calls] == ["0", "1"]
    assert all(c[-2:] == ["--init-skip", "head.classification_head."] for c in calls)
    assert all(c[c.index("--init") + 1].endswith(os.path.join("stage2", "checkpoint.pth")) for c in calls)
    assert all(c[c.index("--output-dir") + 1].endswith("_regonly") for c in calls)



def test_gain_benchmark_mask_rcnn_fine_tunes_from_the_shared_faster_rcnn_stage2(tmp_path, monkeypatch):
    pretrain_gain, calls = fake_gain_benchmark(monkeypatch, {"epoch": 8, "top1": 0.8}, (20, 40))
    base = ["pretrain_gain.py", "--workdir", str(tmp_path / "gain"), "--runs", "a", "b", "--fractions", "0.1"]
    monkeypatch.setattr("sys.argv", base)
    pretrain_gain.main()  # Faster R-CNN first: its stage 2 ...
    calls.clear()
    monkeypatch.setattr("sys.argv", base + ["--detector", "mask_rcnn"])
    pretrain_gain.main()  # ... is Mask R-CNN's too: only its four fine-tunings run
    assert [c[0] for c in calls] == ["finetune.py"] * 4
    assert all(c[c.index("--detector") + 1] == "mask_rcnn" for c in calls)
    assert all(c[c.index("--output-dir") + 1].endswith("_mask_rcnn") for c in calls)
    assert calls[1][calls[1].index("--init") + 1].endswith(os.path.join("gain", "stage2", "checkpoint.pth"))


def test_gain_benchmark_self_supervised_rows(tmp_path, monkeypatch):
    """(d) fine-tunes the MoCo v2 stage 1 and (e) a stage 2 started from it; --moco-args with a tag gives
    that recipe its own stage 1, stage 2 and runs."""
    pretrain_gain, calls = fake_gain_benchmark(monkeypatch, {"epoch": 8, "knn_top1": 0.2}, (5, 10))
    gain = str(tmp_path / "gain")
    argv = ["pretrain_gain.py", "--workdir", gain, "--runs", "d", "e", "--fractions", "0.1", "--folds", "0"]
    monkeypatch.setattr("sys.argv", argv)
    pretrain_gain.main()
    assert [c[0] for c in calls] == ["train_image.py", "train_box.py", "finetune.py", "finetune.py"]
    moco = os.path.join(gain, "stage1_moco", "checkpoint.pth")
    assert calls[0][calls[0].index("--method") + 1] == "mocov2"
    assert calls[1][calls[1].index("--init") + 1] == moco
    d, e = calls[2], calls[3]
    assert d[d.index("--init") + 1] == moco
    assert e[e.index("--init") + 1] == os.path.join(gain, "stage2_moco", "checkpoint.pth")
    assert d[:d.index("--init")] == e[:e.index("--init")]  # one schedule and seed for both rows

    calls.clear()
    monkeypatch.setattr("sys.argv", argv + ["--tag", "gray", "--moco-args=--grayscale 1.0"])
    pretrain_gain.main()
    assert [c[0] for c in calls] == ["train_image.py", "train_box.py", "finetune.py", "finetune.py"]
    assert calls[0][calls[0].index("--grayscale") + 1] == "1.0"
    assert calls[0][calls[0].index("--output-dir") + 1].endswith("stage1_moco_gray")
    assert calls[1][calls[1].index("--output-dir") + 1].endswith("stage2_moco_gray")
    assert all(c[c.index("--output-dir") + 1].endswith("_gray") for c in calls[2:])

def test_two_runners_sharing_a_folder_keep_each_others_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv, cwd: 0)
    first, second = pipeline.Stages(str(tmp_path)), pipeline.Stages(str(tmp_path))  # both read an empty record
    first.run("one", "stage one", ["x.py"])
    second.run("two", "stage two", ["y.py"])
    assert set(json.load(open(tmp_path / "stages.json"))) == {"one", "two"}
    assert set(pipeline.Stages(str(tmp_path)).done) == {"one", "two"}


def test_a_stage_asked_for_with_another_command_stops(tmp_path, monkeypatch):
    """A recorded stage is reused for the same command only: new defaults (e.g. a longer schedule) must not pick up
    the old run's results. A record of an older version (seconds alone) is reused as before."""
    calls = []
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv, cwd: calls.append(argv) or 0)
    stages = pipeline.Stages(str(tmp_path))
    stages.run("ft", "fine-tune", ["finetune.py", "--epochs", 20])
    assert pipeline.Stages(str(tmp_path)).run("ft", "fine-tune", ["finetune.py", "--epochs", "20"]) == \
        stages.done["ft"]
    assert len(calls) == 1
    with pytest.raises(SystemExit, match="was run as\n  finetune.py --epochs 20\nnot as\n  finetune.py --epochs 40"):
        pipeline.Stages(str(tmp_path)).run("ft", "fine-tune", ["finetune.py", "--epochs", "40"])
    assert len(calls) == 1
    with open(tmp_path / "stages.json", "w") as f:
        json.dump({"old": 12.5}, f)
    old = pipeline.Stages(str(tmp_path))
    assert old.run("old", "an old stage", ["anything.py"]) == 12.5 and old.done == {"old": 12.5}
    assert len(calls) == 1


def test_gain_benchmark_prints_first_and_last_epoch_losses(tmp_path, monkeypatch, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    import pretrain_gain

    run = tmp_path / "ft_a_0.1_fold0_fcos"
    run.mkdir()
    steps = [{"epoch": e, "iter": i, "loss": 1.0, "loss_classifier": c, "loss_box_reg": 0.5}
             for i, (e, c) in enumerate(((0, 0.8), (0, 0.6), (1, 0.2), (1, 0.4)))]
    with open(run / "log.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in steps + [{"epoch": 1, "epoch_time": 3.0}])
    json.dump([{"epoch": 2, "AP": 0.25}], open(run / "metrics.json", "w"))
    pretrain_gain.print_losses(str(tmp_path))
    rows = capsys.readouterr().out.splitlines()
    assert rows[2] == "| ft_a_0.1_fold0_fcos | 2 | 0.700 / 0.500 / – | 0.300 / 0.500 / – | 0.2500 (epoch 2) |"
