"""python -m wsss.train --cfg CONFIG.yaml [key.sub=value ...]  (also under torchrun)"""
import argparse
import sys

from wsss.utils.cli import parse_config, run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.train", description=__doc__)
    parser.add_argument("--cfg", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_iters=100")
    args, cfg = parse_config(parser, argv)
    from wsss.train.loop import train

    def command() -> int:
        train(cfg)
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
