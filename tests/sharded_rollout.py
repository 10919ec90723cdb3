"""Under torchrun (2 ranks, gloo): a rollout of an FSDP2 policy samples the same tokens with the policy gathered
for the whole of generate() (models.unsharded) as with FSDP2's per-forward gathers, in far fewer all-gathers,
and leaves every layer resharded. `python -m torch.distributed.run --nproc_per_node=2 tests/sharded_rollout.py DIR`."""
import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import grpo  # noqa: E402
import models  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.fsdp._fully_shard import _fsdp_param_group  # noqa: E402


def rollout(policy, tokenizer, prompts, device):
    """Seeded sampling, and the number of FSDP2 all-gathers it took."""
    gathers, gather = [], _fsdp_param_group.foreach_all_gather

    def counted(*args, **kwargs):
        gathers.append(1)
        return gather(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counted
    try:
        torch.manual_seed(common.rank())
        return common.generate_completions(policy, prompts, tokenizer, device, batch_size=4), len(gathers)
    finally:
        _fsdp_param_group.foreach_all_gather = gather


def main(path):
    args = grpo.parse_args(["--model", path, "--max_new_tokens", "12", "--dtype", "float32"])
    device = common.setup(argparse.Namespace(dtype="float32", seed=0, dist_timeout=5))
    tokenizer, policy = models.load_policy(args, device)
    assert models.is_sharded(policy)
    common.set_sampling(policy, args, tokenizer)
    prompts = [{"prompt": tokenizer(text).input_ids} for text in ["tell me about animals :", "tell me about :"] * 4]
    gathered, gathered_count = rollout(policy, tokenizer, prompts, device)
    layers = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    assert gathered_count == len(layers)  # each layer (and the root) gathered once for the whole rollout
    assert all(m._get_fsdp_state()._fsdp_param_group.is_sharded for m in layers)  # and freed after
    unsharded = models.unsharded
    models.unsharded = lambda model: contextlib.nullcontext()  # FSDP2 as it is: gather and free per forward
    try:
        plain, plain_count = rollout(policy, tokenizer, prompts, device)
    finally:
        models.unsharded = unsharded
    assert gathered == plain, (gathered, plain)
    assert plain_count > 4 * len(layers)  # per-forward gathers again after the rollout: the setting is restored
    assert max(len(c) for c in gathered) > 2  # several decoding steps
    print(json.dumps({"rank": common.rank(), "layers": len(layers), "gathers": gathered_count,
                      "gathers_without": plain_count}))


if __name__ == "__main__":
    common.run(lambda: main(sys.argv[1]))  # as the scripts end
