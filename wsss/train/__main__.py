"""python -m wsss.train --cfg CONFIG.yaml [key.sub=value ...]  (also under torchrun)"""
import argparse
import sys

from wsss.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.train", description=__doc__)
    parser.add_argument("--cfg", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.cfg, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    from wsss.train.loop import train
    from wsss.utils.preflight import PreflightError

    try:
        train(cfg)
    except PreflightError as e:  # one clear message, no traceback: nothing has run yet
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
