"""Reward functions in TRL's convention, for grpo.py's --reward_fn: loading one from a file, calling it with
TRL's keywords, reading what it returns (None: no reward for this sample), and weighting several together."""
import importlib.util
import math
import numbers
import os
from types import SimpleNamespace

import torch

from common import UserError


def load_reward_fn(spec):
    """`path/to/file.py:name` -> (label, the function or callable object `name`). The label, TRL's, names its
    `rewards/<label>` metric: the function's __name__, else the object's class name."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise UserError(f"--reward_fn {spec}: expected path/to/file.py:function")
    if not os.path.isfile(path):
        raise UserError(f"--reward_fn {spec}: no such file {path}")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(f"reward_{name}", path))
    try:
        module.__loader__.exec_module(module)
    except Exception as e:
        raise UserError(f"--reward_fn {spec}: importing {path} raised {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_fn {spec}: {path} has no function {name!r}")
    return getattr(fn, "__name__", type(fn).__name__), fn


def reward_kwargs(global_step, max_steps, log_metric):
    """The keywords TRL's GRPOTrainer gives every reward function besides the data columns. trainer_state has
    TrainerState's global_step (updates done) and max_steps; log_metric(name, value) adds a scalar to the
    step's metrics; log_extra(column, values) adds columns to TRL's completions table, which grpo.py has not,
    so it does nothing."""
    return {"trainer_state": SimpleNamespace(global_step=global_step, max_steps=max_steps),
            "log_extra": lambda column, values: None, "log_metric": log_metric}


def real_reward(r):
    """One returned reward as a float: NaN for None (TRL's "no reward for this sample"); None if it is not a
    real number (Python, numpy, or a 0-d tensor or array)."""
    if r is None:
        return math.nan
    if getattr(r, "shape", None) == ():
        r = r.item()
    return float(r) if isinstance(r, numbers.Real) and math.isfinite(r) else None


def call_reward_fn(name, fn, prompts, completions, completion_ids, columns, kwargs):
    """fn(prompts=, completions=, completion_ids=, **columns, **kwargs) as a list of floats, NaN for None;
    anything else is a UserError naming fn."""
    try:
        out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **kwargs)
    except Exception as e:
        raise UserError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    if not isinstance(out, (list, tuple)) or len(out) != len(completions):
        got = f"{len(out)} values" if isinstance(out, (list, tuple)) else type(out).__name__
        raise UserError(f"reward function {name} returned {got} for {len(completions)} completions; "
                               "it must return one float (or None) per completion")
    rewards = [real_reward(r) for r in out]
    if None in rewards:
        raise UserError(f"reward function {name} returned {out[rewards.index(None)]!r}; "
                               "rewards must be finite real numbers or None")
    return rewards


def total_rewards(rewards, weights):
    """(N, sources) rewards, NaN where a source gave none -> (N,) weighted sums over the sources that did,
    NaN where none did (TRL's nansum, the unscorable left out)."""
    return torch.where(rewards.isnan().all(1), torch.nan, (rewards * weights).nansum(1))
