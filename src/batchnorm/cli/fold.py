"""``batchnorm fold CKPT``: fold BN into the layers before it, save a self-contained program (:func:`batchnorm.fold`).

The saved file is a ``torch.export`` program (``.pt2``): raw images
``(N, 1, H, W)`` in, logits out, with the checkpoint's input normalization
inside, and only PyTorch operators (BN layers left unfolded are torch's). It
loads without this package: ``torch.export.load(FILE).module()(images)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.cli.argtypes import check_output_file, positive_float
from batchnorm.deploy import fold
from batchnorm.lab.data import InputNormalizer, load_dataset
from batchnorm.lab.training import TrainConfig, model_from_checkpoint
from batchnorm.nn.batchnorm import convert

__all__ = ["check_output_path", "configure_parser", "load_data_of", "run"]

DEFAULT_TOLERANCE = 1e-5


def check_output_path(path: Path, force: bool) -> None:
    """Refuse, before any work, an output that exists (without ``--force``), a missing or unwritable folder."""
    check_output_file(path, "--out", force=force)


def load_data_of(config: TrainConfig, data_dir: str | None) -> Any:
    """The checkpoint's dataset (``--data-dir`` overrides the folder recorded for full MNIST)."""
    return load_dataset(config.data, data_dir if data_dir is not None else config.data_dir, seed=config.seed)


class _Program(nn.Module):
    """Raw images -> logits: the checkpoint's fixed input normalization, then the (folded) network."""

    shift: Tensor
    scale: Tensor

    def __init__(self, normalizer: InputNormalizer, network: nn.Module) -> None:
        super().__init__()
        self.register_buffer("shift", normalizer.shift.clone())
        self.register_buffer("scale", normalizer.scale.clone())
        self.network = network

    def forward(self, images: Tensor) -> Tensor:
        output: Tensor = self.network((images - self.shift) / self.scale)
        return output


def _export(program: nn.Module, example: Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(program, (example,), dynamic_shapes=({0: batch},))
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".pt2", dir=path.parent)
    os.close(handle)
    try:
        torch.export.save(exported, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


def _differences(got: Tensor, reference: Tensor) -> tuple[float, float]:
    """Largest absolute difference, and the same relative to the largest absolute reference value."""
    difference = float((got.double() - reference.double()).abs().max())
    return difference, difference / max(float(reference.abs().max()), 1e-30)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fold every BN layer that directly follows a Linear or Conv layer into that layer (W' = W * gamma / "
        "sqrt(var + eps) per output feature, b' = (b - mean) * gamma / sqrt(var + eps) + beta), check on the "
        "test split that the folded network's eval outputs equal the original's, and save it as a torch.export "
        "program (.pt2) that maps raw images (N, 1, H, W) to logits, with the checkpoint's input normalization "
        "inside. It loads without this package: torch.export.load(FILE).module()(images). BN layers after an "
        "activation (--placement after) cannot be folded; they are kept, as torch's BN layers, and listed. "
        "Exit code 1 when the outputs differ by more than --tolerance (nothing is written)."
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint written by `batchnorm train`")
    parser.add_argument(
        "--out", default=None, metavar="FILE", help="where to write the program (default: folded.pt2 next to CKPT)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted difference of the logits, relative to the largest logit (default %(default)s)",
    )
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (checkpoints of --data mnist)")


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out is not None else checkpoint.parent / "folded.pt2"
    check_output_path(out, args.force)
    model, config, normalizer, _ = model_from_checkpoint(checkpoint)
    data = load_data_of(config, args.data_dir)
    images, labels = data.test_images, data.test_labels
    with torch.no_grad():
        before = model(normalizer(images))
        folded, report = fold(model, report=True)
        after = folded(normalizer(images))
    absolute, relative = _differences(after, before)
    print(report)
    print(
        f"test split ({len(images)} images): largest logit difference {absolute:.3g} "
        f"({relative:.3g} of the largest logit)"
    )
    print(f"test accuracy: {_accuracy(before, labels):.4f} before folding, {_accuracy(after, labels):.4f} after")
    if not relative <= args.tolerance:
        sys.stderr.write(
            f"batchnorm: the folded outputs differ by {relative:.3g} > --tolerance {args.tolerance:g}; nothing saved\n"
        )
        return 1
    program = _Program(normalizer, convert(folded, to="torch")).eval()
    _export(program, images[:2], out)
    loaded = torch.export.load(out).module()
    with torch.no_grad():
        reloaded = loaded(images)
    _, relative_loaded = _differences(reloaded, before)
    print(
        f"wrote {out}: a torch.export program, raw images {tuple(images.shape[1:])} per example -> logits "
        f"(input normalization '{normalizer.kind}' inside); reloaded, it differs from the original by "
        f"{relative_loaded:.3g} of the largest logit. Load it with torch.export.load('{out}').module()."
    )
    return 0
