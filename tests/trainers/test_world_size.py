"""The normalizations over ranks: GRPO's token-count normalizer (two ranks simulated in one process: DDP averages
their gradients) and KTO's batch KL averaged over 2 gloo ranks."""
import pytest
import torch
import torch.distributed as dist

from helpers.distributed import run_ranks
from fastalign.objectives.kto import kto_kl

pytestmark = pytest.mark.usefixtures("one_thread")


def gradients(trainer, batch, rows, world_size, monkeypatch):
    """The policy's gradients of ``compute_loss(batch, rows)`` as a rank of ``world_size`` computes them."""
    from fastalign.trainers import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: world_size)
    trainer.model.zero_grad(set_to_none=True)
    loss, _ = trainer.compute_loss(batch, rows)
    loss.backward()
    return [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_two_simulated_ranks_average_to_the_one_process_gradient(monkeypatch, loss_type):
    """Two ranks each holding half of a generation batch (completions of different lengths), the token normalizer
    ``num_items_in_batch`` counting both halves: the mean of their gradients (what DDP and FSDP apply) is the
    gradient of the whole batch in one process. dapo's token sum over all ranks' tokens needs the factor
    ``world_size`` (without it the mean is half the gradient); grpo's per-sequence means do not."""
    from fastalign.trainers import GRPOConfig, GRPOTrainer  # here: the ranks of the test below import this module
    from fastalign.trainers.tasks import CountingTask
    from fastalign.trainers.tiny import tiny_llama, word_tokenizer

    task = CountingTask()
    tokenizer = word_tokenizer(task.words)
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, hidden_size=32, intermediate_size=64)
    config = GRPOConfig(output_dir="unused", learning_rate=1e-3, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=6, temperature=1.0, beta=0.1, loss_type=loss_type,
                        disable_tqdm=True)
    trainer = GRPOTrainer(model, tokenizer, task.prompts(8, seed=3), lambda p, c: [len(x) / 10 for x in c], config)
    batch = trainer.rollout([0] * 4 + [1] * 4)
    assert len(set((batch.targets != -100).sum(1).tolist())) > 1  # the halves' token counts differ
    whole = gradients(trainer, batch, torch.arange(8), 1, monkeypatch)
    ranks = [gradients(trainer, batch, rows, 2, monkeypatch) for rows in (torch.arange(4), torch.arange(4, 8))]
    for one, a, b in zip(whole, *ranks):
        torch.testing.assert_close((a + b) / 2, one, rtol=1e-5, atol=1e-8)


def kto_kl_on_rank(rank, world_size):
    """Rank 0's batch KL mean is 0.3, rank 1's -0.1: TRL averages them (0.1), then clamps."""
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -2.0]])[rank]
    reference = policy - torch.tensor([[0.2, 0.4], [-0.3, 0.1]])[rank]
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    return kto_kl(policy, reference), kto_kl(policy, reference, process_group=singles[rank])


def test_kto_kl_averages_over_two_gloo_ranks():
    (averaged0, own0), (averaged1, own1) = run_ranks(kto_kl_on_rank, 2)
    torch.testing.assert_close(averaged0, torch.tensor(0.1), rtol=0, atol=1e-7)
    assert torch.equal(averaged0, averaged1)
    torch.testing.assert_close(own0, torch.tensor(0.3), rtol=0, atol=1e-7)  # a group of one: its own mean
    assert own1 == 0  # -0.1, clamped
