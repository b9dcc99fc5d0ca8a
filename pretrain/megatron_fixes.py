"""Fixes for Megatron-Core 0.16.1 bugs on its local path (no transformer-engine, no apex).

These are not about the CPU: they bite on a GPU without TE/apex too. Each fix is a no-op where the bug
cannot occur, and names the Megatron function it corrects.
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


def apply_megatron_fixes() -> None:
    """Apply every fix once per process."""
    global _APPLIED
    if not _APPLIED:
        fix_torch_adam_fully_reshardable_load()
        fix_torch_adam_shared_step_after_load()
        _APPLIED = True
