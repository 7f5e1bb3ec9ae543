"""python -m wsss.eval --cfg CONFIG.yaml --ckpt CHECKPOINT [key.sub=value ...]

Also under ``torchrun --nproc_per_node=N``: the images are sharded over the processes and the
confusion matrices summed (the result equals one process's); rank 0 writes the report."""
import argparse
import sys

from wsss.utils.cli import parse_config, run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config file (the run's config.yaml works)")
    parser.add_argument("--ckpt", required=True, help="checkpoint: written by wsss.train, or the official MoRe "
                        "(VOC/COCO) or AReAM/MCTformer-V2 release")
    parser.add_argument("--out", default=None, help="output folder (default: <run_dir>/eval)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.crf=true")
    args, cfg = parse_config(parser, argv)
    from wsss.eval.evaluate import evaluate
    from wsss.utils.distributed import init_from_env
    from wsss.utils.logging import setup_logging

    def command() -> int:
        env = init_from_env(cfg, "evaluation")
        setup_logging(cfg.run_dir, "eval", env.rank)
        result = evaluate(cfg, args.ckpt, args.out)
        if env.rank == 0:
            print(result["markdown"])
            print(f"written to {result['out_dir']}/results.md, results.csv and panels/")
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
