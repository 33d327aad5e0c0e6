"""Fitting the cost model's constants to measured timings, and reporting predicted against measured.

    attngen bench specs/causal.yaml --exhaustive 40 --json data/exhaustive_h100.json   # on the GPU
    attngen calibrate data/exhaustive_*.json [--write]                                  # anywhere

Each measured row is one (spec, shape, kernel role, dtype, tiling) with its median time. The fit
minimizes the mean squared log ratio of predicted to measured time over the free `Constants`,
by coordinate search (a handful of smooth constants: no optimizer library needed); the overall
`scale` has a closed form. `--write` stores the result in data/cost_constants.json, which the cost
model reads at import: the tilings it picks change, so regenerate and re-verify after writing.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

from .cost_model import FITTED, TARGETS, Constants, Workload, predict, rank
from .lower import lower, lower_backward
from .passes import PassOptions, bucket_for, mask_plan, sfu_per_score
from .resources import specs_dir
from .runtime.roles import VARIANTS
from .spec import load_spec
from .tiling import TileConfig, chunks

FREE = ("rows_exponent", "streamed_exponent", "one_stage", "two_stages", "overlap", "mask_ops", "alu_ops", "hiding",
        "occupancy_gain", "occupancy_gain_cap", "tma_gain", "tma_gain_bwd", "atomic_cost")
BOUNDS = {"rows_exponent": (0.0, 2.0), "streamed_exponent": (0.0, 2.0), "one_stage": (0.1, 1.0),
          "two_stages": (0.1, 1.0), "overlap": (0.0, 1.0), "mask_ops": (0.0, 64.0), "alu_ops": (0.0, 32.0),
          "hiding": (0.0, 2.0), "occupancy_gain": (0.0, 1.0), "occupancy_gain_cap": (1.0, 2.0),
          "tma_gain": (0.5, 2.0), "tma_gain_bwd": (0.5, 2.0), "atomic_cost": (0.5, 16.0)}


@functools.lru_cache(maxsize=None)
def _plan(spec_path: str, role: str):
    """The kernel's mask plan, and its special-function ops per score."""
    path = Path(spec_path)
    if not path.exists():  # measured elsewhere: a shipped spec, or a --head-dim copy of one (same mask plan)
        path = specs_dir() / (re.sub(r"_d\d+$", "", path.stem) + ".yaml")
    spec = load_spec(path)
    base = VARIANTS[role][1] if role in VARIANTS else role  # a variant (bwd_single) has its kernel's plan
    kernel = {k.attr("role"): k for k in (lower(spec), *lower_backward(spec))}[base]
    return mask_plan(kernel, PassOptions()).attr("mask_plan"), sfu_per_score(kernel)


def predicted_ms(row: dict, k: Constants, target: str = "sm90") -> float | None:
    b, h, n = row["shape"]
    cfg = TileConfig(**row["config"])
    plan, sfu = _plan(row["spec_path"], row["role"])
    p = predict(cfg, plan, TARGETS[target], Workload(b, h, n, n, row["dtype"], sfu), row["role"], k)
    return None if p.time_s is None else p.time_s * 1e3


def _log_ratios(rows: list[dict], k: Constants) -> dict[tuple, list[float]]:
    """log(predicted / measured) per (spec, shape, kernel, dtype) group."""
    out: dict[tuple, list[float]] = {}
    for r in rows:
        pred = predicted_ms(r, k)
        if pred is not None and r["measured_ms"]:
            out.setdefault((r["spec"], tuple(r["shape"]), r["role"], r["dtype"]), []).append(math.log(pred / r["measured_ms"]))
    return out


def loss(rows: list[dict], k: Constants) -> float:
    """Mean squared log error of the predictions, each group (one kernel at one shape) measured from
    its own mean: picking a tiling needs the candidates of a group in the right order and proportion,
    not the absolute time, and a per-group offset would otherwise dominate the fit."""
    squares = [(x - sum(g) / len(g)) ** 2 for g in _log_ratios(rows, k).values() for x in g]
    return sum(squares) / len(squares) if squares else float("inf")


