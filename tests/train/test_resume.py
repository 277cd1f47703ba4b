"""Exact resume: SIGKILL mid-run then --resume gives the uninterrupted loss curve; a kill during a
checkpoint write leaves the previous checkpoint intact; a corrupt checkpoint is refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from nanoseek.train import resume
from nanoseek.train.metrics import read_metrics
from tests.train.fixtures import make_corpus, pretrain_args

STEPS = 24


def _launch(args, code: str | None = None) -> subprocess.Popen:
    """`nanoseek <args>` in a fresh process (optionally after running `code`, e.g. a patch)."""
    prog = (code or "") + "\nimport sys\nfrom nanoseek.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-c", prog, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < timeout, f"no {path} after {timeout} s"
        time.sleep(0.01)


def _losses(out: str) -> dict[int, float]:
    return {r["step"]: r["main_loss"] for r in read_metrics(out) if "main_loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    data, tok = make_corpus(root)
    ref = os.path.join(root, "uninterrupted")
    proc = _launch(pretrain_args(data, tok, ref, STEPS, "--no-plots"))
    assert proc.wait(300) == 0, proc.stdout.read()[-3000:]
    return root, data, tok, _losses(ref)


def test_sigkill_then_resume_matches_the_uninterrupted_curve(runs):
    root, data, tok, ref = runs
    out = os.path.join(root, "killed")
    args = pretrain_args(data, tok, out, STEPS, "--no-plots")
    proc = _launch(args)
    _wait_for(os.path.join(out, "checkpoints", "step_000003"), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "model"))                      # it really died mid-run
    killed_at = max(_losses(out))
    proc = _launch(args + ["--resume"])
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from" in log
    got = _losses(out)
    assert sorted(got) == list(range(STEPS)), (killed_at, sorted(got))          # no gap, no duplicate
    assert max(abs(got[s] - ref[s]) for s in ref) <= 1e-5


def test_kill_during_checkpoint_write_keeps_the_previous_one(runs):
    root, data, tok, ref = runs
    out = os.path.join(root, "killed_in_write")
    signal_file = os.path.join(root, "writing")
    # the second checkpoint write stalls after its tensors are written, inside the atomic save
    patch = f"""
import time, nanoseek.train.resume as t
_save, _calls = t.save_pretrained, []
def save_pretrained(model, path, tokenizer=None, write_extra=None):
    _calls.append(path)
    def stalled(tmp):
        write_extra(tmp)
        if len(_calls) == 2:
            open({signal_file!r}, "w").close()
            time.sleep(600)
    return _save(model, path, tokenizer=tokenizer, write_extra=stalled)
t.save_pretrained = save_pretrained
"""
    proc = _launch(pretrain_args(data, tok, out, STEPS, "--no-plots"), patch)
    _wait_for(signal_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    ckpts = os.path.join(out, "checkpoints")
    assert [os.path.basename(d) for d in resume.checkpoint_dirs(out)] == ["step_000003"]
    assert any(n.startswith(".tmp-") for n in os.listdir(ckpts))               # the half-written one
    assert resume.verify_checkpoint(os.path.join(ckpts, "step_000003"))["step"] == 3
    proc = _launch(pretrain_args(data, tok, out, STEPS, "--no-plots", "--resume"))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "step_000003 at step 3" in log, log[-3000:]
    assert not any(n.startswith(".tmp-") for n in os.listdir(ckpts))
    got = _losses(out)
    assert max(abs(got[s] - ref[s]) for s in ref) <= 1e-5


def test_corrupt_checkpoint_is_refused_with_a_clear_message(runs, tmp_path):
    root, data, tok, ref = runs
    src = resume.checkpoint_dirs(os.path.join(root, "uninterrupted"))[-1]
    for name, damage in (("model.safetensors", "flip"), ("optimizer.pt", "truncate"), ("nanoseek.json", "delete")):
        ckpt = tmp_path / name / "checkpoints" / "step_000024"
        ckpt.parent.mkdir(parents=True)
        subprocess.run(["cp", "-r", src, str(ckpt)], check=True)
        f = ckpt / name
        if damage == "flip":
            raw = bytearray(f.read_bytes())
            raw[-7] ^= 0x01
            f.write_bytes(bytes(raw))
        elif damage == "truncate":
            f.write_bytes(f.read_bytes()[:100])
        else:
            f.unlink()
        with pytest.raises(resume.CheckpointError, match="corrupt checkpoint|not a resumable checkpoint") as e:
            resume.verify_checkpoint(str(ckpt))
        assert str(ckpt) in str(e.value) and (name in str(e.value) or damage == "delete")
    # through the command: refused, nothing trained
    out = str(tmp_path / "model.safetensors")
    proc = _launch(pretrain_args(data, tok, out, STEPS + 2, "--no-plots", "--resume"))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "corrupt checkpoint" in log and "model.safetensors" in log
