"""``batchnorm explain``: what every BN layer of a network computes on a real batch (:mod:`batchnorm.lab.explain`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from torch import Tensor

from batchnorm.cli.argtypes import positive_int, seed
from batchnorm.cli.options import (
    add_data_arguments,
    add_device_argument,
    add_input_shape_argument,
    add_model_arguments,
    data_source,
    requested_model,
)
from batchnorm.lab.explain import explain, explain_unit, format_table, format_unit, prepare
from batchnorm.lab.explain_html import check_output_file, write_explain_page
from batchnorm.lab.models import check_forward, is_factory_spec
from batchnorm.lab.training import TrainConfig

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.description = (
        "For every BN layer of a network, on a real batch of digits: the layer's input shape, the feature axis, "
        "the axes reduced, how many values feed each mean and variance, the shapes of gamma and beta, and the "
        "numbers. With --layer/--unit, one statistic computed step by step. The model's running statistics "
        "and mode are left unchanged."
    )
    add_model_arguments(parser, defaults)
    add_data_arguments(parser, defaults)
    add_input_shape_argument(parser)
    add_device_argument(
        parser, "; the model and the batch run there, the statistics are brought back to the CPU to print"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        metavar="CKPT",
        help="explain a trained model from `train` (written on any device: it is read onto the CPU, then moved "
        "to --device)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=60, help="examples in the batch (default 60)")
    parser.add_argument("--seed", type=seed, default=0, help="seed for the init and the batch")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--layer", default=None, help="a BN layer name (e.g. bn2) for the step-by-step view")
    parser.add_argument("--unit", type=int, default=None, help="the feature index within --layer")
    parser.add_argument(
        "--eval",
        action="store_true",
        help="run in eval mode: the layers normalize with their running statistics (the step view walks those)",
    )
    parser.add_argument(
        "--html",
        default=None,
        metavar="FILE",
        help="also write a static page drawing each BN layer's input, the reduced axes and the train vs eval "
        "statistics (inline SVG, no external assets; an existing file is overwritten)",
    )


def _config(args: argparse.Namespace) -> TrainConfig:
    """The model and data options as a :class:`TrainConfig` (not validated: the model builder checks what it uses)."""
    defaults = TrainConfig()
    data, data_dir = data_source(args.data, args.data_dir)
    return TrainConfig(
        groups=args.groups,
        virtual_batch_size=args.virtual_batch_size,
        rmax=args.rmax,
        dmax=args.dmax,
        renorm_warmup=args.renorm_warmup,
        model=args.model or defaults.model,
        act=args.act or defaults.act,
        norm=args.norm or defaults.norm,
        placement=args.placement or defaults.placement,
        init=args.init,
        data=data,
        data_dir=data_dir,
        input_norm=args.input_norm,
        seed=args.seed,
    )


def _own_model_options(args: argparse.Namespace) -> None:
    """``ValueError`` when --act/--norm/--placement are given with --model FILE.py:FACTORY (they do not apply)."""
    if args.model is None or not is_factory_spec(args.model):
        return
    given = [f"--{name}" for name in ("act", "norm", "placement") if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} do not apply to --model {args.model}: your factory builds the network")


def _reshaped(batch: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    """The batch ``(N, ...)`` with each example reshaped to ``--input-shape`` (unchanged without it)."""
    if shape is None:
        return batch
    values, per_example = math.prod(shape), batch[0].numel()
    if values != per_example:
        raise ValueError(
            f"--input-shape {','.join(map(str, shape))} holds {values} values but each example of the data holds "
            f"{per_example} (shape {','.join(map(str, batch.shape[1:]))})"
        )
    return batch.reshape(len(batch), *shape)


def _say_written(path: Path, quiet: bool) -> None:
    """One line naming the page (not with --json, whose output stays pure JSON)."""
    if not quiet:
        print(f"wrote {path}: each BN layer's input drawn, with its training and eval statistics side by side")


def run(args: argparse.Namespace) -> int:
    """Print the explain table (or JSON, or the step view of --layer/--unit); with --html also write the page."""
    html_path = check_output_file(args.html) if args.html is not None else None
    _own_model_options(args)
    model, batch, raw, pixel_stats = prepare(
        _config(args),
        checkpoint=args.checkpoint,
        requested_model=requested_model(args),
        batch_size=args.batch_size,
        download=args.download,
        device=args.device,
    )
    batch, raw = _reshaped(batch, args.input_shape), _reshaped(raw, args.input_shape)
    pixel_stats = (pixel_stats[0].reshape(batch.shape[1:]), pixel_stats[1].reshape(batch.shape[1:]))
    if args.model is not None and is_factory_spec(args.model):
        check_forward(model, batch, args.model)
    if (args.layer is None) != (args.unit is None):
        raise ValueError("--layer and --unit go together (e.g. --layer bn2 --unit 0)")
    if args.layer is not None:
        result = explain_unit(
            model, batch, args.layer, args.unit, pixel_stats, raw, mode="eval" if args.eval else "train"
        )
        print(json.dumps(result) if args.json else format_unit(result))
        if html_path is None:
            return 0
    try:
        records = explain(model, batch, mode="eval" if args.eval else "train")
    except RuntimeError as error:
        raise ValueError(f"the model cannot run on this data: {str(error).splitlines()[0]}") from None
    if html_path is not None:
        mode = "eval" if args.eval else "train"
        source = f"checkpoint {args.checkpoint}" if args.checkpoint else f"model {_config(args).model}"
        write_explain_page(
            html_path,
            records,
            title="batchnorm explain",
            context=f"{source}, a batch of shape {tuple(batch.shape)}, explained in {mode} mode.",
            highlight={args.layer: args.unit} if args.layer is not None else None,
        )
        if args.layer is not None:
            _say_written(html_path, args.json)
            return 0
    if args.json:
        json.dump(records, sys.stdout)
        sys.stdout.write("\n")
    elif not records:
        kinds = sorted({type(module).__name__ for name, module in model.named_modules() if name.startswith("bn")})
        what = f" (its normalization layers are {', '.join(kinds)})" if kinds else ""
        print(
            f"nothing to explain: this model has no batch-norm layer{what}, so no layer computes a mean and "
            "variance over the batch. Use --norm batch, renorm or ghost to see BN's statistics."
        )
    else:
        print(f"{len(records)} BN layer(s) on a batch of shape {tuple(batch.shape)}, run on {batch.device}:")
        print(format_table(records))
        print(
            "Each BN layer owns one mean, one variance, one gamma and one beta per feature of its own input; the "
            "statistic of a feature pools every value of that feature over the reduced axes (the batch and, for "
            "conv layers, every spatial position), so layer widths never need to match."
        )
        modules = dict(model.named_modules())
        for record in records:
            size = getattr(modules.get(record["name"]), "virtual_batch_size", None)
            batch_size = record["input_shape"][0]
            if size is not None and not args.eval and batch_size > size:
                chunks = -(-batch_size // size)
                print(
                    f"{record['name']} is Ghost BN: in training it computes these statistics per virtual batch of "
                    f"{size} examples ({chunks} of them in this batch of {batch_size}), so each statistic pools at "
                    f"most {record['values_per_statistic'] * size // batch_size} values; the table shows the whole "
                    "batch's."
                )
    if html_path is not None:
        _say_written(html_path, args.json)
    return 0
