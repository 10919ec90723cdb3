import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import batching
import common
import formats
import logprobs
import models
import reward_models
import rm

CPU = torch.device("cpu")


def test_reward_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -logsig(z) = log(1 + exp(-z))
    plain = [math.log1p(math.exp(-(1.0 - 0.0))),      # z = 1:  0.313262
             math.log1p(math.exp(-(0.0 - 2.0)))]      # z = -2: 2.126928
    assert plain == pytest.approx([0.313262, 2.126928], abs=1e-6)
    torch.testing.assert_close(rm.reward_loss(chosen, rejected), torch.tensor(plain), atol=1e-6, rtol=1e-6)
    # margin 0.5 shifts z down: 0.474077 and 2.578889. Centring (align-anything): 0.1 * the mean of r^2 over all
    # 2B = 4 rewards 1, 0, 0, 2: 0.1 * (1 + 0 + 0 + 4) / 4 = 0.125, added to the mean over the 2 pairs:
    # (0.474077 + 2.578889) / 2 + 0.125 = 1.526483 + 0.125 = 1.6514834
    logsig_terms = [math.log1p(math.exp(-(1.0 - 0.0 - 0.5))), math.log1p(math.exp(-(0.0 - 2.0 - 0.5)))]
    assert logsig_terms == pytest.approx([0.474077, 2.578889], abs=1e-6)
    losses = rm.reward_loss(chosen, rejected, margin=0.5, center_coef=0.1)
    assert losses.mean().item() == pytest.approx(1.6514834, abs=1e-6)


def test_step_is_the_pairs_share_of_the_global_batch():
    """rm_step on rewards [1, 0 | 0, 2] (chosen | rejected), the pairs above, as half of a global batch of 4 pairs."""
    loss, sums = rm.rm_step(torch.tensor([1.0, 0.0, 0.0, 2.0]), 4, SimpleNamespace(margin=0.0, center_coef=0.0))
    assert float(loss) == pytest.approx((0.313262 + 2.126928) / 4, abs=1e-6)  # 0.6100475
    assert {k: float(v) for k, v in sums.items()} == pytest.approx(
        {"loss": 0.6100475, "accuracy": 1, "rewards/chosen": 1.0, "rewards/rejected": 2.0, "rewards/margins": -1.0},
        abs=1e-6)
    assert common.means({k: float(v) for k, v in sums.items()}, 4)["accuracy"] == 0.25


@pytest.fixture(scope="module")
def tiny_rm(tiny_model):
    from transformers import AutoModel

    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(tiny_model)
    return tokenizer, reward_models.RewardModel(models.load_model(tiny_model, CPU, auto_class=AutoModel)).eval()


def test_reward_is_read_at_the_last_real_token(tiny_rm):
    tokenizer, model = tiny_rm
    eos = tokenizer.eos_token_id
    prompts, completions = [[1, 10, 11], [1, 12]], [[20, 21, eos], [22, eos]]
    batch = batching.collate(prompts, completions, tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        rewards = logprobs.last_token_outputs(model, batch)
        values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        # P = 3 prompt columns: row 0's EOS is column 3 + 2, row 1's column 3 + 1
        # (rewards come from a packed forward, values from the padded one: equal up to float rounding)
        torch.testing.assert_close(rewards, torch.stack([values[0, 5], values[1, 4]]), atol=1e-5, rtol=0)
        # and the padding around a row changes nothing: the same row scored alone
        alone = logprobs.last_token_outputs(model, batching.collate(prompts[1:], completions[1:], tokenizer.pad_token_id, CPU))
    torch.testing.assert_close(rewards[1:], alone, atol=1e-5, rtol=0)


def test_saved_reward_model_scores_exactly_as_before(tiny_rm, tmp_path):
    tokenizer, model = tiny_rm
    examples = formats.tokenize([{"prompt": "tell me about animals :", "chosen": "cat dog", "rejected": "red"}] * 2,
                               tokenizer, 64, ("chosen", "rejected"))
    batch = batching.collate_pairs(examples, tokenizer.pad_token_id, CPU)
    reward_models.save_reward_model(model, tokenizer, str(tmp_path / "rm"))
    assert sorted(f for f in os.listdir(tmp_path / "rm") if f.endswith(".safetensors")) == [
        "model.safetensors", reward_models.HEAD_FILE]
    loaded = reward_models.load_reward_model(str(tmp_path / "rm"), CPU).eval()
    with torch.no_grad():
        assert torch.equal(logprobs.last_token_outputs(loaded, batch), logprobs.last_token_outputs(model, batch))


def test_a_frozen_reward_model_takes_the_attention_implementation_asked_for(tiny_rm, tmp_path):
    tokenizer, model = tiny_rm
    reward_models.save_reward_model(model, tokenizer, str(tmp_path / "rm"))
    frozen = reward_models.load_frozen(str(tmp_path / "rm"), tokenizer, "policy", CPU, "float32", False, False, None,
                                       "eager")
    assert frozen.backbone.config._attn_implementation == "eager"
    assert reward_models.load_reward_model(str(tmp_path / "rm"), CPU).backbone.config._attn_implementation != "eager"
    with pytest.raises(common.UserError, match="--attn_implementation no_such_kernel"):
        reward_models.load_reward_model(str(tmp_path / "rm"), CPU, attn_implementation="no_such_kernel")


def test_missing_head_is_a_user_error(tiny_model):
    with pytest.raises(common.UserError, match="value_head.safetensors"):
        reward_models.load_reward_model(tiny_model, CPU)


def test_rm_learns_held_out_preferences(sft_model, tmp_path):
    out = str(tmp_path / "rm")
    rm.main(["--model", sft_model, "--output_dir", out, "--max_steps", "60", "--log_every", "20"])
    evals = [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 60]
    before, after = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
    assert after >= 0.8 and after > before + 0.1, (before, after)  # seen: 0.70 -> 0.87
    assert os.path.isfile(os.path.join(out, reward_models.HEAD_FILE))
