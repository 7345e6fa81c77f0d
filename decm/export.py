"""Export a sharded (FSDP) checkpoint as one consolidated file.

    python -m decm.export RUN_DIR [--step N]

Reads `RUN_DIR/checkpoints/ckpt-<step>.dcp/` (the newest valid one, or step N), gathers every tensor
to its full shape on the CPU of this one process (no process group, no GPU) and writes
`RUN_DIR/checkpoints/ckpt-<step>.pt` atomically, with the optimizer state in torch's own layout: the
file DDP runs resume from and that `decm.evaluate`, the reports and `decm.models.build` read. (They
also read the sharded folder directly; the export is for sharing one file, and it is the only form
readers without torch.distributed.checkpoint can use.) Memory: the full model, EMA and AdamW moments
(≈ 16 bytes per parameter) in this process.
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    from decm import cli, sharded_checkpoint, train_state

    p = cli.parser("python -m decm.export", __doc__)
    p.add_argument("run_dir", help="a run directory (or its checkpoints/ folder) with sharded checkpoints")
    p.add_argument("--step", type=int, default=None, help="export this step (default: the newest valid one)")
    args = p.parse_args(argv)
    ckpt_dir = args.run_dir if os.path.basename(os.path.normpath(args.run_dir)) == "checkpoints" else os.path.join(
        args.run_dir, "checkpoints")
    path = None
    if args.step is not None:
        path = sharded_checkpoint.valid_at(ckpt_dir, args.step)  # the step's folder or its valid .prev
        if path is None:
            print(f"decm.export: error: no valid sharded checkpoint "
                  f"{sharded_checkpoint.path_for(ckpt_dir, args.step)}", file=sys.stderr)
            return 2
    try:
        out = train_state.export(ckpt_dir, path)
    except (FileNotFoundError, ValueError) as e:
        print(f"decm.export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
