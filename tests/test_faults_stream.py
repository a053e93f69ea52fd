"""Faults of the training stream (issue 14): data that can never form a batch ends the run with
one line instead of spinning, signals stop a run at any point (also while it waits for data, and
when a scheduler signals the whole process group), oversized images are counted as such."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from clipkit import checkpoint
from clipkit.cli.main import cli
from clipkit.data.check import check_shards
from clipkit.data.decode import BadSample, decode_image

# ---- shard fixtures, written with tarfile (one member per file, webdataset naming) ----------


def _jpeg(colour=(200, 30, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _good(n: int) -> list[dict]:
    return [
        {"__key__": f"{i:05d}", "jpg": _jpeg((i, 0, 0)), "txt": b"a caption", "json": b"{}"}
        for i in range(n)
    ]


def _garbage(n: int) -> list[dict]:
    return [{"__key__": f"{i:05d}", "jpg": b"garbage", "txt": b"a caption"} for i in range(n)]


def _corrupt_second_header(path: Path) -> None:
    """Break the checksum of the tar's second member header: tarfile then ends the archive
    there without an error, so the stream sees one sample holding only the first member."""
    with tarfile.open(path) as tf:
        second = tf.getmembers()[1].offset
    raw = bytearray(path.read_bytes())
    raw[second + 148 : second + 156] = b"zzzzzzzz"
    path.write_bytes(bytes(raw))


def _shards(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / "shards"
    if kind == "garbage":
        _write_tar(folder / "a.tar", _garbage(20))
    elif kind == "corrupt":
        _corrupt_second_header(_write_tar(folder / "a.tar", _good(20)))
    elif kind == "empty":
        _write_tar(folder / "a.tar", [])
    else:
        _write_tar(folder / "a.tar", _good(20))
    return folder


class _Hung(BaseException):
    """Not an Exception: the data code's `except Exception` must not swallow it."""


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging: a SIGALRM in the test process (the stream runs in it with
    --workers 0; with a worker the main process waits on a queue, which the alarm interrupts)."""

    def expired(signum, frame):
        raise _Hung(f"still running after {seconds}s: the stream spins")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _pretrain_args(data: Path, out: Path, workers: int, *extra) -> list[str]:
    args = ["pretrain", "--data", data, "--out", out, "--model", "test", "--steps", "2"]
    args += ["--batch-size", "4", "--threads", "1", "--train-num-samples", "20"]
    return [str(a) for a in [*args, "--workers", workers, *extra]]


# ---- no usable sample: one line, exit 2, in seconds ------------------------------------------

NO_USABLE = {
    # id: (shards, extra flags, what the error must say)
    "all-images-garbage": ("garbage", [], ["100% undecodable_image", "a.tar"]),
    "text-key-typo": (
        "good",
        ["--text-key", "caption"],
        ["100% no_caption", "no caption under key 'caption'", "found keys: jpg, json, txt"],
    ),
    "image-key-typo": (
        "good",
        ["--image-key", "png;webp"],
        ["100% no_image", "no image under key 'png;webp'", "found keys: jpg, json, txt"],
    ),
    "corrupt-second-header": (
        "corrupt",
        [],
        ["100% unreadable_shard", "a.tar"],
    ),
    "zero-members": ("empty", [], ["100% empty_shard", "a.tar yielded no samples"]),
    "zero-members-resampled": ("empty", ["--resampled"], ["100% empty_shard"]),
    "garbage-resampled": ("garbage", ["--resampled"], ["100% undecodable_image"]),
}


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("case", list(NO_USABLE))
def test_no_usable_samples_stops_with_one_line(tmp_path, case, workers):
    kind, extra, needles = NO_USABLE[case]
    data = _shards(tmp_path, kind)
    t0 = time.time()
    with _deadline(60):
        res = CliRunner().invoke(cli, _pretrain_args(data, tmp_path / "run", workers, *extra))
    assert time.time() - t0 < 60
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    last = res.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error: no usable samples: 100% "), last
    assert "data worker 0 of rank 0" in last
    for needle in needles:
        assert needle in last, (needle, last)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- signals: a real process, its own session, signalled as a scheduler does -----------------


def _spawn(data: Path, out: Path, workers: int, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clipkit", *_pretrain_args(data, out, workers, *extra)]
    cmd[cmd.index("--steps") + 1] = "100000"
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's clipkit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as `setsid clipkit pretrain ...`
        env=env,
    )


class _Tail:
    """Collects a pipe in a thread, so the test can wait for text without blocking."""

    def __init__(self, pipe):
        self.data = b""
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for chunk in iter(lambda: pipe.read1(4096), b""):
            self.data += chunk

    def wait_for(self, text: bytes, proc: subprocess.Popen, timeout: float = 90.0) -> None:
        end = time.time() + timeout
        while text not in self.data:
            assert proc.poll() is None, self.data.decode()[-2000:]
            assert time.time() < end, f"{text!r} never appeared: {self.data.decode()[-2000:]}"
            time.sleep(0.05)


def _finish(proc: subprocess.Popen, err: _Tail, timeout: float) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    out = proc.stdout.read().decode()
    err.thread.join(timeout=5)
    return out, err.data.decode()


def _group_gone(pgid: int, timeout: float = 15.0) -> bool:
    """Every process of the group (the data workers too) has exited."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_process_group_sigterm_with_a_worker_checkpoints_and_exits_0(tmp_path):
    data = _write_tar(tmp_path / "shards" / "a.tar", _good(64)).parent
    run = tmp_path / "run"
    proc = _spawn(data, run, 1, "--train-num-samples", 64, "--log-every", 1, "--save-every", 10**6)
    err = _Tail(proc.stderr)
    try:
        deadline = time.time() + 90
        while not (run / "metrics.jsonl").is_file():  # the first step is logged
            assert proc.poll() is None and time.time() < deadline, err.data.decode()[-2000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # main process and data worker alike
        out, log = _finish(proc, err, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-2000:]
    assert "Traceback" not in out + log and "DataLoader worker" not in log
    assert "stopped by SIGTERM" in out and "--resume" in out
    assert checkpoint.load(run)["step"] >= 1
    assert _group_gone(proc.pid), "a data worker outlived the run"


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_while_waiting_for_data_stops_promptly(tmp_path, workers):
    """Garbage only, with --max-bad-fraction 1 (accept any amount): the stream skips forever and
    no batch ever comes. A signal must still end the run, at once and cleanly."""
    data = _shards(tmp_path, "garbage")
    run = tmp_path / "run"
    proc = _spawn(data, run, workers, "--max-bad-fraction", 1, "--stall-timeout", 600)
    err = _Tail(proc.stderr)
    try:
        err.wait_for(b"pretrain:", proc)  # the progress bar: fit() and its handlers are up
        time.sleep(1.0)  # well into the wait for the first batch
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        out, log = _finish(proc, err, timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-2000:]
    assert took < 20, took  # a busy data worker is ended by the DataLoader within ~5 s
    assert "Traceback" not in out + log
    assert "stopped by SIGTERM before the first step: no checkpoint" in out
    assert not (run / "checkpoints" / "latest.pt").exists()
    assert _group_gone(proc.pid)


# ---- oversized images ------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a huge size (PIL reads the size without decoding anything)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# over PIL's own limit x2 (it raises DecompressionBombError), and between x1 and x2 (it warns)
OVERSIZED = [_png_header(20_000, 10_000), _png_header(10_000, 10_000)]


def test_oversized_images_count_as_too_many_pixels(tmp_path):
    for data in OVERSIZED:
        with pytest.raises(BadSample) as e:
            decode_image(data, max_pixels=89_478_485)
        assert e.value.reason == "too_many_pixels"
    with pytest.raises(BadSample) as e:
        decode_image(_jpeg(size=64), max_pixels=1000)
    assert e.value.reason == "too_many_pixels"

    samples = [
        {"__key__": f"big{i}", "png": data, "txt": b"huge"} for i, data in enumerate(OVERSIZED)
    ]
    shard = _write_tar(tmp_path / "shards" / "a.tar", samples + _good(4))
    report = check_shards([str(shard)], write_sizes=False, progress=False)
    assert report["bad_by_reason"] == {"too_many_pixels": 2} and report["samples"] == 4

    res = CliRunner().invoke(
        cli,
        _pretrain_args(shard.parent, tmp_path / "run", 0, "--max-bad-fraction", 1)
        + ["--shuffle-buffer", "0", "--log-every", "1"],
    )
    assert res.exit_code == 0, (res.output, res.exception)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["bad_by_reason"] == {"too_many_pixels": 2}


def test_busy_worker_does_not_outlive_a_killed_run(tmp_path):
    """The main process dies by SIGKILL while its worker skips bad samples forever: the worker
    (which takes no SIGTERM from others) must notice and exit, not spin on as an orphan."""
    proc = _spawn(_shards(tmp_path, "garbage"), tmp_path / "run", 1, "--max-bad-fraction", 1)
    err = _Tail(proc.stderr)
    try:
        err.wait_for(b"pretrain:", proc)
        time.sleep(1.0)
        proc.kill()  # the main process only
        proc.wait(timeout=30)
        assert _group_gone(proc.pid), "the data worker outlived its main process"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
