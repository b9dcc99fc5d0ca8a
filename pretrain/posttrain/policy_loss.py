"""Policy losses for group-based RL: SAPO, GRPO and GSPO behind one function.

Inputs (B = prompts * G responses, T = padded response length):

* ``logp``      [B, T] log pi_theta(y_t | x, y_<t) of the sampled tokens, with gradient;
* ``old_logp``  [B, T] the same under the policy that sampled the responses (no gradient);
* ``advantages`` [B]   one advantage per response (:func:`pretrain.posttrain.advantages.group_advantages`),
  the same for every token of the response;
* ``response_mask`` [B, T] 1 where the token was generated (counts in the loss), 0 for padding;
* ``ref_logp``  [B, T] optional log-probs under a frozen reference policy (GRPO's KL term, or a KL metric).

The token ratio is r_{i,t} = exp(logp - old_logp). Every method gives a per-token loss [B, T] (the
negated per-token objective), then an explicit *aggregation* turns it into one scalar:

* ``'seq-mean-token-mean'``: the mean over each response's tokens, then the mean over responses:
  (1/G) sum_i (1/|y_i|) sum_t. This is what all three papers write: GRPO (DeepSeekMath, arXiv
  2402.03300, Eq. 3), GSPO (arXiv 2507.18071, Eq. 5: a sequence-level term per response, averaged
  over the group) and SAPO (arXiv 2511.20347, Eq. 5). verl's ``compute_policy_loss_sapo``
  and ``compute_policy_loss_gspo`` hard-code it; ms-swift's ``--loss_type sapo`` (and ``grpo``) use
  "per-sample mean, then batch mean", the same thing.
* ``'token-mean'``: the mean over every generated token of the batch (DAPO, arXiv 2503.14476), so long
  responses weigh more.

Responses with no generated token are left out of both means. For exact aggregation over micro-batches
and data-parallel ranks, use :func:`policy_loss_terms`: it returns the *sum* and its *count* (responses
or tokens), which add up across micro-batches and ranks (the convention of :mod:`pretrain.step`,
where Megatron divides the summed gradients by the global count).

Log-ratios are clamped to [-20, 20] before ``exp`` only to keep a wild token from overflowing float32;
inside that range (r from 2e-9 to 5e8) nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

import torch

AGGREGATIONS = ("seq-mean-token-mean", "token-mean")
_LOG_RATIO_LIMIT = 20.0


@dataclass(frozen=True)
class SapoLoss:
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347, Eqs. 5-6): no clipping, a soft gate.

    Per token, maximise f(r) * A_i with f(r) = sigmoid(tau * (r - 1)) * 4 / tau and tau = ``tau_pos``
    where A_i > 0, ``tau_neg`` where A_i <= 0 (A_i = 0 contributes nothing either way). Defaults are the
    paper's (tau_pos = 1.0, tau_neg = 1.05; ms-swift ``--tau_pos 1.0 --tau_neg 1.05``).
    d f(r) / d log pi = w(r) * r with w(r) = 4 sigma (1 - sigma): w = 1 at r = 1, so on-policy the
    gradient is exactly the plain policy gradient A_i * grad log pi; off-policy it decays smoothly.
    """

    name: ClassVar[str] = "sapo"
    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        for field in ("tau_pos", "tau_neg"):
            value = getattr(self, field)
            if not value > 0:
                raise ValueError(f"sapo.{field}={value!r} must be > 0")


@dataclass(frozen=True)
class GrpoLoss:
    """GRPO (DeepSeekMath, arXiv 2402.03300, Eq. 3): PPO's token-level clipped ratio, optional KL.

    Per token, maximise min(r A_i, clip(r, 1 - clip_eps, 1 + clip_eps) A_i) - kl_coef * D_KL, with
    D_KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (Eq. 4, the "k3" estimator: unbiased, >= 0).
    ``kl_coef`` > 0 needs ``ref_logp``; 0 drops the term (as DAPO and most recent recipes do).
    """

    name: ClassVar[str] = "grpo"
    clip_eps: float = 0.2
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"grpo.clip_eps={self.clip_eps!r} must be in (0, 1)")
        if not self.kl_coef >= 0:
            raise ValueError(f"grpo.kl_coef={self.kl_coef!r} must be >= 0")


