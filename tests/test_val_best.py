"""`--val-data` (held-out contrastive loss) and `--keep-best` (checkpoints/best.pt) (issue 17):
val/loss against a naive recomputation on the saved checkpoint, best.pt against the step
checkpoint it copies, and a run killed with SIGKILL that resumes without gaps or duplicates."""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_util import run as run_cli
from PIL import Image

from clipkit import checkpoint
from clipkit.data.eval_io import iter_tar_samples
from clipkit.eval.loading import load_model
from clipkit.train.best import BestTracker, parse_keep_best
from clipkit.train.logging import read_metrics

TINY = ["--model", "test", "--batch-size", 16, "--workers", 0, "--threads", 1, "--warmup", 2]
TINY += ["--lr", "1e-3", "--device", "cpu", "--log-every", 1, "--eval-workers", 0]


def _val_records(run: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps  # no evaluation twice
    return {r["step"]: r["val/loss"] for r in records}


def naive_val_loss(ckpt: Path, shards: Path, batch_size: int, loss: str = "clip") -> float:
    """Every sample of the held-out shards in file order, its image through the evaluation
    transform and its first caption; the loss of consecutive batches, by hand."""
    loaded = load_model(checkpoint=str(ckpt))
    model = loaded.model
    images, captions = [], []
    for shard in sorted(shards.glob("*.tar")):
        for _, fields in iter_tar_samples(str(shard)):
            image = Image.open(io.BytesIO(fields["jpg"])).convert("RGB")
            images.append(loaded.preprocess(image))
            captions.append(fields["txt"].decode().strip().splitlines()[0])
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack(images)), dim=-1)
        txt = F.normalize(model.encode_text(loaded.tokenizer(captions)), dim=-1)
        scale = model.logit_scale.exp()
        total = 0.0
        for start in range(0, len(img), batch_size):
            i, t = img[start : start + batch_size], txt[start : start + batch_size]
            logits = scale * i @ t.T  # (B, B)
            if loss == "siglip":
                signs = 2 * torch.eye(len(i)) - 1
                value = -F.logsigmoid(signs * (logits + model.logit_bias)).sum() / len(i)
            else:
                labels = torch.arange(len(i))
                value = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            total += float(value) * len(i)
    return total / len(img)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_val_loss_equals_a_naive_recomputation(demo_root, tmp_path, loss):
    run = tmp_path / "run"
    args = ["--data", demo_root / "train", "--out", run, *TINY, "--steps", 3, "--loss", loss]
    code, _, err = run_cli("pretrain", *args, "--val-data", demo_root / "eval", "--eval-every", 2)
    assert code == 0, err
    got = _val_records(run)
    assert sorted(got) == [2, 3]
    # 64 held-out pairs at batch 16: 4 batches; --eval-batch-size only changes the reading
    want = naive_val_loss(run, demo_root / "eval", 16, loss)
    assert got[3] == pytest.approx(want, abs=1e-5)
    assert got[2] != got[3]


def test_keep_best_holds_the_best_steps_weights(demo_root, tmp_path):
    run = tmp_path / "run"
    args = ["--data", demo_root / "train", "--out", run, *TINY, "--steps", 6, "--save-every", 2]
    best_args = ["--val-data", demo_root / "eval", "--eval-every", 2, "--keep-best", "val/loss:max"]
    code, _, err = run_cli("pretrain", *args, *best_args, "--keep-last", 1)
    assert code == 0, err
    values = _val_records(run)
    step = max(values, key=values.get)  # :max: the highest loss is "best" here
    best = checkpoint.load(run / "checkpoints" / "best.pt")
    assert best["best"] == {
        "metric": "val/loss", "direction": "max", "value": values[step], "step": step
    }  # fmt: skip
    assert best["step"] == step
    assert [p.name for p in (run / "checkpoints").glob("step-*.pt")] == ["step-6.pt"]  # pruned
    final = checkpoint.load(run)
    assert final["best"] == best["best"]  # the tracker rides in every step checkpoint
    # best.pt is a complete checkpoint: its val loss recomputed from it is the logged one
    assert naive_val_loss(run / "checkpoints" / "best.pt", demo_root / "eval", 16) == (
        pytest.approx(values[step], abs=1e-5)
    )
    code, _, err = run_cli(
        "zero-shot", "demo", "--data-root", demo_root, "--checkpoint",
        run / "checkpoints" / "best.pt", "--workers", 0, "-o", tmp_path / "zs.json",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("export", "-c", run / "checkpoints" / "best.pt", "--out", tmp_path / "x")
    assert code == 0 and (tmp_path / "x" / "open_clip_config.json").is_file(), err


def test_best_tracker_directions_and_resume_state():
    assert parse_keep_best("val/loss") == ("val/loss", "min")
    assert parse_keep_best("eval/in1k/acc1") == ("eval/in1k/acc1", "max")
    assert parse_keep_best("eval/in1k/acc1:min") == ("eval/in1k/acc1", "min")
    tracker = BestTracker.from_option("val/loss")
    assert tracker.update([{"val/loss": 2.0}], 2)
    assert not tracker.update([{"val/loss": 3.0}], 4)
    assert not tracker.update([{"eval": "val", "error": "damaged"}], 5)
    assert not tracker.update([{"val/loss": float("nan")}], 6)
    assert tracker.update([{"val/loss": 1.5}], 8) and (tracker.value, tracker.step) == (1.5, 8)
    again = BestTracker.from_option("val/loss")
    again.resume(tracker.state())
    assert (again.value, again.step) == (1.5, 8)
    other = BestTracker.from_option("val/loss:max")
    other.resume(tracker.state())  # another choice of direction: afresh
    assert (other.value, other.step) == (None, None)


def _cmd(data, val, out, *extra):
    args = ["--data", data, "--out", out, *TINY, "--steps", 8, "--save-every", 4]
    args += ["--val-data", val, "--eval-every", 2, "--keep-best", "val/loss:max", "--workers", 1]
    return [sys.executable, "-m", "clipkit", "pretrain", *map(str, args), *extra]


@pytest.mark.slow
def test_sigkill_then_resume_continues_evaluations_and_best(demo_root, tmp_path):
    data, val = demo_root / "train", demo_root / "eval"
    ref = tmp_path / "ref"
    subprocess.run(_cmd(data, val, ref), check=True, capture_output=True, timeout=300)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, val, run), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    latest, end = run / "checkpoints" / "latest.pt", time.time() + 200
    while not latest.exists():
        assert proc.poll() is None and time.time() < end, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(run)["step"] in (4, 8)
    subprocess.run(_cmd(data, val, run, "--resume"), check=True, capture_output=True, timeout=300)
    want, got = _val_records(ref), _val_records(run)
    assert sorted(got) == [2, 4, 6, 8]
    assert got == want  # exact resume: the same evaluations, bit for bit
    a, b = (checkpoint.load(r / "checkpoints" / "best.pt") for r in (ref, run))
    assert a["best"] == b["best"] and a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads(json.dumps(b["best"]))["step"] == max(want, key=want.get)
