"""Reward functions in TRL's convention, for grpo.py's --reward_fn: loading one from a file, calling it with
TRL's keywords, reading what it returns (None: no reward for this sample), scoring sampled responses with
them and a reward model, DAPO's overlong penalty, and weighting several rewards together."""
import importlib.util
import math
import numbers
import os
import warnings
from types import SimpleNamespace

import torch

import batching
import common
import logprobs
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


def add_flags(parser):
    """--reward_fn, --reward_model and --reward_weights: the reward sources of an online script."""
    parser.add_argument("--reward_fn", action="append", default=[],
                        help="path/to/file.py:function, repeatable (default on the toy data: the toy task's gold reward)")
    parser.add_argument("--reward_model", default=None, help="an rm.py output directory, as another reward")
    parser.add_argument("--reward_weights", type=float, nargs="+", default=None,
                        help="one weight per --reward_fn, then the --reward_model (default: all 1)")


def check_flags(reward_fn, reward_model, reward_weights, data, toy_reward_fn):
    """The --reward_fn specs to load: those given, or `toy_reward_fn` (None off the toy data) when no reward is;
    a UserError for no reward at all, or --reward_weights of another length than the rewards."""
    if not reward_fn and reward_model is None:
        if toy_reward_fn is None:
            raise UserError(f"{data}: no reward given; pass --reward_fn path/to/file.py:function or --reward_model")
        reward_fn = [toy_reward_fn]
    n_rewards = len(reward_fn) + (reward_model is not None)
    if reward_weights is not None and len(reward_weights) != n_rewards:
        raise UserError(f"--reward_weights has {len(reward_weights)} values for {n_rewards} rewards")
    return reward_fn


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


def source_means(rewards, names, device):
    """`rewards/<name>`: each source's mean over every rank's responses it scored (TRL's nanmean), for rewards
    (N, sources)."""
    sums = common.all_sum(rewards.nansum(0).tolist() + (~rewards.isnan()).sum(0).tolist(), device)
    return {f"rewards/{name}": total / n if n else math.nan for name, total, n in zip(names, sums, sums[len(names):])}


def total_rewards(rewards, weights):
    """(N, sources) rewards, NaN where a source gave none -> (N,) weighted sums over the sources that did,
    NaN where none did (TRL's nansum, the unscorable left out)."""
    return torch.where(rewards.isnan().all(1), torch.nan, (rewards * weights).nansum(1))


def overlong_penalty(lengths, max_new_tokens, buffer, penalty):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) times `penalty`, for lengths (N,) in tokens:
    0 up to max_new_tokens - buffer, then falling linearly to -penalty at max_new_tokens (the cap: no response
    is longer, so eq. 13's -1 beyond it never applies)."""
    return -penalty * (lengths - (max_new_tokens - buffer)).clamp(min=0) / buffer


@torch.no_grad()
def score(expanded, completions, tokenizer, reward_fns, kwargs, reward_model, overlong, device, size):
    """The rewards (N, sources) of responses `completions` (id lists) to `expanded` (prompt examples with their
    data `row`): each --reward_fn, then the reward model (None: none), then with overlong = (max_new_tokens,
    buffer, penalty) the overlong penalty. kwargs: the functions' keywords besides the data columns; size: the
    rows per reward-model forward."""
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    rows = [p["row"] for p in expanded]
    texts = [[{"role": "assistant", "content": t}] if isinstance(r["prompt"], list) else t for r, t in zip(rows, texts)]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "_where")}
    rewards = torch.tensor([call_reward_fn(name, fn, [r["prompt"] for r in rows], texts, completions, columns, kwargs)
                            for name, fn in reward_fns], device=device).reshape(len(reward_fns), len(rows)).T
    if reward_model is not None:
        batch = batching.collate([p["prompt"] for p in expanded], completions, tokenizer.pad_token_id, device)
        scores = [logprobs.last_token_outputs(reward_model, {k: v[i:i + size] for k, v in batch.items()})
                  for i in range(0, len(rows), size)]
        rewards = torch.cat([rewards, torch.cat(scores)[:, None].float()], 1)
    if overlong is not None:
        lengths = torch.tensor([float(len(c)) for c in completions], device=device)
        rewards = torch.cat([rewards, overlong_penalty(lengths, *overlong)[:, None]], 1)
    if rewards.isnan().all(1).any():
        warnings.warn("every reward function returned None for a response: it has A = 0 and no part in the "
                      "reward metrics; make at least one reward function score every response")
    return rewards