@dataclass(frozen=True)
class GspoLoss:
    """GSPO (Group Sequence Policy Optimization, arXiv 2507.18071, Eqs. 5 and 7): one ratio per response.

    s_i = exp((1/|y_i|) sum_t log r_{i,t}) (the length-normalised sequence likelihood ratio); per
    response, maximise min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i). The paper's ranges are
    eps_low = 3e-4, eps_high = 4e-4 (Sec. 5.1): s_i is a geometric mean, so it moves far less than a
    token ratio. The per-response loss is given to each of its tokens, so 'seq-mean-token-mean' is
    exactly the paper's (1/G) sum_i.
    """

    name: ClassVar[str] = "gspo"
    eps_low: float = 3e-4
    eps_high: float = 4e-4

    def __post_init__(self) -> None:
        if not 0 < self.eps_low < 1:
            raise ValueError(f"gspo.eps_low={self.eps_low!r} must be in (0, 1)")
        if not self.eps_high > 0:
            raise ValueError(f"gspo.eps_high={self.eps_high!r} must be > 0")


PolicyLossConfig = SapoLoss | GrpoLoss | GspoLoss

# name -> (config class, fn(cfg, logp, old_logp, advantages, mask, ref_logp) -> (per-token loss, metrics))
_LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
_REGISTRY: dict[str, tuple[type, _LossFn]] = {}


def _register(config_cls: type) -> Callable[[_LossFn], _LossFn]:
    def add(fn: _LossFn) -> _LossFn:
        _REGISTRY[config_cls.name] = (config_cls, fn)
        return fn

    return add