STARTS = ({}, {"overlap": 0.5, "occupancy_gain": 0.5, "occupancy_gain_cap": 1.6},
          {"overlap": 0.8, "hiding": 1.0, "occupancy_gain": 0.3, "occupancy_gain_cap": 1.3})


def _descend(rows: list[dict], k: Constants, rounds: int, objective=loss) -> tuple[Constants, float]:
    best = objective(rows, k)
    for step in (0.5, 0.25, 0.1, 0.05)[:rounds]:
        improved = True
        while improved:
            improved = False
            for name in FREE:
                lo, hi = BOUNDS[name]
                value = getattr(k, name)
                for candidate in (value * (1 + step), value * (1 - step), value + step, value - step):
                    candidate = min(hi, max(lo, candidate))
                    trial = replace(k, **{name: candidate})
                    trial_loss = objective(rows, trial)
                    if trial_loss < best - 1e-12:
                        k, best, improved = trial, trial_loss, True
    return k, best


def fit(rows: list[dict], start: Constants = Constants(), rounds: int = 4, advance=lambda: None,
        objective=loss) -> Constants:
    """Coordinate descent from a few starting points (the loss has local minima; `advance()` after
    each) on `objective` (loss: the predictions' proportions; pick_loss: the picks' regrets); then
    the overall scale in closed form (the mean log ratio over every row)."""
    def descend(s):
        found = _descend(rows, replace(start, **s), rounds, objective)
        advance()
        return found
    k = min((descend(s) for s in STARTS), key=lambda kb: kb[1])[0]
    ratios = [x for g in _log_ratios(rows, replace(k, scale=1.0)).values() for x in g]
    return replace(k, scale=math.exp(-sum(ratios) / len(ratios))) if ratios else k


def _module_work(row: dict, buckets: bool = True) -> Workload:
    """The workload a module ranks the row's kernel at: the sequence-length bucket its shape takes
    (PassOptions.shape_buckets, the default), or with buckets=False the nominal shape."""
    _, sfu = _plan(row["spec_path"], row["role"])
    work = replace(PassOptions().workload, dtype=row["dtype"], score_sfu=sfu)
    return bucket_for(work, row["shape"][2]) if buckets else work


UNMEASURED = math.log(2)  # the regret of a pick that was not timed or failed: as if it ran at half the best's speed


def regrets(rows: list[dict], k: Constants, target: str = "sm90", buckets: bool = True) -> dict[tuple, float]:
    """Per group (one kernel at one measured shape, every legal tiling timed): log of the measured
    time of the module's pick (model_pick: among every legal tiling, at the bucket a call of that
    shape takes, or with buckets=False the nominal shape) over the fastest's; 0 where the pick is the
    best, UNMEASURED where it has no time (failed, or never timed)."""
    out = {}
    for key, group in _groups(rows).items():
        pick = model_pick(group[0], k, target, buckets)
        times = [r["measured_ms"] for r in group if TileConfig(**r["config"]) == pick]
        out[key] = math.log(min(times) / min(r["measured_ms"] for r in group)) if times else UNMEASURED
    return out


def pick_loss(rows: list[dict], k: Constants, weight: float = 0.05, buckets: bool = True) -> float:
    """The objective of fit(objective=pick_loss): the mean and the worst of the groups' regrets (the
    issue's criterion is every pick within 95% of the best), plus `weight` x loss() so that the
    predictions stay in proportion where the picks do not move."""
    r = list(regrets(rows, k, buckets=buckets).values())
    return (sum(r) / len(r) + max(r) if r else float("inf")) + weight * loss(rows, k)


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["measured_ms"]:
            groups.setdefault((r["spec"], tuple(r["shape"]), r["role"], r["dtype"]), []).append(r)
    return groups


