"""Group-relative advantages (GRPO): A_i = (R_i - mean_g R) / (std_g R + eps) within each prompt group.

The VESPO paper writes A = R - mean (§3.4, "following GRPO"); the released scripts use verl's
default ``norm_adv_by_std_in_grpo=True``, i.e. the std-normalised form. Both are offered.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """[B] advantages from [B] rewards laid out as consecutive groups of ``group_size``.

    A group whose rewards are all equal gets advantage 0 for every member (no learning signal).
    The standard deviation is the unbiased one, as in verl and TRL.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.double().reshape(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if normalize_std and group_size > 1:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)