def policy_loss_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_loss_config(name: str, **options: Any) -> PolicyLossConfig:
    """The config of method ``name`` ('sapo', 'grpo', 'gspo') with ``options`` over its defaults."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy loss {name!r}; known: {policy_loss_names()}")
    cls = _REGISTRY[name][0]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for policy loss {name!r}; known: {sorted(known)}")
    return cls(**options)


def policy_loss_config_from_mapping(cfg: Mapping[str, Any]) -> PolicyLossConfig:
    """From a config mapping such as ``{name: sapo, tau_pos: 1.0, tau_neg: 1.05}``."""
    if "name" not in cfg:
        raise ValueError(f"policy loss config needs a 'name' (one of {policy_loss_names()}); got keys {sorted(cfg)}")
    options = {k: v for k, v in cfg.items() if k != "name"}
    return policy_loss_config(cfg["name"], **options)


# --------------------------------------------------------------------------------------------------
# shared pieces


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.any()):
        return x.new_zeros(())
    return x[mask.bool()].max()


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log r (0 on padding, where both log-probs were zeroed by :func:`policy_loss_terms`)."""
    return (logp - old_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate exp(q) - q - 1, q = ref_logp - logp (DeepSeekMath Eq. 4)."""
    q = (ref_logp - logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return torch.exp(q) - q - 1


def _ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    dev = (torch.exp(log_ratio) - 1).abs()
    return {"ratio_dev_mean": _masked_mean(dev, mask), "ratio_dev_max": _masked_max(dev, mask)}


def aggregate_terms(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of ``per_token`` [B, T] under ``aggregation``; their quotient is the aggregated mean.

    'seq-mean-token-mean': sum over responses of each response's token mean, count = responses with at
    least one token. 'token-mean': sum over all masked tokens, count = masked tokens.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; known: {list(AGGREGATIONS)}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if aggregation == "token-mean":
        return masked.sum(), mask.sum()
    lengths = mask.sum(dim=-1)
    per_sequence = masked.sum(dim=-1) / lengths.clamp(min=1)
    return per_sequence.sum(), (lengths > 0).to(per_token.dtype).sum()


# --------------------------------------------------------------------------------------------------
# the methods: each returns the per-token loss [B, T] (to minimise) and its own metrics


@_register(SapoLoss)
def _sapo(cfg: SapoLoss, logp, old_logp, advantages, mask, ref_logp):
    log_ratio = _log_ratio(logp, old_logp, mask)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    tau = torch.where(adv > 0, torch.full_like(adv, cfg.tau_pos), torch.full_like(adv, cfg.tau_neg))
    gate_prob = torch.sigmoid(tau * (ratio - 1))
    per_token = -(gate_prob * (4.0 / tau)) * adv
    with torch.no_grad():
        metrics = _ratio_metrics(log_ratio, mask)
        metrics["gate_weight_mean"] = _masked_mean(4 * gate_prob * (1 - gate_prob), mask)
    return per_token, metrics


@_register(GrpoLoss)
def _grpo(cfg: GrpoLoss, logp, old_logp, advantages, mask, ref_logp):
    log_ratio = _log_ratio(logp, old_logp, mask)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if cfg.kl_coef > 0:
        per_token = per_token + cfg.kl_coef * k3_kl(logp, ref_logp)
    with torch.no_grad():
        metrics = _ratio_metrics(log_ratio, mask)
        # the clipped branch is taken, and the token's gradient is zero
        metrics["clip_frac"] = _masked_mean((clipped < unclipped).to(logp.dtype), mask)
    return per_token, metrics


@_register(GspoLoss)
def _gspo(cfg: GspoLoss, logp, old_logp, advantages, mask, ref_logp):
    log_ratio = _log_ratio(logp, old_logp, mask)
    lengths = mask.sum(dim=-1).clamp(min=1)
    seq_ratio = torch.exp((log_ratio * mask).sum(dim=-1) / lengths)  # s_i, GSPO Eq. 7
    unclipped = seq_ratio * advantages
    clipped = seq_ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * advantages
    per_sequence = -torch.minimum(unclipped, clipped)
    per_token = per_sequence[:, None].expand_as(logp)
    with torch.no_grad():
        metrics = _ratio_metrics(log_ratio, mask)
        seq_mask = (mask.sum(dim=-1) > 0).to(logp.dtype)
        metrics["seq_ratio_dev_mean"] = _masked_mean((seq_ratio - 1).abs(), seq_mask)
        # share of *tokens* whose response is clipped (the paper reports token fractions)
        seq_clipped = (clipped < unclipped).to(logp.dtype)
        metrics["clip_frac"] = _masked_mean(seq_clipped[:, None].expand_as(logp), mask)
    return per_token, metrics


# --------------------------------------------------------------------------------------------------
# the entry points


def _check_inputs(cfg, logp, old_logp, advantages, mask, aggregation, ref_logp) -> None:
    if type(cfg) not in {c for c, _ in _REGISTRY.values()}:
        raise ValueError(f"policy loss config {cfg!r} is not one of {[c.__name__ for c, _ in _REGISTRY.values()]}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; known: {list(AGGREGATIONS)}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("response_mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}; they must match")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must be [B] = [{logp.shape[0]}] (one per response), got {tuple(advantages.shape)}"
        )
    if isinstance(cfg, GrpoLoss) and cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"grpo.kl_coef={cfg.kl_coef} needs ref_logp (reference-policy log-probs)")


def policy_loss_terms(
    method_cfg: PolicyLossConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: str,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Like :func:`policy_loss` but returns (loss sum, count, metrics): sum / count is the loss.

    Sums and counts add over micro-batches and data-parallel ranks, so dividing the total sum by the
    total count gives the aggregation over the whole global batch (not a mean of micro-batch means).
    """
    _check_inputs(method_cfg, logp, old_logp, advantages, response_mask, aggregation, ref_logp)
    mask = response_mask.to(logp.dtype)
    # Padding may hold anything (-inf, garbage): zero it in every log-prob before any arithmetic, so
    # neither the forward sums nor the backward (0 * inf) can turn into NaN.
    keep = response_mask.bool()
    logp = torch.where(keep, logp, 0.0)
    old_logp = torch.where(keep, old_logp.detach(), 0.0)
    if ref_logp is not None:
        ref_logp = torch.where(keep, ref_logp.detach(), 0.0)
    advantages = advantages.detach().to(logp.dtype)
    fn = _REGISTRY[method_cfg.name][1]
    per_token, metrics = fn(method_cfg, logp, old_logp, advantages, mask, ref_logp)
    if ref_logp is not None:
        with torch.no_grad():
            metrics["kl"] = _masked_mean(k3_kl(logp, ref_logp), mask)
    total, count = aggregate_terms(per_token, mask, aggregation)
    return total, count, metrics


def policy_loss(
    method_cfg: PolicyLossConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: str,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss to *minimise* (the negated objective) and detached metrics (0-dim tensors).

    Metrics, over the generated tokens: ``ratio_dev_mean`` / ``ratio_dev_max`` (|r - 1|, token ratio),
    SAPO ``gate_weight_mean`` (the gradient weight 4 sigma (1 - sigma), 1 on-policy), GRPO/GSPO
    ``clip_frac`` (share of tokens whose gradient the clip zeroes; for GSPO a token counts when its
    response is clipped), GSPO ``seq_ratio_dev_mean`` (|s_i - 1| over responses), and ``kl`` (k3
    estimate of KL(pi_theta || pi_ref)) whenever ``ref_logp`` is given. A batch with no generated
    token gives a loss of 0 (with a gradient of 0).
    """
    total, count, metrics = policy_loss_terms(method_cfg, logp, old_logp, advantages, response_mask,
                                              aggregation, ref_logp)
    return total / count.clamp(min=1), metrics
