"""Issue 14, run directory and config faults: the run lock, restarting a run that stopped before
its first checkpoint, resume changing what a run trains, config type coercion, messages about what
is left after a failure, leftover temporary files, full disks and unwritable output folders."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clipkit import checkpoint
from clipkit.cli.main import cli

TINY = ["--model", "test", "--batch-size", "8", "--threads", "1", "--warmup", "0"]


def run_cli(*args):
    return CliRunner().invoke(cli, ["pretrain", *map(str, args)])


def assert_one_line_error(res, needle, code=2):
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    err = res.stderr.strip()
    assert err.splitlines()[-1].startswith("error:"), err
    assert "Traceback" not in res.output, res.output
    assert needle in err.splitlines()[-1], err


def steps_logged(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def cmd(data, out, *extra) -> list[str]:
    """A real `clipkit pretrain` process that runs until it is stopped."""
    return [
        sys.executable,
        "-m",
        "clipkit",
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        *TINY,
        "--workers",
        "1",
        "--steps",
        "100000",
        "--save-every",
        "100000",
        "--log-every",
        "1",
        *map(str, extra),
    ]


def start(command) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.started = time.time()
    return proc


def wait_for(ready, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-2000:])
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"{proc.args} never got ready")
        time.sleep(0.05)


def holds_lock(run: Path, proc: subprocess.Popen):
    def ready():
        lock = run / ".lock"
        return lock.is_file() and lock.read_text().split()[:1] == [str(proc.pid)]

    return ready


def training(run: Path, proc: subprocess.Popen):
    """Ready once `proc` holds the run and has logged a step (its signal handler is set)."""
    locked, metrics = holds_lock(run, proc), run / "metrics.jsonl"

    def ready():
        try:  # a record of this process, not of a run that stopped before it
            return locked() and metrics.stat().st_mtime > proc.started
        except FileNotFoundError:
            return False

    return ready


# -- 1. one process per run directory ----------------------------------------------------------


@pytest.mark.slow
def test_second_process_on_the_same_run_dir_is_refused(tmp_path, demo_root):
    run = tmp_path / "run"
    first = start(cmd(demo_root / "train", run))
    try:
        wait_for(holds_lock(run, first), first)
        # a restart and a resume are both refused (run at once: they only need to start)
        others = [start(cmd(demo_root / "train", run, *extra)) for extra in ([], ["--resume"])]
        for other in others:
            _, err = other.communicate(timeout=180)  # a loaded CI machine starts slowly
            assert other.returncode == 2, err[-2000:]
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), err
            assert f"in use by another training process (pid {first.pid} " in lines[0]
        wait_for(training(run, first), first)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    logged = steps_logged(run)
    assert logged == list(range(1, len(logged) + 1))  # one writer: no interleaved records
    assert checkpoint.load(run)["step"] == logged[-1]


@pytest.mark.parametrize("holder", ["dead", "alive", "other-host"])
def test_lock_without_flock_falls_back_to_the_recorded_pid(tmp_path, monkeypatch, holder):
    """On file systems without flock the PID in RUN_DIR/.lock decides."""
    import fcntl
    import socket

    from clipkit.train.run_lock import RunDirBusy, RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    pid, host = {
        "dead": (dead, socket.gethostname()),
        "alive": (str(os.getppid()), socket.gethostname()),
        "other-host": (str(os.getppid()), "elsewhere"),
    }[holder]
    (tmp_path / ".lock").write_text(f"{pid} {host}\n")
    if holder == "dead":
        with RunLock(tmp_path):
            assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        assert (tmp_path / ".lock").read_text() == ""  # released: nobody holds it
        return
    with pytest.raises(RunDirBusy, match=f"pid {pid} on host {host}.*delete"):
        RunLock(tmp_path).acquire()


# -- 2. a run that stopped before its first checkpoint can start again --------------------------


@pytest.mark.slow
def test_run_killed_before_its_first_checkpoint_starts_again(tmp_path, demo_root):
    run = tmp_path / "run"
    command = cmd(demo_root / "train", run)
    killed = start(command)
    wait_for(training(run, killed), killed)
    killed.send_signal(signal.SIGKILL)  # leaves config.yaml, logs and a stale .lock behind
    killed.communicate(timeout=60)
    assert (run / "config.yaml").is_file() and not (run / "checkpoints" / "latest.pt").exists()
    assert (run / ".lock").read_text().split()[0] == str(killed.pid)

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    last = resumed.stderr.strip().splitlines()[-1]
    assert "stopped before the first save" in last
    assert "run the same command without --resume" in last

    again = start(command)  # what the message says
    try:
        wait_for(training(run, again), again)
        again.send_signal(signal.SIGTERM)
        _, err = again.communicate(timeout=60)
    finally:
        again.kill()
    assert again.returncode == 0, err[-2000:]
    assert "started again" in err or "starting it again" in err
    logged = steps_logged(run)
    assert logged == list(range(1, len(logged) + 1))  # the killed run's records are gone
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert checkpoint.load(run)["step"] == logged[-1]


def test_a_foreign_config_yaml_is_not_taken_over(tmp_path, demo_root):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("name: my project\n")
    (out / "metrics.jsonl").write_text("mine\n")
    res = run_cli("--data", demo_root / "train", "--out", out, *TINY, "--steps", 1)
    assert_one_line_error(res, "holds a config.yaml that is not a clipkit run config")
    assert (out / "metrics.jsonl").read_text() == "mine\n"


# -- 3. resume keeps what the run trains -------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, demo_root):
    run = tmp_path_factory.mktemp("resume") / "run"
    res = run_cli("--data", demo_root / "train", "--out", run, *TINY, "--workers", 1, "--steps", 2)
    assert res.exit_code == 0, res.output
    return run


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--model", "tiny"], "model.name (saved 'test', given 'tiny')"),
        (["--batch-size", 16], "data.batch_size (saved 8, given 16)"),
        (["--method", "flip"], "method.name (saved 'clip', given 'flip')"),
        (["--seed", 3], "run.seed (saved 0, given 3)"),
        (["--weight-decay", 0.05], "optim.weight_decay (saved 0.2, given 0.05)"),
        (["--image-pool", "avg"], "model.image_pool (saved 'cls', given 'avg')"),
        (["--text-key", "caption"], "data.text_key (saved 'txt', given 'caption')"),
        (["--accum-steps", 2], "optim.accum_steps (saved 1, given 2)"),
        (["--accum-mode", "independent"], "optim.accum_mode (saved 'exact', given 'independent')"),
    ],
)
def test_resume_refuses_options_that_change_what_the_run_trains(short_run, flags, needle):
    before = (short_run / "checkpoints" / "latest.pt").read_bytes()
    config = (short_run / "config.yaml").read_text()
    res = run_cli("--out", short_run, "--resume", "--steps", 4, *flags)
    assert_one_line_error(res, needle)
    assert "--resume cannot change what the run trains" in res.stderr
    assert (short_run / "checkpoints" / "latest.pt").read_bytes() == before
    assert (short_run / "config.yaml").read_text() == config


def test_resume_allows_length_cadence_lr_and_workers_to_change(short_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    res = run_cli(
        "--out", run, "--resume", "--steps", 3, "--lr", 1e-4, "--workers", 0, "--log-every", 1
    )
    assert res.exit_code == 0, res.output
    state = checkpoint.load(run)
    assert state["step"] == 3 and state["config"]["optim"]["lr"] == 1e-4
    assert state["config"]["model"]["name"] == "test"


# -- 4. config values are converted to their option's type, or refused --------------------------


def test_yaml_exponent_is_a_number(tmp_path, demo_root):
    from clipkit.cli.pretrain import resolve_config
    from clipkit.config import validate

    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 1e-3\n  shared_lr: 2E-4\nrun:\n  steps: 1e1\n  samples: null\n")
    cfg = resolve_config(str(f), False, {"run": {"out": "x"}, "data": {"data": "d"}})
    validate(cfg)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.shared_lr == 2e-4 and cfg.run.steps == 10 and isinstance(cfg.run.steps, int)
    run = tmp_path / "run"
    res = run_cli("--data", demo_root / "train", "--out", run, *TINY, "--workers", 0,
                  "--config", f, "--steps", 1)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert checkpoint.load(run)["config"]["optim"]["lr"] == 0.001


@pytest.mark.parametrize(
    "yaml_text, flags, needle",
    [
        ("data:\n  batch_size: sixteen\n", [], "data.batch_size = 'sixteen' (in config file"),
        ("run:\n  steps: 5.5\n", [], "run.steps = 5.5 (in config file"),
        ("optim:\n  lr: fast\n", [], "optim.lr = 'fast' (in config file"),
        ("optim:\n  lr:\n", [], "optim.lr = null"),
        ("data:\n  resampled: maybe\n", [], "is not true or false"),
        ("model:\n  name: 7\n", [], "model.name = 7 (in config file"),
        ("data:\n  workers: true\n", [], "data.workers = True"),
        ("optim:\n  lr: .inf\n", [], "optim.lr = inf: numbers must be finite"),
        (None, ["--steps", "5.5"], "'5.5' is not a valid integer"),
        (None, ["--batch-size", "sixteen"], "'sixteen' is not a valid integer"),
        (None, ["--lr", "inf"], "optim.lr = inf: numbers must be finite"),
        (None, ["--lr", "nan"], "optim.lr = nan: numbers must be finite"),
        (None, ["--stall-timeout", "-inf"], "data.stall_timeout = -inf"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, demo_root, yaml_text, flags, needle):
    extra = list(flags)
    if yaml_text is not None:
        f = tmp_path / "run.yaml"
        f.write_text(yaml_text)
        extra += ["--config", f]
    if "--steps" not in flags and "steps" not in (yaml_text or ""):
        extra += ["--steps", 1]
    out = tmp_path / "out"
    res = run_cli("--data", demo_root / "train", "--out", out, "--model", "test", *extra)
    assert_one_line_error(res, needle)
    assert not out.exists()


# -- 5. what a failed run says is left; leftover temporary files --------------------------------


@pytest.mark.parametrize("saved_before", [False, True])
def test_non_finite_stop_says_what_is_left(tmp_path, demo_root, monkeypatch, saved_before):
    run = tmp_path / "run"
    if saved_before:  # healthy for 2 steps (checkpointed), then non-finite
        from clipkit.methods.clip import CLIPMethod

        real, calls = CLIPMethod.forward, {"n": 0}

        def flaky(self, batch):
            calls["n"] += 1
            loss, parts = real(self, batch)
            return (loss * float("nan"), parts) if calls["n"] > 2 else (loss, parts)

        monkeypatch.setattr(CLIPMethod, "forward", flaky)
        lr = "1e-3"
    else:
        lr = "1e30"  # the weights overflow after one update: no checkpoint is ever written
    common = ["--data", demo_root / "train", "--out", run, *TINY, "--workers", 0, "--steps", 20]
    res = run_cli(*common, "--lr", lr, "--save-every", 2)
    if saved_before:
        assert_one_line_error(res, "the checkpoint of step 2 is intact: continue with --resume", 1)
        return
    assert_one_line_error(res, "no checkpoint was written yet: run the command again without", 1)
    assert "intact" not in res.stderr
    res = run_cli(*common, "--lr", "1e-3", "--save-every", 2)  # the advice works
    assert res.exit_code == 0, res.output
    assert checkpoint.load(run)["step"] == 20


@pytest.mark.parametrize("resume", [False, True])
def test_leftover_temporary_files_are_removed_on_start(tmp_path, short_run, demo_root, resume):
    run = tmp_path / "run"
    if resume:
        shutil.copytree(short_run, run)
    else:  # a run that stopped before its first checkpoint
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(short_run / "config.yaml", run / "config.yaml")
    leftovers = [
        run / "checkpoints" / ".step-4.pt.tmp-99999",
        run / "checkpoints" / ".latest.pt.tmp-99999",
        run / ".metrics.jsonl.tmp-99999",
    ]
    for p in leftovers:
        p.write_bytes(b"half a file")
    keep = run / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    args = ["--resume", "--steps", 3] if resume else ["--steps", 1]
    res = run_cli("--data", demo_root / "train", "--out", run, *TINY, "--workers", 0, *args)
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in leftovers)
    assert keep.read_text() == "mine"


# -- 6. full disk, unwritable output -----------------------------------------------------------


@pytest.mark.parametrize("target", ["checkpoint", "metrics"])
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, demo_root, monkeypatch, target
):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if target == "checkpoint":  # the second checkpoint write hits a full disk
        real_save, calls = torch.save, {"n": 0}

        def save(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 1:
                raise full
            return real_save(*args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        needle = "cannot write " + str(tmp_path / "run" / "checkpoints" / "step-2.pt")
    else:  # metrics.jsonl after the first checkpoint
        from clipkit.train.logging import RunLog

        real_write = RunLog.write

        def write(self, record):
            if record["step"] > 1:
                raise full
            real_write(self, record)

        monkeypatch.setattr(RunLog, "write", write)
        needle = "cannot write " + str(tmp_path / "run")
    run = tmp_path / "run"
    res = run_cli("--data", demo_root / "train", "--out", run, *TINY, "--workers", 0,
                  "--steps", 4, "--save-every", 1, "--log-every", 1)  # fmt: skip
    assert_one_line_error(res, needle, code=1)
    assert "No space left on device" in res.stderr
    if target == "checkpoint":
        assert "the checkpoint of step 1 is intact" in res.stderr
    assert checkpoint.load(run)["step"] == 1
    assert not list((run / "checkpoints").glob(".*"))  # no temporary file left


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "run", "cannot create run directory"


def _a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file", "is a file, not a directory"


def _read_only_parent(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro" / "run", "Permission denied"


def _read_only_run_dir(tmp_path):
    (tmp_path / "run").mkdir(mode=0o555)
    return tmp_path / "run", "cannot write in run directory"


@pytest.mark.parametrize("make", [_under_a_file, _a_file, _read_only_parent, _read_only_run_dir])
def test_unwritable_out_is_refused_before_any_work(tmp_path, demo_root, make):
    if make in (_read_only_parent, _read_only_run_dir) and os.geteuid() == 0:
        pytest.skip("root ignores permissions")
    out, needle = make(tmp_path)
    res = run_cli("--data", demo_root / "train", "--out", out, *TINY, "--steps", 1)
    assert_one_line_error(res, needle)
    assert str(out) in res.stderr