def model_pick(row: dict, k: Constants, target: str = "sm90", buckets: bool = True) -> TileConfig:
    """The tiling a generated module with these constants would use for a call of the row's shape:
    the model's first choice among all legal candidates at the sequence-length bucket that call
    takes (`buckets`, as PassOptions.shape_buckets does by default), or with buckets=False at the
    tiling pass's nominal shape (one per dtype, whatever shape the row was measured at)."""
    plan, _ = _plan(row["spec_path"], row["role"])
    cfg = TileConfig(**row["config"])
    return rank(cfg.head_dim_pad, cfg.head_dim_v_pad, plan, TARGETS[target], _module_work(row, buckets), row["role"], k,
                chunked=chunks(cfg.head_dim_pad) > 1).best  # a row measured with the head dim in chunks


def pick_table(rows: list[dict], k: Constants, buckets: bool = True) -> list[dict]:
    """Per group (one kernel at one measured shape): the module's pick and the measured best, with
    their times; the pick's time is None when it was never measured (a new fit can move the pick)."""
    out = []
    for (spec, shape, role, dtype), group in _groups(rows).items():
        pick = model_pick(group[0], k, buckets=buckets)
        best = min(group, key=lambda r: r["measured_ms"])
        times = [r["measured_ms"] for r in group if TileConfig(**r["config"]) == pick]
        out.append({"spec": spec, "shape": shape, "role": role, "dtype": dtype, "pick": pick,
                    "pick_ms": min(times) if times else None, "best": TileConfig(**best["config"]),
                    "best_ms": best["measured_ms"], "tried": len({tuple(sorted(r["config"].items())) for r in group})})
    return out


def pick_reach(rows: list[dict], k: Constants) -> dict[tuple, float | None]:
    """Per group: the measured best's time over the measured time of the model's pick (None: the
    pick was not measured)."""
    return {(t["spec"], t["shape"], t["role"], t["dtype"]): t["best_ms"] / t["pick_ms"] if t["pick_ms"] else None
            for t in pick_table(rows, k)}


def format_pick_table(rows: list[dict], k: Constants, buckets: bool = True) -> str:
    lines = ["| spec | shape | kernel | cost-model pick | ms | exhaustive best | ms | pick / best | tilings timed |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = pick_table(rows, k, buckets)
    for t in table:
        pick_ms = f"{t['pick_ms']:.3f}" if t["pick_ms"] else "not measured"
        ratio = f"{t['best_ms'] / t['pick_ms']:.2f}" if t["pick_ms"] else "–"
        lines.append(f"| {t['spec']} | {'x'.join(map(str, t['shape']))} | {t['role']} | {t['pick'].short()} | {pick_ms} | "
                     f"{t['best'].short()} | {t['best_ms']:.3f} | {ratio} | {t['tried']} |")
    known = [t["best_ms"] / t["pick_ms"] for t in table if t["pick_ms"]]
    if known:
        lines += ["", f"{sum(r >= 0.95 for r in known)} of {len(table)} kernels within 95% of the best; worst "
                      f"{min(known):.2f}; {len(table) - len(known)} picks not measured"]
    return "\n".join(lines) + "\n"


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for row in json.loads(Path(path).read_text())["trials"]:
            if row["config"].pop("warp_specialize", False):
                continue  # measured when warp specialization was a candidate (it no longer is)
            rows.append(row)
    return rows


def report(rows: list[dict], k: Constants, buckets: bool = True) -> str:
    """Predicted against measured per row, and, per kernel and shape, where the pick ranks."""
    lines = ["| spec | shape | kernel | tiling | predicted ms | measured ms | measured / predicted |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pred, meas, c = predicted_ms(r, k), r["measured_ms"], r["config"]
        cells = [r["spec"], "x".join(map(str, r["shape"])), r["role"],
                 TileConfig(**c).short(),
                 "rejected" if pred is None else f"{pred:.3f}", "failed" if meas is None else f"{meas:.3f}",
                 f"{meas / pred:.2f}" if pred and meas else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + format_pick_table(rows, k, buckets)


def write(k: Constants, path: Path = FITTED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(k), indent=1) + "\n")

