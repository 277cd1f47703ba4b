"""`nanoseek speedrun`: the whole DeepSeek-R1 recipe end to end, resumable, ending in report.md.

    nanoseek speedrun                        # --preset tiny --out runs/tiny: the real run
    nanoseek speedrun --preset smoke         # every stage on micro sizes (CI): ~1.5 minutes on 2 cores
    nanoseek speedrun --force                # redo every stage; --force r1zero eval: those stages
                                             # (and, as make would, every stage that reads them)

Only orchestration. The plan — stages, their command lines, the files that mark them done, their
budgets, OUT/speedrun.json — is nanoseek/recipe.py; the report is nanoseek/report.py. Each job
is `nanoseek <command> …` in its own process (the stages never import each other, and a killed
stage is a killed process: run the speedrun again and it carries on), its output in
OUT/logs/<stage>.log. The processes are forked from a fork server that imported torch and
nanoseek once (`PRELOAD`): a job starts in ~1 s instead of the ~7 s of `python -m nanoseek` here,
which made most of the smoke run's time. A stage whose outputs are complete is skipped; an unfinished training stage
continues from its newest checkpoint (--resume); see recipe.py for the rules. The evaluations
run `eval_jobs` at a time (one torch thread each unless OMP_NUM_THREADS says otherwise).

What a person sees: the plan with a budget per stage and the total at the start, then one line
as each stage starts and ends — stage k of n, elapsed, estimated remaining (the budgets of what
is left) — and on a terminal one status line that keeps time while a stage runs. A failed stage
stops the run with the tail of its log. At the end: report.md, the R1 model in OUT/r1/ and the
distilled student in OUT/student/.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from nanoseek import recipe
from nanoseek.report import write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(recipe.PRESETS),
                   help="tiny: the real run on the tiny CPU models (hours on 2 cores); smoke: every stage on "
                        "micro sizes (minutes)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--force", nargs="*", default=None, metavar="STAGE",
                   help="redo these stages (and the stages that read them) even when complete; no STAGE: all")
    p.add_argument("--dry-run", action="store_true", help="print the plan and every command, run nothing")


def todo_stages(stages: list[recipe.Stage], forced: set[str]) -> set[str]:
    """Stages that will run: forced or not complete, and every stage reading one of those."""
    by_name = {s.name: s for s in stages}
    todo: set[str] = set()
    for s in stages:                       # in pipeline order, so inputs are decided first
        if s.name in forced or not s.jobs or not recipe.stage_done(s, by_name) or todo & set(s.inputs):
            todo.add(s.name)
    return todo


class Display:
    """One line per stage start / end; on a terminal, a status line redrawn every second."""

    def __init__(self, stages: list[recipe.Stage], todo: set[str]):
        self.stages, self.todo, self.t0 = stages, todo, time.time()
        self.tty = sys.stdout.isatty()
        self.current: tuple[int, recipe.Stage, float] | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()

    def remaining(self, k: int, stage_elapsed: float | None) -> float:
        """The budgets of the stages still to run after stage k, plus what is left of stage k's
        (stage_elapsed None: stage k is over)."""
        later = sum(s.budget_s for s in self.stages[k:] if s.name in self.todo)
        return later + (0.0 if stage_elapsed is None else max(self.stages[k - 1].budget_s - stage_elapsed, 0.0))

    def line(self, k: int, stage: recipe.Stage, text: str, stage_elapsed: float | None = None) -> None:
        with self.lock:
            if self.tty:
                sys.stdout.write("\r\033[K")
            left = self.remaining(k, stage_elapsed)
            print(f"[{k:2d}/{len(self.stages)}] {stage.name:<12s} {text} · elapsed "
                  f"{recipe.clock(time.time() - self.t0)} · remaining ~{recipe.clock(left)}", flush=True)

    def start(self, k: int, stage: recipe.Stage) -> None:
        self.current = (k, stage, time.time())
        self.line(k, stage, f"start (budget {recipe.clock(stage.budget_s)})", 0.0)

    def end(self, k: int, stage: recipe.Stage, text: str) -> None:
        self.current = None
        self.todo.discard(stage.name)
        self.line(k, stage, text)

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            if self.tty:
                sys.stdout.write("\r\033[K")
                sys.stdout.flush()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            cur = self.current
            if cur is None:
                continue
            k, stage, t = cur
            with self.lock:
                sys.stdout.write(f"\r\033[K[{k:2d}/{len(self.stages)}] {stage.name:<12s} running "
                                 f"{recipe.clock(time.time() - t)} · elapsed {recipe.clock(time.time() - self.t0)}"
                                 f" · remaining ~{recipe.clock(self.remaining(k, time.time() - t))}")
                sys.stdout.flush()


# imported once by the fork server, before it forks each job: a job then starts in ~1 s instead of
# the ~7 s of `python -m nanoseek` (torch 4 s, torch._dynamo 3 s: every optimizer imports it)
PRELOAD = ("torch", "torch._dynamo", "nanoseek.cli", "nanoseek.model", "nanoseek.engine", "nanoseek.train.loop",
           "nanoseek.rl.step", "nanoseek.eval.evaluate", "nanoseek.tasks", "nanoseek.tokenizer")


def _job_main(argv: list[str], log_path: str, threads: int | None) -> None:
    """A job in a process forked from the fork server: `nanoseek ARGV`, output to its log."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.argv = ["nanoseek", *argv]
    if threads and "OMP_NUM_THREADS" not in os.environ:
        import torch
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    from nanoseek.cli import main
    sys.exit(main(argv))


