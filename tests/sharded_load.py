"""Checks that load_model's sharded path gives what from_pretrained gives: every tensor of the state dict, the
buffers computed at init (rotary inv_freq), tied weights tied. Run in one process by test_loading.py, and under
torchrun: `python -m torch.distributed.run --nproc_per_node=2 tests/sharded_load.py DIR:CLASS:DTYPE ...`."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import models  # noqa: E402


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check(path, auto_name, dtype, device):
    """load_model(trained=True) keeps float32 weights; a frozen model (trained=False) holds them in `dtype`."""
    import transformers

    auto_class = getattr(transformers, auto_name)
    for trained in (True, False):
        expected = auto_class.from_pretrained(path, dtype=torch.float32 if trained else getattr(torch, dtype))
        model = models.load_model(path, device, dtype, auto_class=auto_class, trained=trained)
        assert models.is_sharded(model) == (trained or common.world() > 1), path  # one process: frozen is plain
        got, want = model.state_dict(), expected.state_dict()
        assert got.keys() == want.keys(), set(got) ^ set(want)
        for key in want:
            assert full(got[key]).dtype == want[key].dtype and torch.equal(full(got[key]), want[key]), (path, key)
        got_buffers, want_buffers = dict(model.named_buffers()), dict(expected.named_buffers())
        assert got_buffers.keys() == want_buffers.keys()
        for key in want_buffers:
            assert torch.equal(got_buffers[key], want_buffers[key]), (path, key)
        tied = expected.get_output_embeddings() is not None and (
            expected.get_output_embeddings().weight is expected.get_input_embeddings().weight)
        if tied:
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, path


def main(specs):
    device = common.setup(argparse.Namespace(dtype="float32", seed=0, dist_timeout=5, padding_free=None))
    for spec in specs:
        path, auto_name, dtype = spec.split(":")
        check(path, auto_name, dtype, device)
    print(f"rank {common.rank()}: {len(specs)} models load as from_pretrained does")


if __name__ == "__main__":
    common.run(lambda: main(sys.argv[1:]))  # as the scripts end
