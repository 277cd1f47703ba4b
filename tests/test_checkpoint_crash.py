"""save_pretrained killed (SIGKILL) at each step of its atomic write: the path then loads as the
old checkpoint or the new one, exactly, never as nothing or a mix; and every file and directory
is fsynced."""
from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch

from nanoseek import checkpoint
from nanoseek.checkpoint import load_pretrained, save_pretrained
from nanoseek.model import Transformer
from tests.helpers import randomize_
from tests.test_checkpoint import _cfg


def _extra(tmp: str) -> None:
    with open(os.path.join(tmp, "nanoseek.json"), "w") as f:
        f.write("{}")


def _save_killed_at(point: str, model: Transformer, path: str) -> int:
    """Run save_pretrained in a forked child (torch already imported: ~0.1 s, not a fresh
    interpreter's seconds) that SIGKILLs itself at step `point`; returns its exit code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: "multi-threaded, fork() may deadlock"
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            checkpoint.crash_hook = lambda p: os.kill(os.getpid(), signal.SIGKILL) if p == point else None
            save_pretrained(model, path, write_extra=_extra)
            code = 0
        finally:
            os._exit(code)  # never return into pytest
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# step -> which checkpoint the path must hold after a kill there (over an old one / as a first save)
POINTS = {"tensors": ("old", None), "written": ("old", None), "aside": ("old", "new"),
          "swapped": ("new", "new"), "synced": ("new", "new")}


def _model(seed: int) -> Transformer:
    return randomize_(Transformer(_cfg(num_hidden_layers=1)), seed=seed).eval()


def _holds(path: str, model: Transformer) -> bool:
    got, want = load_pretrained(path).state_dict(), model.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
@pytest.mark.parametrize("first", [False, True], ids=["overwrite", "first-save"])
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_each_step_leaves_old_or_new(tmp_path, point, first):
    old, new = _model(1), _model(2)
    path = str(tmp_path / "ck")
    if not first:
        save_pretrained(old, path)
    expect = POINTS[point][first]
    fired = not (first and point == "aside")            # a first save moves nothing aside
    assert _save_killed_at(point, new, path) == (-signal.SIGKILL if fired else 0)
    if expect is None:
        assert not os.path.exists(path)                 # nothing half-written at the path
    elif point == "aside" and not first:               # killed between the renames: path missing
        with pytest.warns(UserWarning, match="interrupted save"):
            assert _holds(path, old)                    # the aside copy, renamed back
        assert not os.path.exists(tmp_path / ".old-ck")
    else:
        assert _holds(path, old if expect == "old" else new)
    if expect is not None:
        assert os.path.exists(os.path.join(path, "nanoseek.json")) == (expect == "new")
    # the next save finishes the job and leaves no aside copy
    save_pretrained(old, path)
    assert _holds(path, old)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".old-")]


def test_recovery_works_on_a_read_only_parent(tmp_path, monkeypatch):
    # killed between the renames: path missing, the old one aside; if it cannot be renamed back,
    # load_pretrained reads the aside copy where it lies
    old = _model(1)
    path = str(tmp_path / "ck")
    save_pretrained(old, path)
    os.rename(path, str(tmp_path / ".old-ck"))

    def refuse(a, b):
        raise PermissionError(13, "read-only file system")
    monkeypatch.setattr(checkpoint.os, "rename", refuse)
    with pytest.warns(UserWarning, match="interrupted save"):
        assert _holds(path, old)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced descriptors")
def test_every_file_and_the_parent_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(checkpoint.os, "fsync", spy)

    def extra(tmp):
        os.makedirs(os.path.join(tmp, "state"))
        with open(os.path.join(tmp, "state", "rng.json"), "w") as f:
            f.write("{}")
    path, parent = str(tmp_path / "ck"), os.path.realpath(tmp_path)
    for _ in range(2):                                  # a first save and an overwrite
        synced.clear()
        save_pretrained(_model(1), path, write_extra=extra, max_shard_bytes=100_000)
        tmp = os.path.dirname(os.path.dirname(next(s for s in synced if s.endswith("rng.json"))))
        inside = {os.path.relpath(s, tmp) for s in synced if s.startswith(tmp + os.sep)}
        written = {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}
        assert len(written) > 5 and written <= inside    # every file (shards, index, extra/...)
        assert "state" in inside and tmp in synced      # and the directories holding them
        assert synced[-1] == parent                     # the parent, after the last rename