class Runner:
    """Runs each job as `nanoseek …` in its own process, forked from a fork server that has imported
    torch and nanoseek once (multiprocessing's forkserver with PRELOAD; `python -m nanoseek`
    subprocesses where there is none); remembers them so that an interrupt stops them."""

    def __init__(self, out: str, state: recipe.RunState):
        self.out, self.state, self.procs, self.lock = out, state, set(), threading.Lock()
        self.stopping = False
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        self.ctx = None
        if "forkserver" in multiprocessing.get_all_start_methods():
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(list(PRELOAD))

    def run(self, stage: recipe.Stage, job: recipe.Job, threads: int | None) -> int:
        argv = [*job.argv, *(["--resume"] if job.resume else [])]
        log_path = os.path.join(self.out, "logs", f"{stage.name}{'.' + job.label if job.label else ''}.log")
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {recipe.now()} nanoseek {shlex.join(argv)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return 130
                proc = self.start(argv, log, log_path, threads)
                self.procs.add(proc)
                self.state.stage(stage.name).setdefault("pids", []).append(proc.pid)
                self.state.save()
            rc = self.wait(proc)
            with self.lock:
                self.procs.discard(proc)
        if rc == 0 and not recipe.marker_ok(job.marker):
            rc = 1                             # exited 0 without finishing: never count it done
        return rc

    def start(self, argv: list[str], log, log_path: str, threads: int | None):
        if self.ctx is not None:
            proc = self.ctx.Process(target=_job_main, args=(argv, log_path, threads), daemon=False)
            proc.start()
            return proc
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        return subprocess.Popen([sys.executable, "-m", "nanoseek", *argv], stdout=log, stderr=log, env=env)

    @staticmethod
    def wait(proc, timeout: float | None = None) -> int | None:
        """The exit code (a signal N as 128 + N, as a shell says it); None if still running after timeout."""
        if isinstance(proc, subprocess.Popen):
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        else:
            proc.join(timeout)
            rc = proc.exitcode
            if rc is None:
                return None
        return 128 - rc if rc < 0 else rc

    def stop_all(self) -> None:
        """Terminate the jobs this speedrun started (an interrupt or SIGTERM)."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            if self.wait(proc, 10) is None:
                proc.kill()


def prepare(job: recipe.Job, stage: recipe.Stage, by_name: dict, st: dict, forced: bool) -> str:
    """'done', 'resume' or 'fresh' for one job, removing its outputs for a fresh start."""
    since = recipe.inputs_stamp(job, stage, by_name)
    key = job.label or stage.name
    if not forced and recipe.job_done(job, since):
        return "done"
    started_from = st["jobs"].get(key, {}).get("inputs")
    if not forced and started_from == since and any(os.path.exists(p) for p in job.outputs):
        return "resume"
    for path in job.outputs:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else \
            os.remove(path) if os.path.exists(path) else None
    st["jobs"][key] = {"inputs": since}
    return "fresh"


def publish(src: str, dst: str) -> None:
    """Copy a run's final model to a plain model directory, swapped in whole (new mtimes)."""
    tmp, old = dst + ".tmp-publish", dst + ".old-publish"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=shutil.copy)
    if os.path.exists(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def account_killed(stage: recipe.Stage, st: dict, out: str) -> None:
    """A stage left 'running' by a speedrun that was killed: count its time up to its log's last write."""
    if st.get("status") != "running" or not st.get("started"):
        return
    last = max((recipe.mtime(p) for p in stage_logs(out, stage)), default=st["started"])
    lost = max(0.0, last - st["started"])
    st["seconds"] = st.get("seconds", 0.0) + lost
    if st["attempts"]:
        st["attempts"][-1].update(result="killed", seconds=round(lost, 1))
    st["status"] = "killed"


def run_stage(stage: recipe.Stage, by_name: dict, state: recipe.RunState, runner: Runner, forced: bool,
              jobs: int) -> tuple[bool, str]:
    """Run (or continue) every job of a stage; publish its model; record it. (ok, summary text)."""
    st = state.stage(stage.name)
    t0 = time.time()
    plan = {j.label or stage.name: prepare(j, stage, by_name, st, forced) for j in stage.jobs}
    action = "resume" if any(a == "resume" for a in plan.values()) else "fresh"
    st.update(status="running", started=t0, pids=[])
    st["attempts"].append({"action": action, "at": recipe.now(), "result": "running"})
    state.save()
    pending = [j for j in stage.jobs if plan[j.label or stage.name] != "done"]
    threads = max(1, (os.cpu_count() or 1) // jobs) if len(pending) > 1 else None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs if len(pending) > 1 else 1)
    try:                               # no `with`: an interrupt must not wait here for running jobs
        rcs = list(pool.map(lambda j: (j, runner.run(stage, j, threads)), pending))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    failed = [j for j, rc in rcs if rc != 0]
    if not failed and stage.publish:
        publish(*stage.publish)
    seconds = time.time() - t0
    tokens = [recipe.job_tokens(j) for j in stage.jobs]
    st.update(status="failed" if failed else "done", seconds=round(st.get("seconds", 0.0) + seconds, 1),
              tokens=None if all(t is None for t in tokens) else sum(t or 0 for t in tokens),
              finished=recipe.now(), pids=[])
    st["attempts"][-1].update(result=st["status"], seconds=round(seconds, 1))
    state.save()
    if failed:
        return False, "failed: " + ", ".join(j.label or stage.name for j in failed)
    done_before = sum(a == "done" for a in plan.values())
    notes = (["resumed"] if action == "resume" else []) + \
        ([f"{done_before} of {len(plan)} jobs were done"] if done_before else []) + \
        ([f"{len(pending)} jobs run"] if len(plan) > 1 else []) + \
        ([f"{st['tokens']:,} tokens"] if st["tokens"] else [])
    return True, f"done in {recipe.clock(seconds)}" + (f" ({', '.join(notes)})" if notes else "")


def stage_logs(out: str, stage: recipe.Stage) -> list[str]:
    """OUT/logs/<stage>.log and, for the evaluations, OUT/logs/<stage>.<job>.log."""
    d = os.path.join(out, "logs")
    return [os.path.join(d, f) for f in os.listdir(d) if f.startswith(stage.name + ".") and f.endswith(".log")]


def log_tail(out: str, stage: recipe.Stage, lines: int = 25) -> str:
    logs = sorted(stage_logs(out, stage), key=recipe.mtime)
    if not logs:
        return ""
    with open(logs[-1], encoding="utf-8", errors="replace") as f:
        return f"--- {logs[-1]} (last {lines} lines)\n" + "".join(f.readlines()[-lines:])


def check_leftovers(state: recipe.RunState, out: str) -> str | None:
    """A job of an earlier, killed speedrun still alive in OUT (it would write the same files): a
    recorded pid whose standard output is still one of OUT's logs (a reused pid's is not)."""
    logs = os.path.realpath(os.path.join(out, "logs")) + os.sep
    for name, st in state.data["stages"].items():
        for pid in st.get("pids", []) if st.get("status") == "running" else []:
            try:
                log = os.readlink(f"/proc/{pid}/fd/1")
            except OSError:
                continue
            if log.startswith(logs):
                return f"stage {name}'s process {pid} from an earlier speedrun is still running (output: {log})"
    return None


def print_plan(stages: list[recipe.Stage], sizes: recipe.Sizes, out: str, todo: set[str]) -> None:
    print(f"nanoseek speedrun: the DeepSeek-R1 recipe, preset {sizes.name} -> {out}/")
    for k, s in enumerate(stages, 1):
        mark = " " if s.name in todo else "✓"
        print(f"  {k:2d} {mark} {s.name:<12s} {recipe.clock(s.budget_s):>8s}  {s.title}")
    total = sum(s.budget_s for s in stages)
    left = sum(s.budget_s for s in stages if s.name in todo)
    print(f"  total budget {recipe.clock(total)}; to run now: {len(todo)} stages, ~{recipe.clock(left)}"
          + ("" if len(todo) == len(stages) else " (✓ = complete, skipped)"))
    print(f"  budgets: {sizes.budget_note}", flush=True)


def main(args: argparse.Namespace) -> int:
    out = (args.out or os.path.join("runs", args.preset)).rstrip("/")
    stages = recipe.plan(args.preset, out)
    by_name = {s.name: s for s in stages}
    forced = set(by_name) if args.force == [] else set(args.force or ())
    unknown = sorted(forced - set(by_name))
    if unknown:
        print(f"nanoseek speedrun: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(by_name)}",
              file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(stages, recipe.PRESETS[args.preset](), out, todo_stages(stages, forced))
        for s in stages:
            for j in s.jobs:
                print(f"  {s.name}: nanoseek {shlex.join(j.argv)}{' --resume' if j.resume else ''}")
        return 0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".speedrun.lock"), "w") as lock:     # held while this speedrun runs
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            state = recipe.RunState(out, args.preset)
        except BlockingIOError:
            print(f"nanoseek speedrun: another speedrun is running in {out}", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"nanoseek speedrun: {e}", file=sys.stderr)
            return 2
        leftover = check_leftovers(state, out)
        if leftover:
            print(f"nanoseek speedrun: {leftover}; wait for it or stop it, then run again", file=sys.stderr)
            return 2
        return run_all(stages, forced, state, out, recipe.PRESETS[args.preset]())


def run_all(stages: list[recipe.Stage], forced: set[str], state: recipe.RunState, out: str,
            sizes: recipe.Sizes) -> int:
    """Every stage in order: skip, run or continue it; the report last. Returns the exit code."""
    todo = todo_stages(stages, forced)
    print_plan(stages, sizes, out, todo)
    runner, display = Runner(out, state), Display(stages, set(todo))
    for s in stages:
        account_killed(s, state.stage(s.name), out)
    state.data.update(started=recipe.now(), finished=None)
    state.save()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.time()
    try:
        for k, stage in enumerate(stages, 1):
            if not one_stage(k, stage, stages, forced, state, runner, display, sizes):
                print(log_tail(out, stage), file=sys.stderr)
                return 1
    except BaseException as e:           # an interrupt, SIGTERM or a bug here: stop our jobs, keep the record
        runner.stop_all()
        how = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
        for st in state.data["stages"].values():
            if st.get("status") == "running":
                st.update(seconds=round(st.get("seconds", 0.0) + time.time() - st["started"], 1), status=how)
                st["attempts"][-1].update(result=how)
        state.save()
        if how == "failed":
            raise
        print("\nnanoseek speedrun: interrupted; run the same command again to continue", file=sys.stderr)
        return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    finally:
        display.close()
        signal.signal(signal.SIGTERM, previous)
    state.data.update(finished=recipe.now(), wall_s=round(time.time() - t0, 1))
    state.save()
    print(f"speedrun {sizes.name} done in {recipe.clock(time.time() - t0)}: {out}/report.md; R1 model {out}/r1/, "
          f"distilled student {out}/student/ (nanoseek chat --model {out}/r1)")
    return 0


def one_stage(k: int, stage: recipe.Stage, stages: list[recipe.Stage], forced: set[str], state: recipe.RunState,
              runner: Runner, display: Display, sizes: recipe.Sizes) -> bool:
    """Skip stage k when complete, else run it (the report: write it). False when it failed."""
    by_name = {s.name: s for s in stages}
    st = state.stage(stage.name)
    st["budget_s"] = stage.budget_s
    if stage.name == "report":
        display.start(k, stage)
        t = time.time()
        st.update(status="done", seconds=0.0, finished=recipe.now())         # the report shows this run
        path = write_report(runner.out, stages, state.data)
        st.update(seconds=round(time.time() - t, 1), attempts=[{"action": "fresh", "at": recipe.now(),
                                                               "result": "done"}])
        state.save()
        display.end(k, stage, f"done: {path}")
        return True
    if stage.name not in forced and recipe.stage_done(stage, by_name):
        st["attempts"].append({"action": "skipped", "at": recipe.now(), "result": "done", "seconds": 0})
        st["status"] = "done"
        state.save()
        display.end(k, stage, f"skipped: complete (ran {recipe.clock(st.get('seconds', 0))})")
        return True
    display.start(k, stage)
    ok, text = run_stage(stage, by_name, state, runner, stage.name in forced,
                         sizes.eval_jobs if stage.name == "eval" else 1)
    display.end(k, stage, text)
    return ok
