"""The reference policy of DPO and PPO: the model as it was before preference tuning.

For LoRA, QLoRA and prompt tuning the reference costs nothing: it is the same model with its
adapter switched off (``lmtune.methods.adapters.disable_adapter``). Full and partial
fine-tuning change the weights themselves, so the reference is a frozen copy — unless the
objective only needs the reference before the first step (``dpo.precompute_ref``), when the
policy itself still is the reference and no copy is made.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmtune.methods.adapters import disable_adapter


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout to 0, as TRL's preference trainers do by default.

    Preference losses compare log-probs of the policy with the reference's (and PPO with the
    rollout policy's); dropout noise in one side but not the other biases those ratios.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class Reference:
    """Runs the reference policy: ``with ref.model(device) as m: completion_logps(m, batch)``.

    Args:
        policy: the model being trained (after the method is applied).
        adapter: the method trains an adapter: disable it instead of copying the model.
        keep_copy: for full/freeze, keep a frozen copy (False: only valid before training
            changes the policy, e.g. to precompute reference log-probs).
    """

    def __init__(self, policy: nn.Module, adapter: bool, keep_copy: bool = True):
        self.policy = policy
        self.copy: nn.Module | None = None
        self._disable: Any = None
        if adapter:
            self._disable = disable_adapter
        elif keep_copy:
            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)

    @contextlib.contextmanager
    def model(self, device: torch.device | None = None) -> Iterator[nn.Module]:
        """The reference model, with gradients off and in eval mode, for the ``with`` block."""
        with torch.no_grad():
            if self.copy is not None:
                if device is not None:
                    self.copy.to(device)  # the loop moves only the policy; the copy follows once
                yield self.copy
                return
            was_training = self.policy.training
            self.policy.eval()
            try:
                if self._disable is not None:
                    with self._disable(self.policy):
                        yield self.policy
                else:
                    yield self.policy
            finally:
                self.policy.train(was_training)
