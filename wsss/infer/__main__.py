"""python -m wsss.infer --cfg CONFIG.yaml --ckpt CHECKPOINT --out DIR (--split SPLIT | --images FOLDER)
                     [--recursive] [--protocol NAME] [--row raw|crf|par] [--voc-server]
                     [--overlays | --no-overlays] [--limit N] [key.sub=value ...]

Writes one 8-bit palette PNG (VOC palette, values = class indices, 255 = uncertain) per image at
its original size, named like the image, plus classes.csv (the classes of every mask) and, for
--images or with --overlays, overlays/<name>.png. Files that exist are not written again, so an
interrupted run resumes where it stopped.

  segmentation of a split (MoRe: E2, + CRF with eval.crf=true; baseline: E3):
    python -m wsss.infer --cfg run/config.yaml --ckpt run/checkpoint.pt --out preds/val --split val
  VOC test for the evaluation server (results/VOC2012/Segmentation/comp6_test_cls/<id>.png):
    python -m wsss.infer ... --out preds/test --split test --voc-server --row crf
  pseudo labels of the train split for a second-stage network (MoRe: E1-CAM / E1-LAM rows
  raw, crf, par; AReAM: pseudo-labels rows par, raw):
    python -m wsss.infer ... --out pseudo --split train_aug --protocol E1-LAM --row par
  a folder of images (any size; --recursive for sub-folders):
    python -m wsss.infer ... --out preds/photos --images photos --recursive

Also under torchrun --nproc_per_node=N: the images still missing are sharded over the processes
and every process writes its own."""
import argparse
import sys
from datetime import timedelta

from wsss.utils.cli import parse_config, run_command

# The ranks meet in a barrier only after all their images; a rank may finish hours before the
# slowest one, and torchrun stops the others if one fails, so the wait may be long.
BARRIER_TIMEOUT = timedelta(hours=12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config file (the run's config.yaml works)")
    parser.add_argument("--ckpt", required=True, help="checkpoint: written by wsss.train, or an official release")
    parser.add_argument("--out", required=True, help="output folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", help="a split of data.root (ImageSets/Segmentation/<split>.txt); masks are "
                        "never read, so a test split works")
    source.add_argument("--images", help="a folder of images (JPEG, PNG, BMP, WebP, TIFF)")
    parser.add_argument("--recursive", action="store_true", help="--images: also the sub-folders")
    parser.add_argument("--protocol", help="what to write (default: the method's segmentation of unseen images: "
                        "MoRe E2, baseline E3); an unknown name lists the known ones")
    parser.add_argument("--row", help="raw | crf | par (default: crf with eval.crf=true, else the first row)")
    parser.add_argument("--voc-server", action="store_true", help="write to results/VOC2012/Segmentation/"
                        "comp6_test_cls/ under --out, the PASCAL evaluation server's layout")
    parser.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=None,
                        help="also write overlays/<name>.png (default: on for --images)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.crf=true device=cuda")
    args, cfg = parse_config(parser, argv)
    from wsss.eval.export import export_predictions
    from wsss.utils.distributed import init_from_env
    from wsss.utils.logging import setup_logging

    def command() -> int:
        # gloo even on GPUs: the only collectives are barriers and the summary's sums (CPU)
        env = init_from_env(cfg, "export", cpu_collectives=True, timeout=BARRIER_TIMEOUT)
        setup_logging(None, "infer", env.rank)
        summary = export_predictions(cfg, args.ckpt, args.out, split=args.split, images=args.images,
                                     recursive=args.recursive, protocol=args.protocol, row=args.row,
                                     voc_server=args.voc_server, overlays=args.overlays, limit=args.limit)
        if env.rank == 0:
            print(f"{summary['images']} images written, {summary['skipped']} skipped (already there), "
                  f"{summary['images_per_s']:.2f} images/s; masks in {summary['out']}")
        return 0

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
