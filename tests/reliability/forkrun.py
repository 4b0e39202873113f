"""Run many `attncache` commands as separate processes that each can be SIGKILLed, cheaply.

A fresh interpreter pays ~10 s (more on a loaded machine) importing torch and timm; a crash test
that kills and resumes a run ten times would spend minutes on imports. So one driver process
imports the CLI once, before any tensor work (no thread pools to inherit), and forks one child per
command: each child is a real process (its own pid, killed by a real SIGKILL, its files written by
its own descriptors), and the parent only waits and reports. A child may be killed by a named kill
point (`fault` = "POINT:N[:torn]", armed in the child by faults.py), by `kill_after_s` (a SIGKILL from the driver
that many seconds after the fork), or by `kill_at_replace` = "before:N" / "after:N" (SIGKILL just
before or just after the N-th `os.replace` of the child: every rename of every atomic write, on
any version of the code).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from relhelp import env

HERE = Path(__file__).resolve().parent

DRIVER = r'''
import json, os, signal, sys, time
runs = json.load(open(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from attncache.cli.main import cli
results = []
for run in runs:
    out, err = run["log"] + ".out", run["log"] + ".err"
    pid = os.fork()
    if pid == 0:
        os.environ.update(run.get("env", {}))
        fd_out, fd_err = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd_out, 1); os.dup2(fd_err, 2)
        if run.get("fault"):
            import faults; faults.install(faults.killer(run["fault"]))
        spec = run.get("kill_at_replace")
        if spec:
            when, nth = spec.split(":"); nth = int(nth); real = os.replace; count = [0]
            def replace(src, dst, *a, **k):
                count[0] += 1
                if count[0] == nth and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst, *a, **k)
                if count[0] == nth and when == "after":
                    os.kill(os.getpid(), signal.SIGKILL)
            os.replace = replace
        code = 0
        try:
            cli.main(run["args"], prog_name="attncache", standalone_mode=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback; traceback.print_exc(); code = 99
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    started = time.monotonic()
    if run.get("kill_after_s") is not None:
        while time.monotonic() - started < run["kill_after_s"]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGKILL)
            done, status = os.waitpid(pid, 0)
    else:
        done, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    results.append({"rc": code, "seconds": time.monotonic() - started})
print(json.dumps(results))
'''


def run_many(runs: list[dict], workdir: Path, timeout: float = 600) -> list[dict]:
    """Each run: {"args": [...], "env": {...}, "fault": "POINT:N[:torn]", "kill_after_s": s, "kill_at_replace": "after:N",
    "between": callable(i) run here before run i}. Returns [{"rc", "out", "err", "seconds"}].
    Runs with a `between` hook are split into driver batches at that point."""
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    batch: list[dict] = []

    def flush():
        if not batch:
            return
        plan = []
        for run in batch:
            log = str(workdir / f"run{len(results) + len(plan):03d}")
            plan.append({"args": [str(a) for a in run["args"]], "env": run.get("env", {}), "log": log,
                         "fault": run.get("fault"),
                         "kill_after_s": run.get("kill_after_s"), "kill_at_replace": run.get("kill_at_replace")})
        plan_file = workdir / f"plan{len(results):03d}.json"
        plan_file.write_text(json.dumps(plan))
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(plan_file), str(HERE)], env=env(OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for entry, info in zip(plan, json.loads(proc.stdout.strip().splitlines()[-1])):
            info["out"] = Path(entry["log"] + ".out").read_text()
            info["err"] = Path(entry["log"] + ".err").read_text()
            results.append(info)
        batch.clear()

    for run in runs:
        if run.get("between") is not None:
            flush()
            run["between"](len(results))
        batch.append(run)
    flush()
    return results
