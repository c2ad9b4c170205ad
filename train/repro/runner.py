"""The loop that runs (or reuses) the stages of :func:`~.stages.plan`: one after another, or up to
``jobs`` at once, each in a spawned process of its own, with ``--until`` and the wall time of every
invocation (``work/elapsed.json``); and :func:`collect`, everything the report reads.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Callable, Optional

import timm
import torch

from ice_prune.evaluation.paper import TABLES

from .report import write_json, write_report
from .scales import Scale
from .stages import DONE, Context, Stage, plan


def _needed(stages: list[Stage], until: str) -> list[Stage]:
    """``until`` and every stage it reads, directly or not, in plan order."""
    by_name = {stage.name: stage for stage in stages}
    needed, todo = set(), [until]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].after)
    return [stage for stage in stages if stage.name in needed]


def run_stage(scale: Scale, work: str, name: str, log_path: Optional[str] = None) -> float:
    """Run the stage ``name`` of ``plan(scale)`` into ``work/<name>`` and write its ``done.json``;
    returns its wall time. ``log_path``: where its output goes (a worker process of a parallel
    run sends its stdout and stderr there, so that the stages' progress bars do not interleave)."""
    if log_path is not None:
        stream = open(log_path, "a", buffering=1)
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        sys.stdout = sys.stderr = stream
        # a spawned process inherits 'spawn' as its default start method, so every data loader
        # worker would import torch and the project afresh: 3-4 s for each of an epoch's loaders
        # (training, validation, maps), a third of an epoch's time at the cpu scale. A standalone
        # script forks them (Linux's default), which takes milliseconds; the data are the same
        if "fork" in multiprocessing.get_all_start_methods():
            multiprocessing.set_start_method("fork", force=True)
    if scale.threads is not None:
        torch.set_num_threads(scale.threads)
    stage = next(stage for stage in plan(scale) if stage.name == name)
    context = Context(scale, work)
    folder = context.folder(name)
    os.makedirs(folder, exist_ok=True)
    t0 = time.time()
    result = stage.fn(context, folder)
    result["wall_s"] = round(time.time() - t0, 1)
    write_json(os.path.join(folder, DONE), result)
    return result["wall_s"]


def run(scale: Scale, out: str, fresh: bool = False, log: Callable[[str], None] = print,
        until: Optional[str] = None, jobs: Optional[int] = None) -> Optional[dict]:
    """Run (or reuse) every stage, then write the report. Returns the results dict.
    ``until``: run only that stage and those it reads, then stop (no report); a later run reuses
    what it finished. ``jobs`` (default the scale's): how many stages run at once, each in a
    process of its own once pretraining is done (the speed stage alone)."""
    work = os.path.join(out, "work")
    if fresh and os.path.isdir(work):
        shutil.rmtree(work)
    stages = plan(scale)
    names = [stage.name for stage in stages]
    if until is not None:
        if until not in names:
            raise ValueError(f"until={until!r} is no stage of this scale; choose one of {names}")
        stages = _needed(stages, until)
    jobs = scale.jobs if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t_start = time.time()
    total = len(stages)
    index = {stage.name: i for i, stage in enumerate(stages, 1)}
    done = set()
    for stage in stages:
        if os.path.exists(os.path.join(work, stage.name, DONE)):
            log(f"[{index[stage.name]}/{total}] {stage.name}: done before, reused")
            done.add(stage.name)
    todo = [stage for stage in stages if stage.name not in done]
    if jobs == 1 or len(todo) <= 1:
        for stage in todo:
            i = index[stage.name]
            log(f"[{i}/{total}] {stage.name} ...  ({time.time() - t_start:.0f} s so far)")
            wall = run_stage(scale, work, stage.name)
            log(f"[{i}/{total}] {stage.name}: {wall:.0f} s")
    else:
        _run_parallel(scale, work, todo, done, jobs, index, total, t_start, log)
    _add_elapsed(work, time.time() - t_start, jobs)
    if until is not None:
        return None
    results = collect(scale, work, plan(scale))
    write_report(results, out)
    return results


def _run_parallel(scale: Scale, work: str, todo: list[Stage], done: set, jobs: int,
                  index: dict, total: int, t_start: float, log: Callable[[str], None]) -> None:
    """Run ``todo`` with up to ``jobs`` stages at once, each in a fresh (spawned) process whose
    output goes to ``work/<stage>/stage.log``, every stage once those it reads are done; an
    exclusive stage waits for the others to finish and runs alone. A failed stage stops the run
    after the running ones end (their ``done.json`` kept), with its log's path in the error."""
    import concurrent.futures as futures
    import multiprocessing

    pending = list(todo)
    running: dict[futures.Future, Stage] = {}
    failed = None
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        while pending or running:
            exclusive_running = any(stage.exclusive for stage in running.values())
            for stage in list(pending):
                if failed or exclusive_running or len(running) >= jobs:
                    break
                if not all(name in done for name in stage.after):
                    continue
                if stage.exclusive and running:
                    break  # the exclusive stage waits for the running ones, and holds the rest
                folder = os.path.join(work, stage.name)
                os.makedirs(folder, exist_ok=True)
                log(f"[{index[stage.name]}/{total}] {stage.name} ...  ({time.time() - t_start:.0f} "
                    f"s so far; output in {os.path.join(folder, 'stage.log')})")
                future = pool.submit(run_stage, scale, work, stage.name,
                                     os.path.join(folder, "stage.log"))
                running[future] = stage
                pending.remove(stage)
                exclusive_running = stage.exclusive
            if not running:
                if failed:
                    break
                raise RuntimeError(f"stages {[s.name for s in pending]} wait for stages that "
                                   f"cannot run")  # unreachable with a checked plan
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                try:
                    wall = future.result()
                except Exception as error:  # noqa: BLE001 (reported with the stage's log)
                    failed = failed or (stage, error)
                    log(f"[{index[stage.name]}/{total}] {stage.name}: FAILED ({error!r})")
                    continue
                done.add(stage.name)
                log(f"[{index[stage.name]}/{total}] {stage.name}: {wall:.0f} s")
    if failed:
        stage, error = failed
        raise RuntimeError(f"stage {stage.name} failed: {error!r}; its output: "
                           f"{os.path.join(work, stage.name, 'stage.log')}. Run again to go on "
                           f"from the finished stages") from error


ELAPSED = "elapsed.json"


def _add_elapsed(work: str, seconds: float, jobs: int) -> None:
    """Append this invocation's wall time to ``work/elapsed.json`` (a resumed run adds up)."""
    path = os.path.join(work, ELAPSED)
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)
    runs.append({"seconds": round(seconds, 1), "jobs": jobs, "date": time.strftime("%Y-%m-%d")})
    os.makedirs(work, exist_ok=True)
    write_json(path, runs)


def collect(scale: Scale, work: str, stages: Optional[list[Stage]] = None) -> dict:
    """Everything the report shows, read from the stages' ``done.json``."""
    stages = plan(scale) if stages is None else stages
    done = {}
    for stage in stages:
        with open(os.path.join(work, stage.name, DONE)) as f:
            done[stage.name] = json.load(f)
    elapsed = []
    if os.path.exists(os.path.join(work, ELAPSED)):
        with open(os.path.join(work, ELAPSED)) as f:
            elapsed = json.load(f)
    return {"scale": dataclasses.asdict(scale), "stages": done, "paper": TABLES,
            "wall_s": round(sum(r["wall_s"] for r in done.values()), 1),
            "elapsed_s": round(sum(r["seconds"] for r in elapsed), 1), "elapsed_runs": elapsed,
            "jobs": max([r["jobs"] for r in elapsed], default=1),
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
            "date": time.strftime("%Y-%m-%d")}
