"""Proxy scoring: how long a searcher's cheap trials fine-tune before they are scored.

A searcher may score its proposals cheaply and keep the full fine-tune for the policy it settles
on (ARPruning, METHODS.md: neighbours are scored after a short fine-tune or BatchNorm
recalibration). The proxy is written ``bn`` (BatchNorm recalibration, then 0 fine-tuning epochs)
or ``epochs:N`` (N fine-tuning epochs). A proposal carries it to its trial as
``info["finetune_epochs"]``; ``search.adapter`` passes that into the trial config.
"""

from __future__ import annotations

import re

from prunetune.pruning.errors import UserError

PROXY_BN = "bn"
_EPOCHS = re.compile(r"epochs:([0-9]+)")


def proxy_epochs(proxy: object, what: str = "proxy") -> int:
    """Fine-tuning epochs of a proxy trial: ``"bn"`` -> 0, ``"epochs:N"`` -> N (N >= 1); else a UserError."""
    text = str(proxy).strip()
    if text == PROXY_BN:
        return 0
    match = _EPOCHS.fullmatch(text)
    if match is None or int(match.group(1)) < 1:
        raise UserError(f"{what} {proxy!r} is not a proxy; write 'bn' (BatchNorm recalibration only) or "
                        f"'epochs:N' with N >= 1 fine-tuning epochs, e.g. epochs:1")
    return int(match.group(1))
