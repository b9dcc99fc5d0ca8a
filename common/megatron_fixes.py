"""Fixes for Megatron-Core 0.16.1 bugs, most of them on its path without transformer-engine or apex.

These are not about the CPU: they bite on a GPU too (the CPU redirection, :mod:`common.distributed.
cpu_runtime`, applies them as well). Each fix is a no-op where the bug cannot occur, and names the
Megatron function it corrects. The model's build (``model.qwen3vl.build_qwen3vl``), the trainer's DDP
wrapping and checkpoint loading apply them (:func:`apply_megatron_fixes`, once per process).
"""

from __future__ import annotations

_APPLIED = False


def fix_torch_adam_fully_reshardable_load() -> None:
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the live
    optimizer state from the loaded tensors. With torch's Adam (used when neither TE nor apex is
    installed) the live state has a per-parameter ``step``, which the ``fully_reshardable`` format
    deliberately does not store per parameter (``load_state_dict`` restores it from the param
    groups), so loading raises ``KeyError: 'step'``. Copy only the keys that were loaded.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            destination[key].copy_(value)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def fix_torch_adam_shared_step_after_load() -> None:
    """``DistributedOptimizer.load_state_dict`` gives every parameter's torch-Adam state the SAME
    ``step`` tensor; torch's Adam increments ``step`` in place per parameter, so after a resume the
    shared counter advances once per parameter per step and the bias correction goes wrong (the run
    silently diverges from an uninterrupted one). Give each parameter its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return
    original = dopt.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()

    dopt.DistributedOptimizer.load_state_dict = load_state_dict


def fix_per_token_load_balancing_loss_scale() -> None:
    """``TopKRouter.attach_and_log_load_balancing_loss`` with per-token losses scales a rank's
    load-balancing loss by a token count, so that ``finalize_model_grads`` (which divides by the global
    token count) leaves it at the unsplit layer's scale. Under sequence or context parallelism a rank's
    loss is its share of the group's (global expert counts, its own tokens' probabilities) and the shares'
    gradients add up over the group, so the count must be the group's. With a router ``padding_mask`` it
    is (``get_tokens_per_expert_and_token_count`` sums the local counts after reducing them in place);
    without one it is the rank's own ``routing_map.shape[0]``, and the total came out 1/(tp*cp) of the
    unsplit layer's (measured: 0.5 with tp=2 and sequence parallelism). This project's model always
    passes a mask; a model without one gets the group's count here (the ranks of the group hold equal
    shares of the tokens then). A reduce group with data-parallel ranks (global auxiliary loss) is left
    alone.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter.attach_and_log_load_balancing_loss

    def attach(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
               reduce_group_has_dp=False, valid_token_count=None):
        if (self.calculate_per_token_loss and not reduce_group_has_dp and reduce_group.size() > 1
                and (valid_token_count is None or isinstance(valid_token_count, int))):
            own = activation.shape[0] if valid_token_count is None else valid_token_count
            valid_token_count = own * reduce_group.size()
        return original(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                        reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    TopKRouter.attach_and_log_load_balancing_loss = attach


def fix_router_gating_without_te() -> None:
    """``moe_utils.RouterGatingLinearFunction`` (every MoE router's gating) tests ``te_general_gemm is not
    None``, a name that only transformer-engine's import defines: without TE every MoE forward raised
    ``NameError``. Define it as absent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_megatron_fixes() -> None:
    """Apply every fix once per process."""
    global _APPLIED
    if not _APPLIED:
        fix_router_gating_without_te()
        fix_torch_adam_fully_reshardable_load()
        fix_torch_adam_shared_step_after_load()
        fix_per_token_load_balancing_loss_scale()
        _APPLIED = True
