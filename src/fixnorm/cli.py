"""`fixnorm ...` sub-commands (also `python -m fixnorm`). The library never prints; this module does."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .errors import FixNormError


def _bar(step: int, total: int, loss: float) -> None:
    """A bar on a terminal; in a log (CI, nohup) a plain line every tenth of the run."""
    if sys.stderr.isatty():
        width, done = 30, int(30 * step / total)
        end = "\n" if step == total else ""
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f}{end}")
    elif step == total or step % max(1, total // 10) == 0:
        sys.stderr.write(f"step {step}/{total} loss {loss:.3f}\n")
    sys.stderr.flush()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    torch.set_num_threads(args.threads) if args.threads else None
    result = run_demo(args.data_dir, model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      fc_norm=args.fc_norm, train_subset=args.train_subset, seed=args.seed,
                      progress=None if args.quiet else _bar)
    if not args.quiet:
        print(result.plan_table)
        print(f"train loss: {result.train_loss:.4f}")
        print(f"seconds: {result.seconds:.1f}")
        print(f"images per second: {result.images_per_second:.0f}")
        print(f"test loss: {result.test_loss:.4f}")
    print(f"test accuracy: {result.test_accuracy:.4f}")
    return 0


def cmd_roles(args: argparse.Namespace) -> int:
    from .models import create_model
    from .optim import FixNorm

    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    x = torch.randn(args.batch, args.in_channels, args.size, args.size)
    opt = FixNorm(model, x, lr=0.1, granularity=args.granularity, fc_norm=args.fc_norm)
    print(opt.roles.table() if args.why else opt.plan.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixnorm", description="Train without weight decay by fixing weight norms.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train FixNorm on Fashion-MNIST and print the test accuracy")
    demo.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST IDX files "
                      "(default: /usr/share/datasets/fashion-mnist, Debian package dataset-fashion-mnist)")
    demo.add_argument("--model", default="small_cnn")
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--batch-size", type=int, default=128)
    demo.add_argument("--lr", type=float, default=0.2)
    demo.add_argument("--fc-norm", type=float, default=None, help="classifier norm (default: its initial norm)")
    demo.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--quiet", action="store_true", help="print only the test accuracy")
    demo.set_defaults(func=cmd_demo)

    roles = sub.add_parser("roles", help="print FixNorm's plan (or, with --why, the role analysis) for a model")
    roles.add_argument("--model", default="resnet20")
    roles.add_argument("--num-classes", type=int, default=10)
    roles.add_argument("--in-channels", type=int, default=3)
    roles.add_argument("--size", type=int, default=32, help="example input height and width")
    roles.add_argument("--batch", type=int, default=2)
    roles.add_argument("--granularity", default="tensor", choices=["tensor", "filter"])
    roles.add_argument("--fc-norm", type=float, default=None)
    roles.add_argument("--why", action="store_true", help="show the measured role and reason per parameter")
    roles.set_defaults(func=cmd_roles)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FixNormError as exc:
        print(f"fixnorm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
