"""SAPO / GRPO / GSPO losses against hand computations, and the two aggregations."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.posttrain.policy_loss import (
    GrpoLoss,
    GspoLoss,
    SapoLoss,
    aggregate_terms,
    policy_loss,
    policy_loss_config,
    policy_loss_config_from_mapping,
    policy_loss_terms,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------------------------------
# SAPO


def test_sapo_gate_value_and_gradient_match_the_closed_form():
    """Three tokens of one response (A > 0) and one of another (A < 0): loss and d loss / d logp."""
    tau_pos, tau_neg = 1.0, 1.05
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0]])
    log_r = [[0.3, -0.7, 1.2], [0.4]]
    logp = old.clone()
    logp[0] += torch.tensor(log_r[0])
    logp[1, 0] += log_r[1][0]
    logp.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([0.8, -1.3])

    loss, metrics = policy_loss(SapoLoss(tau_pos, tau_neg), logp, old, adv, mask, "seq-mean-token-mean")
    loss.backward()

    # objective J = (1/2) [ (1/3) sum_t f(r) A_0 + f(r) A_1 ], f(r) = sigmoid(tau (r - 1)) 4 / tau;
    # dJ/dlogp = (weight of the token) * f'(r) * r * A with f'(r) = 4 sigma (1 - sigma)
    expected_loss, expected_grad, gate_weights = 0.0, torch.zeros(2, 3), []
    for i, (a, tau, n) in enumerate(((0.8, tau_pos, 3), (-1.3, tau_neg, 1))):
        for t, lr in enumerate(log_r[i]):
            r = math.exp(lr)
            s = _sigmoid(tau * (r - 1))
            expected_loss -= 0.5 / n * s * 4 / tau * a
            expected_grad[i, t] = -0.5 / n * 4 * s * (1 - s) * r * a
            gate_weights.append(4 * s * (1 - s))
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(logp.grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert metrics["gate_weight_mean"].item() == pytest.approx(sum(gate_weights) / 4, rel=1e-6)
    devs = [abs(math.exp(x) - 1) for row in log_r for x in row]
    assert metrics["ratio_dev_mean"].item() == pytest.approx(sum(devs) / 4, rel=1e-6)
    assert metrics["ratio_dev_max"].item() == pytest.approx(max(devs), rel=1e-6)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_sapo_on_policy_gradient_is_the_plain_policy_gradient(aggregation):
    """At r = 1 the gate's gradient weight is 1: SAPO's parameter gradient equals that of -A log pi."""
    torch.manual_seed(0)
    vocab, hidden, B, T = 11, 6, 4, 5
    head = torch.nn.Linear(hidden, vocab)
    states = torch.randn(B, T, hidden)
    tokens = torch.randint(0, vocab, (B, T))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([1.2, -0.4, 0.3, -1.1])

    def logp():
        return torch.log_softmax(head(states), -1).gather(-1, tokens[..., None])[..., 0]

    def grads(loss):
        head.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in head.parameters()]

    sapo_loss, metrics = policy_loss(SapoLoss(), logp(), logp().detach(), adv, mask, aggregation)
    plain, count = aggregate_terms(-adv[:, None] * logp(), mask, aggregation)
    for got, want in zip(grads(sapo_loss), grads(plain / count)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert metrics["gate_weight_mean"].item() == pytest.approx(1.0)
    assert metrics["ratio_dev_max"].item() == 0.0


# --------------------------------------------------------------------------------------------------
# GRPO


def test_grpo_clips_tokens_outside_the_band_in_the_advantage_direction():
    eps = 0.2
    old = torch.zeros(2, 3)
    # response 0 (A > 0): r = 1.1 (inside), 1.5 (clipped), 0.5 (below the band, not clipped for A > 0)
    # response 1 (A < 0): r = 0.5 (clipped), 1.5 (not clipped for A < 0), 1.0
    ratios = torch.tensor([[1.1, 1.5, 0.5], [0.5, 1.5, 1.0]])
    logp = ratios.log().requires_grad_(True)
    mask = torch.ones(2, 3)
    adv = torch.tensor([2.0, -1.0])
    loss, metrics = policy_loss(GrpoLoss(clip_eps=eps), logp, old, adv, mask, "token-mean")
    loss.backward()

    chosen = [[1.1 * 2, 1.2 * 2, 0.5 * 2], [0.8 * -1, 1.5 * -1, 1.0 * -1]]  # min(r A, clip(r) A)
    assert loss.item() == pytest.approx(-sum(map(sum, chosen)) / 6, rel=1e-6)
    # d(-r A)/dlogp = -r A / 6 where unclipped, 0 where clipped
    expected = torch.tensor([[-1.1 * 2, 0.0, -0.5 * 2], [0.0, 1.5, 1.0]]) / 6
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 6)


def test_grpo_kl_term_is_the_k3_estimator_and_needs_the_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    adv = torch.tensor([0.0])  # only the KL term is left
    loss, metrics = policy_loss(GrpoLoss(kl_coef=0.1), logp, logp.detach(), adv, mask, "token-mean", ref_logp=ref)
    k3 = [math.exp(q) - q - 1 for q in (-0.5, 1.0)]
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(sum(k3) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logp"):
        policy_loss(GrpoLoss(kl_coef=0.1), logp, logp.detach(), adv, mask, "token-mean")


# --------------------------------------------------------------------------------------------------
# GSPO


def test_gspo_sequence_ratio_and_clipping_on_hand_made_numbers():
    """s_i = exp(mean_t log r); clipped with [1 - 3e-4, 1 + 4e-4] in the advantage's direction."""
    old = torch.zeros(3, 4)
    log_r = torch.tensor([
        [2e-4, 4e-4, 0.0, 9.0],  # 3 tokens: s = exp(2e-4), inside the band
        [1e-3, 1e-3, 0.0, 0.0],  # 2 tokens: s = exp(1e-3) > 1 + 4e-4, A > 0 -> clipped
        [-1e-3, 0.0, -2e-3, 0.0],  # 4 tokens: s = exp(-7.5e-4) < 1 - 3e-4, A < 0 -> clipped
    ])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.5, 2.0, -0.5])
    logp = log_r.clone().requires_grad_(True)
    loss, metrics = policy_loss(GspoLoss(), logp, old, adv, mask, "seq-mean-token-mean")
    loss.backward()

    s = [math.exp(2e-4), math.exp(1e-3), math.exp(-7.5e-4)]
    objective = [s[0] * 1.5, (1 + 4e-4) * 2.0, (1 - 3e-4) * -0.5]
    assert loss.item() == pytest.approx(-sum(objective) / 3, rel=1e-6)
    # only response 0 has a gradient: d(-s A / 3)/dlogp_t = -s A / (3 |y|) on its 3 tokens
    expected = torch.zeros(3, 4)
    expected[0, :3] = -s[0] * 1.5 / 9
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["clip_frac"].item() == pytest.approx(6 / 9)  # tokens of responses 1 and 2
    assert metrics["seq_ratio_dev_mean"].item() == pytest.approx(sum(abs(x - 1) for x in s) / 3, rel=1e-4)


