"""PPO rollout math against hand-computed examples: EOS truncation, KL penalty in the reward, GAE, whitening."""
import math

import pytest
import torch

from fastalign.trainers import PPOConfig, PPOTrainer
from fastalign.trainers.rollout import gae, rewards_with_kl, truncate_at_eos
from fastalign.trainers.tasks import CountingTask
from fastalign.trainers.tiny import tiny_llama, word_tokenizer

EOS, PAD = 1, 0


def test_truncate_at_eos():
    responses = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 9, 9, 9]])
    cut, mask, has_eos = truncate_at_eos(responses, EOS, PAD)
    assert cut.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert has_eos.tolist() == [True, False, True]
    cut, mask, has_eos = truncate_at_eos(responses, [EOS, 6], PAD)  # any of several EOS ids (TRL 1.16)
    assert cut.tolist() == [[5, 1, 0, 0], [5, 6, 0, 0], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, True]


def test_kl_penalty_goes_into_every_token_and_the_score_onto_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scores = torch.tensor([1.0, 2.0])
    rewards, kl = rewards_with_kl(scores, logprobs, ref, mask, kl_coef=0.1, kl_estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 1.0], [0.0, -0.1 + 2.0, 0.0]]))
    rewards, kl = rewards_with_kl(scores, logprobs, ref, mask, kl_coef=0.1, kl_estimator="k3")
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731  d = ref - logprobs
    expected_kl = torch.tensor([[k3(-0.5), 0.0, k3(1.0)], [0.0, k3(-1.0), 0.0]])
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards[0, 2], torch.tensor(-0.1 * k3(1.0) + 1.0))


def test_gae_against_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])  # 5.0: past the end, ignored
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.9]])  # 9.9: past the end, ignored
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta = (0 + .9*.6 - .5, 0 + .9*.7 - .6, 1 + 0 - .7) = (.04, .03, .3); A_t = delta_t + .72 A_{t+1}
    # row 1: delta = (.04, 2 - .6, 0) = (.04, 1.4, 0): the episode ends after the second token
    expected = torch.tensor([[0.04 + 0.72 * (0.03 + 0.72 * 0.3), 0.03 + 0.72 * 0.3, 0.3],
                             [0.04 + 0.72 * 1.4, 1.4, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 0.0]]))


def test_gae_with_gamma_and_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 0.125]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[5.5, 4.75, 2.875]]))


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_rollout_whitens_advantages_over_the_response_tokens(tmp_path, whiten_rewards):
    task = CountingTask()
    tok = word_tokenizer(task.words)
    torch.manual_seed(0)
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64)
    config = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, response_length=6,
                       temperature=1.0, whiten_rewards=whiten_rewards, kl_coef=0.1, disable_tqdm=True)
    trainer = PPOTrainer(model, tok, task.prompts(64), task.score, config)
    rollout = trainer.rollout(list(range(16)))
    mask = rollout.mask
    assert rollout.targets.shape == mask.shape == rollout.advantages.shape
    assert (rollout.targets[~mask] == -100).all() and (rollout.targets[mask] != -100).all()
    adv = rollout.advantages[mask]
    torch.testing.assert_close(adv.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.var(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert (rollout.advantages[~mask] == 0).all() and (rollout.values[~mask] == 0).all()
    assert rollout.metrics["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference
