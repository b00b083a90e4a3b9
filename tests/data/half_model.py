"""Store a stage model file's weights in float16 (half the size) for use as a test asset.

    python tests/data/half_model.py models/base64/model.pt tests/data/demo_base64.pt --note TEXT

The stage config and step are kept; ``extra`` is replaced by ``{"note": TEXT}`` (the MLflow run
id and metrics of the machine that trained it mean nothing elsewhere). Loading casts the weights
back to the UNet's float32.
"""

from __future__ import annotations

import argparse

from imagen.checkpoint import read_stage, save_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a model.pt")
    ap.add_argument("dest", help="the float16 copy")
    ap.add_argument("--note", default="", help="where the weights come from")
    args = ap.parse_args()
    stage, state, meta = read_stage(args.source)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_stage(args.dest, stage, half, step=meta["step"], extra={"note": args.note})
    print(f"{args.dest}: {sum(v.numel() for v in half.values())} weights, step {meta['step']}")


if __name__ == "__main__":
    main()
