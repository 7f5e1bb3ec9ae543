"""What every ``python -m wsss.*`` command does the same way: read the config it is given, and
turn a :class:`~wsss.utils.preflight.PreflightError` into one message and exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence, Tuple


def parse_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> Tuple:
    """``(args, cfg)``: the parsed arguments and the config of ``args.cfg`` with ``args.overrides``;
    a bad config is a usage error of the command (exit 2, the message names the key)."""
    from wsss.config import ConfigError, load_config

    args = parser.parse_args(argv)
    try:
        return args, load_config(args.cfg, args.overrides)
    except ConfigError as e:
        parser.error(str(e))


def run_command(fn: Callable[[], int]) -> int:
    """``fn()``'s exit status, or 2 with one clear message (no traceback) when a preflight check
    stops it before any work; a process group the command joined is always left."""
    import torch.distributed as dist

    from wsss.utils.preflight import PreflightError

    try:
        return fn()
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
