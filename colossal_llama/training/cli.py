"""``train.py`` / ``colossal-llama-train``: flags -> :class:`TrainConfig` -> :func:`train`.

Launch with ``torchrun --nproc_per_node N train.py ...`` or ``colossalai run --nproc_per_node N --hostfile H
train.py ...``; a bare ``python train.py`` trains as a single rank.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import List, Optional

from colossal_llama.utils.errors import cli_entry


@cli_entry
def run_cli(argv: Optional[List[str]] = None) -> int:
    from colossal_llama.training.config import parse_config
    from colossal_llama.training.distributed import shutdown
    from colossal_llama.training.loop import train

    train(parse_config(argv))
    shutdown()  # only after success: a barrier with a crashed peer would hang (torchrun stops the others)
    return 0


def main(argv: Optional[List[str]] = None) -> None:
    """Run, then ``os._exit``: after a clean shutdown, colossalai/gloo threads can still abort at interpreter exit
    ("terminate called without an active exception"), turning a finished run into a failed one."""
    try:
        code = run_cli(argv) or 0
    except SystemExit as err:  # cli_entry's one-line user error (2), argparse (2)
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - print it, then exit non-zero so the launcher stops the other ranks
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
