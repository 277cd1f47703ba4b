"""`nanoseek serve`: which model it picks, what it says without one, and a real start and stop."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from nanoseek.stages import serve


def _touch_model(path, mtime):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{}")
    os.utime(os.path.join(path, "config.json"), (mtime, mtime))


def test_newest_model_prefers_the_r1_model_then_the_newest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert serve.newest_model() is None
    assert serve.main(serve_args()) == 2
    assert "make speedrun" in capsys.readouterr().err
    _touch_model("runs/old/model", 1_000)
    _touch_model("runs/new/model", 2_000)
    assert serve.newest_model() == os.path.join("runs", "new", "model")
    _touch_model("runs/old/r1", 500)
    assert serve.newest_model() == os.path.join("runs", "old", "r1")


def serve_args(**kw):
    import argparse
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_keys_from_flag_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-a\n\n  sk-b  \n")
    assert serve.read_keys(serve_args(api_key="sk-0", api_keys_file=str(f))) == ["sk-0", "sk-a", "sk-b"]


def test_serve_command_answers_then_sigint_ends_running_streams_in_band(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_API_KEY": "sk-env"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", model_dir, "--port", str(port),
                             "--served-model-name", "tiny", "--max-model-len", "4096", "--kv-cache-mb", "16",
                             "--shutdown-grace-s", "0.5", "--log-level", "warning", "--no-compile"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        headers = {"Authorization": "Bearer sk-env"}
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=30,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        long = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, json=long, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGINT)         # the stream is cut short, with a reason
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "server_shutting_down"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}" in err and "sk-env" not in err
