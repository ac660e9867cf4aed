"""``python -m cluster.ray_start ARGS``: ``ray start ARGS`` with loopback addresses kept as given.

The local cluster starts each of its nodes with this instead of the ``ray`` script, so a node told
``--node-ip-address 127.0.0.1`` keeps that address and listens on loopback only (cluster.loopback).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from prunetune.cluster.loopback import keep_loopback_addresses

    keep_loopback_addresses()
    from ray.scripts.scripts import cli

    return cli.main(args=["start", *(sys.argv[1:] if argv is None else argv)], prog_name="ray")


if __name__ == "__main__":
    sys.exit(main())
