"""A verifiable reward for grpo.py in TRL's reward-function convention: the toy task's gold score.

    python grpo.py --reward_fn toy/rewards.py:gold_reward     # the default on the toy data

A reward function takes the prompts and the completions of a batch (strings, or lists of
messages for conversational prompts) and every other column of the data rows as keywords
(one list each), and returns one float per completion.
"""
from toy.task import gold_score


def text(x):
    return x[-1]["content"] if isinstance(x, list) else x  # conversational: the last message


def gold_reward(prompts, completions, **columns):
    """Fraction of the completion's words on a topic the prompt asks for (0 for an empty completion)."""
    return [gold_score(text(p), text(c)) for p, c in zip(prompts, completions)]
