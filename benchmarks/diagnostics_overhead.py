"""What diagnostics cost: training epochs with and without `diagnostics=true`, side by side in one run.

Two engines with the same recipe (`fmnist-resnet20`, full 60k-image epochs by default), one with the
diagnostics hook; each round times one epoch of each, in alternating order, including the end-of-epoch
hook work (the probe's forward pass over the probe images and the per-layer records). On a smaller
`--train-subset` the probe is a larger share of the epoch and the ratio goes up.

    python benchmarks/diagnostics_overhead.py [--rounds 4] [--train-subset N] [--every 25]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (RESULTS_DIR, atomic_write_json, atomic_write_text, command_line, machine_info,  # noqa: E402
                     markdown_table, median, paired_ratios, quantile)

import torch  # noqa: E402

from fixnorm.train import Trainer, load_recipe, make_config  # noqa: E402

TARGET = 1.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--every", type=int, default=25, help="diagnostics_every")
    parser.add_argument("--method", default="fixnorm")
    args = parser.parse_args()
    base = dict(load_recipe("fmnist-resnet20"), method=args.method, train_subset=args.train_subset,
                epochs=args.rounds + 1)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("plain", {}), ("diagnostics", {"diagnostics": True, "diagnostics_every": args.every})):
            trainers[name] = Trainer(make_config(base, extra), Path(tmp) / name)
            for hook in trainers[name].hooks:
                hook.on_train_start(trainers[name])
        samples: dict[str, list[float]] = {name: [] for name in trainers}
        for epoch in range(args.rounds + 1):  # epoch 0 warms up both
            order = list(trainers) if epoch % 2 == 0 else list(reversed(trainers))
            for name in order:
                trainer = trainers[name]
                start = time.perf_counter()
                record = trainer.train_epoch(epoch)
                for hook in trainer.hooks:
                    hook.on_epoch_end(trainer, record)
                seconds = time.perf_counter() - start
                if epoch > 0:
                    samples[name].append(seconds)
                print(f"epoch {epoch} {name}: {seconds:.2f} s", flush=True)
    ratios = paired_ratios(samples["diagnostics"], samples["plain"])
    ratio = median(ratios)
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"epoch_seconds_plain: {median(samples['plain']):.2f}")
    print(f"epoch_seconds_diagnostics: {median(samples['diagnostics']):.2f}")
    print(f"diagnostics_over_plain: {ratio:.3f} (IQR {quantile(ratios, 0.25):.3f}-{quantile(ratios, 0.75):.3f}) "
          f"{verdict} (target <= {TARGET})")
    result = {"meta": {**machine_info(torch.device("cpu")), "command": command_line(), "args": vars(args)},
              "samples": samples, "ratios": ratios, "ratio_median": ratio, "target": TARGET, "verdict": verdict}
    out = Path(RESULTS_DIR) / "diagnostics_overhead"
    atomic_write_json(out.with_suffix(".json"), result)
    table = markdown_table(["variant", "median epoch (s)"], [[k, f"{median(v):.2f}"] for k, v in samples.items()])
    atomic_write_text(out.with_suffix(".md"), f"# Diagnostics overhead\n\nCommand: `{command_line()}`\n\n{table}\n\n"
                      f"Ratio diagnostics / plain (median of paired rounds): **{ratio:.3f}** {verdict} "
                      f"(target <= {TARGET}).\n")


if __name__ == "__main__":
    main()