def test_gspo_token_mean_weights_each_response_by_its_length():
    old = torch.zeros(2, 3)
    logp = torch.zeros(2, 3)  # s = 1, nothing clipped: loss_i = -A_i
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, _ = policy_loss(GspoLoss(), logp, old, adv, mask, "token-mean")
    assert loss.item() == pytest.approx(-(3 * 1.0 + 1 * -2.0) / 4)


# --------------------------------------------------------------------------------------------------
# aggregation and inputs


def test_both_aggregations_on_a_hand_made_mask():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the empty response is left out
    total, count = aggregate_terms(per_token, mask, "seq-mean-token-mean")
    assert (total.item(), count.item()) == (2.0 + 4.0, 2)
    total, count = aggregate_terms(per_token, mask, "token-mean")
    assert (total.item(), count.item()) == (10.0, 4)


def test_sums_and_counts_add_up_over_micro_batches():
    """Split in two micro-batches, sum / count of the totals equals the loss of the whole batch."""
    torch.manual_seed(1)
    logp, old = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).int()
    adv = torch.randn(6, dtype=torch.float64)  # float64: the loss is a small difference of large terms
    for aggregation in ("seq-mean-token-mean", "token-mean"):
        whole, _ = policy_loss(SapoLoss(), logp, old, adv, mask, aggregation)
        parts = [policy_loss_terms(SapoLoss(), logp[s], old[s], adv[s], mask[s], aggregation)
                 for s in (slice(0, 2), slice(2, 6))]
        total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        assert total.item() == pytest.approx(whole.item(), rel=1e-12)


def test_padding_with_infinite_log_probs_cannot_make_nans():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("-inf")]])
    ref = torch.tensor([[-0.9, float("nan")]])
    mask = torch.tensor([[1, 0]])
    for cfg in (SapoLoss(), GrpoLoss(kl_coef=0.05), GspoLoss()):
        logp.grad = None
        loss, metrics = policy_loss(cfg, logp, old, torch.tensor([1.0]), mask, "token-mean", ref_logp=ref)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), cfg
        assert all(torch.isfinite(v) for v in metrics.values()), cfg
        assert logp.grad[0, 1] == 0


def test_configs_by_name_and_bad_inputs_give_one_line_errors():
    assert policy_loss_config("sapo") == SapoLoss(1.0, 1.05)
    assert policy_loss_config_from_mapping({"name": "gspo", "eps_high": 5e-4}) == GspoLoss(3e-4, 5e-4)
    assert policy_loss_config("grpo", clip_eps=0.28) == GrpoLoss(0.28, 0.0)
    cases = [
        (lambda: policy_loss_config("ppo"), "unknown policy loss 'ppo'; known: ['grpo', 'gspo', 'sapo']"),
        (lambda: policy_loss_config("sapo", tau=1.0), "unknown option(s) ['tau'] for policy loss 'sapo'"),
        (lambda: SapoLoss(tau_neg=0.0), "sapo.tau_neg=0.0 must be > 0"),
        (lambda: policy_loss(SapoLoss(), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3),
                             "mean"), "unknown aggregation 'mean'"),
        (lambda: policy_loss(SapoLoss(), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3),
                             "token-mean"), "advantages must be [B] = [2]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)
