"""Deep networks from short spec strings, with a BN layer sized to each hidden layer.

Specs (widths, input first; the last number is the number of classes):

* ``mlp:784-100-100-100-10``: fully connected. Each hidden layer is
  ``Linear -> BN -> nonlinearity`` (``placement="before"``, the paper's
  ``z = g(BN(Wu))``, where the Linear has no bias because BN's beta replaces
  it) or ``Linear -> nonlinearity -> BN`` (``placement="after"``). The BN
  layer of a hidden layer of width ``D`` is ``BatchNorm1d(D)``: ``D`` means
  and variances, each over the ``N`` examples of the batch.
* ``cnn:1-16-32-10``: input channels, then one block per number
  ``Conv3x3(pad 1) -> BN -> nonlinearity -> MaxPool2`` (BN after the
  nonlinearity with ``placement="after"``), then global average pooling and a
  Linear classifier. The BN layer of a block with ``C`` channels is
  ``BatchNorm2d(C)``: ``C`` statistics, each over ``N*H*W`` values. On
  28x28 inputs the blocks see 28x28, 14x14, 7x7, ... maps.

Normalization (``norm``, ``--norm``), the layer placed where BN goes:

* ``batch``: BN, ``BatchNorm1d(D)`` / ``BatchNorm2d(C)`` (this package's, or
  torch's with ``norm_implementation="torch"``).
* ``renorm``: :class:`batchnorm.BatchRenorm` (Ioffe 2017) with ``rmax``
  (default 3), ``dmax`` (default 5) and ``renorm_warmup`` (default 1000 steps
  of plain BN relaxing linearly to those limits).
* ``ghost``: :class:`batchnorm.GhostBatchNorm` with ``virtual_batch_size``
  (default 20: the default batch of 60 is three virtual batches; a remainder
  is a virtual batch of its own).
* ``frozen``: :class:`batchnorm.FrozenBatchNorm` with ``trainable_affine=True``:
  the fixed map of BN's eval mode with the initial statistics (mean 0,
  variance 1) and a trained gamma and beta. No batch is ever measured: from
  scratch this is the network without normalization plus a per-feature scale
  and shift, the baseline of what BN's statistics contribute (and the layer
  fine-tuning uses after :func:`batchnorm.freeze`).
* ``group``: ``torch.nn.GroupNorm(G, C)`` with ``G`` the largest divisor of
  ``C`` that is at most ``groups`` (default 32, the GroupNorm paper's) *and*
  leaves every group at least 16 values per example (channels x positions;
  :func:`group_count`). Statistics per example and group; one gamma and beta
  per channel. On the MLP's ``(N, D)`` it groups the ``D`` features: width
  100 gets 5 groups of 20, width 32 gets 2 groups of 16 (a group of one
  feature would normalize every value to 0). On a CNN's 28x28 maps every
  channel holds 784 values, so ``C <= 32`` channels get ``C`` groups.
* ``layer``: per-example statistics over all of a layer's features: the MLP
  uses ``torch.nn.LayerNorm(D)`` on ``(N, D)``; the CNN uses
  ``torch.nn.GroupNorm(1, C)``, which normalizes each example over ``(C, H,
  W)`` with per-channel gamma and beta (``nn.LayerNorm`` would need the map
  size and learn one gamma per position).
* ``none``: no normalization layer; Linear and Conv layers keep their bias.

Your own network (``--model FILE.py:FACTORY``): a Python file defining a
function that takes no arguments and returns a ``torch.nn.Module``.
:func:`load_factory` imports the file from its path (``importlib``, not
``sys.path``) and returns the function; :func:`build_factory_model` calls it
and checks the result; :func:`check_forward` runs one forward pass on a real
batch and (for training) checks the output is ``(N, classes)`` logits. The
factory builds the whole network, so ``--act``, ``--norm``, ``--placement``
and ``--init`` do not apply to it (torch's default init, seeded by
``--seed``). Its :class:`ModelSpec` has ``kind="file"``; its number of
outputs is unknown until a forward pass, so ``widths`` is ``(0, 0)`` (unknown)
and the class check is :func:`check_forward`'s.

With ``placement="before"`` every normalization layer (any of the above) is
followed by its own per-feature beta, so the Linear/Conv before it has no
bias, whatever the kind.

Layers are named ``fc1, bn1, act1, fc2, ...`` (``conv1, bn1, act1, pool1,
...`` for the CNN) and ``out`` for the classifier, so ``--layer bn2`` names a
BN layer in ``explain``. The normalization layer keeps the name ``bnK`` for
every ``norm`` (a GroupNorm is ``bn1`` too), so state dicts and ``--layer``
line up across kinds.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.nn.frozen import FrozenBatchNorm
from batchnorm.nn.ghost import GhostBatchNorm
from batchnorm.nn.renorm import BatchRenorm

__all__ = [
    "ACTIVATIONS",
    "BATCH_STATISTICS_NORMS",
    "NORMS",
    "PLACEMENTS",
    "ModelSpec",
    "NormOptions",
    "build_factory_model",
    "build_model",
    "check_forward",
    "is_factory_spec",
    "load_factory",
    "group_count",
    "parse_init",
    "parse_spec",
]

ACTIVATIONS = ("sigmoid", "tanh", "relu")
NORMS = ("batch", "renorm", "ghost", "frozen", "group", "layer", "none")
# Norms whose training forward computes statistics over the batch (they need 2 values per statistic).
BATCH_STATISTICS_NORMS = ("batch", "renorm", "ghost")
NORM_HELP = (
    "normalization layer in every hidden layer: batch (BN), renorm (Batch Renorm, --rmax/--dmax), ghost "
    "(Ghost BN, --virtual-batch-size), frozen (FrozenBatchNorm: fixed statistics, trained gamma/beta), group "
    "(torch GroupNorm, see --groups), layer (LayerNorm on (N, D); GroupNorm(1, C) on conv maps), none"
)
DEFAULT_GROUPS = 32
DEFAULT_VIRTUAL_BATCH_SIZE = 20
DEFAULT_RMAX = 3.0
DEFAULT_DMAX = 5.0
DEFAULT_RENORM_WARMUP = 1000
MIN_GROUP_VALUES = 16
PLACEMENTS = ("before", "after")
NORM_IMPLEMENTATIONS = ("batchnorm", "torch")

SPEC_HELP = (
    "model spec: 'mlp:784-100-100-100-10' (fully connected widths, input first, classes last) or "
    "'cnn:1-16-32-10' (input channels, one 3x3 conv block per number with BN and 2x2 max pooling, then "
    "global average pooling and a linear classifier)"
)
INIT_HELP = (
    "weight init: 'normal:STD' (the paper's small Gaussian, e.g. normal:0.01), 'kaiming', 'xavier', or "
    "'default' (torch's)"
)


@dataclass(frozen=True)
class NormOptions:
    """Parameters of the normalization variants (each used only by its ``norm``).

    Attributes:
        groups: ``group``: at most this many groups (the largest divisor of the width, see :func:`group_count`).
        virtual_batch_size: ``ghost``: samples per virtual batch.
        rmax, dmax, renorm_warmup: ``renorm``: the limits of ``r`` and ``d`` and the warm-up steps.
    """

    groups: int = DEFAULT_GROUPS
    virtual_batch_size: int = DEFAULT_VIRTUAL_BATCH_SIZE
    rmax: float = DEFAULT_RMAX
    dmax: float = DEFAULT_DMAX
    renorm_warmup: int = DEFAULT_RENORM_WARMUP


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is ``"mlp"``, ``"cnn"`` or ``"file"``; ``widths`` runs from input to classes.

    ``source`` is the ``PATH.py:FACTORY`` text of a ``"file"`` spec (its
    widths are ``(0, 0)``: unknown until a forward pass).
    """

    kind: str
    widths: tuple[int, ...]
    source: str = ""

    def __str__(self) -> str:
        if self.kind == "file":
            return self.source
        return f"{self.kind}:" + "-".join(str(width) for width in self.widths)


def is_factory_spec(text: str) -> bool:
    """Whether ``text`` names a factory in a Python file (``PATH.py:FUNCTION``) rather than a built-in spec."""
    path, separator, _ = text.rpartition(":")
    return bool(separator) and path.strip().endswith(".py")


def _split_factory(text: str) -> tuple[Path, str]:
    path, _, name = text.rpartition(":")
    name = name.strip()
    if not name.isidentifier():
        raise ValueError(f"--model {text}: {name!r} is not a function name (expected FILE.py:FUNCTION)")
    return Path(path.strip()), name


def load_factory(text: str) -> Callable[[], object]:
    """The function ``FUNCTION`` of the Python file ``PATH.py`` named by ``text`` (``PATH.py:FUNCTION``).

    The file is imported from its path with ``importlib`` (it runs as a
    module of its own; nothing is added to ``sys.path``).

    Raises:
        ValueError: one line: a missing file, a file that fails to import,
            no such function, or a name that is not callable.
    """
    path, name = _split_factory(text)
    if not path.is_file():
        raise ValueError(f"--model {text}: no such file {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(f"batchnorm_user_model_{digest}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--model {text}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code may raise anything while it is imported
        raise ValueError(f"--model {text}: importing {path} failed: {_one_line(error)}") from None
    factory = getattr(module, name, None)
    if factory is None:
        functions = sorted(key for key, value in vars(module).items() if callable(value) and not key.startswith("_"))
        known = f" (it defines: {', '.join(functions)})" if functions else ""
        raise ValueError(f"--model {text}: {path} defines no function {name!r}{known}")
    if not callable(factory):
        raise ValueError(f"--model {text}: {name} in {path} is a {type(factory).__name__}, not a function")
    return factory  # type: ignore[no-any-return]


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def build_factory_model(text: str) -> nn.Module:
    """Call the factory ``PATH.py:FUNCTION`` with no arguments; ``ValueError`` unless it returns an ``nn.Module``."""
    factory = load_factory(text)
    name = _split_factory(text)[1]
    try:
        model = factory()
    except Exception as error:  # the user's factory may raise anything
        raise ValueError(f"--model {text}: {name}() raised {_one_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"--model {text}: {name}() returned a value of type {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def check_forward(model: nn.Module, batch: torch.Tensor, text: str, num_classes: int | None = None) -> None:
    """One forward pass of ``model`` on ``batch`` (eval mode, no gradients; buffers and mode restored).

    With ``num_classes``, the output must be ``(N, num_classes)`` logits.

    Raises:
        ValueError: one line naming the batch shape and what went wrong.
    """
    was_training = model.training
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    model.eval()
    try:
        with torch.no_grad():
            output = model(batch)
    except Exception as error:  # a shape mismatch inside the user's network, most often
        raise ValueError(
            f"--model {text}: a forward pass on a batch of shape {tuple(batch.shape)} failed: {_one_line(error)}"
        ) from None
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
    if num_classes is None:
        return
    expected = (int(batch.shape[0]), num_classes)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != expected:
        raise ValueError(
            f"--model {text}: on a batch of shape {tuple(batch.shape)} the network returns {shape}; training needs "
            f"(N, classes) logits, here {expected} for the {num_classes} classes of the data"
        )


def parse_spec(text: str) -> ModelSpec:
    """Parse ``'mlp:784-100-10'``, ``'cnn:1-16-32-10'`` or a factory ``'PATH.py:FUNCTION'`` (not loaded here).

    Raises:
        ValueError: unknown kind, non-integer or non-positive widths, too few widths.
    """
    if is_factory_spec(text):
        _split_factory(text)
        return ModelSpec("file", (0, 0), text)
    kind, separator, rest = text.partition(":")
    kind = kind.strip().lower()
    if not separator or kind not in ("mlp", "cnn"):
        raise ValueError(f"unknown model spec {text!r}: expected 'mlp:784-100-10' or 'cnn:1-16-32-10'")
    parts = rest.split("-")
    widths: list[int] = []
    for part in parts:
        try:
            width = int(part)
        except ValueError:
            raise ValueError(f"model spec {text!r}: width {part!r} is not an integer") from None
        if width < 1:
            raise ValueError(f"model spec {text!r}: widths must be positive, got {width}")
        widths.append(width)
    minimum = 2 if kind == "mlp" else 3
    if len(widths) < minimum:
        raise ValueError(f"model spec {text!r}: expected at least {minimum} widths (input ... classes)")
    return ModelSpec(kind, tuple(widths))


MAX_INIT_STD = 100.0  # normal:STD above this only overflows (weights of 1e300 make every activation inf)


def parse_init(text: str) -> tuple[str, float]:
    """Parse an init name: ``('normal', std)``, ``('kaiming', 0)``, ``('xavier', 0)`` or ``('default', 0)``."""
    name, _, argument = text.partition(":")
    name = name.strip().lower()
    if name == "normal":
        try:
            std = float(argument)
        except ValueError:
            raise ValueError(f"init {text!r}: expected 'normal:STD' with a number, e.g. normal:0.01") from None
        if not (0 < std <= MAX_INIT_STD):
            raise ValueError(
                f"init {text!r}: the standard deviation must be positive and at most {MAX_INIT_STD:g}, got {argument}"
            )
        return name, std
    if name in ("kaiming", "xavier", "default") and not argument:
        return name, 0.0
    raise ValueError(f"unknown init {text!r}: expected normal:STD, kaiming, xavier or default")


def _activation(name: str) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")


def group_count(channels: int, groups: int = DEFAULT_GROUPS, positions: int = 1) -> int:
    """GroupNorm groups for ``channels`` features of ``positions`` values each (1 for ``(N, D)``, ``H*W`` for maps).

    The largest divisor ``G`` of ``channels`` with ``G <= groups`` and at
    least ``MIN_GROUP_VALUES`` (16) values per group and example
    (``channels / G * positions``); 1 when even one group has fewer.
    """
    if groups < 1:
        raise ValueError(f"--groups must be a positive integer, got {groups}")
    fitting = [
        g
        for g in range(1, min(groups, channels) + 1)
        if channels % g == 0 and (channels // g) * positions >= MIN_GROUP_VALUES
    ]
    return max(fitting, default=1)


def _norm_layer(
    norm: str, width: int, dims: int, implementation: str, options: NormOptions, positions: int = 1
) -> nn.Module:
    """The normalization layer of a hidden layer of ``width`` features (``dims`` 1: ``(N, D)``, 2: ``(N, C, H, W)``).

    ``positions``: values per feature and example (``H*W`` of the layer's maps).
    """
    if norm == "group":
        return nn.GroupNorm(group_count(width, options.groups, positions), width)
    if norm == "layer":
        return nn.LayerNorm(width) if dims == 1 else nn.GroupNorm(1, width)
    if norm == "renorm":
        return BatchRenorm(width, rmax=options.rmax, dmax=options.dmax, warmup_steps=options.renorm_warmup)
    if norm == "ghost":
        return GhostBatchNorm(width, virtual_batch_size=options.virtual_batch_size)
    if norm == "frozen":
        return FrozenBatchNorm(width, trainable_affine=True)
    if implementation == "torch":
        return nn.BatchNorm1d(width) if dims == 1 else nn.BatchNorm2d(width)
    return BatchNorm1d(width) if dims == 1 else BatchNorm2d(width)


def _init_weights(model: nn.Module, init: str, activation: str, seed: int | None) -> None:
    name, std = parse_init(init)
    if name == "default":
        return
    # A generator of its own: networks with and without BN (whose Linear layers
    # differ only by a bias) get identical weights from the same seed.
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if name == "normal":
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            elif name == "kaiming":
                nn.init.kaiming_normal_(
                    module.weight, nonlinearity="relu" if activation == "relu" else "linear", generator=generator
                )
            else:
                gain = nn.init.calculate_gain(
                    "sigmoid" if activation == "sigmoid" else "tanh" if activation == "tanh" else "relu"
                )
                nn.init.xavier_normal_(module.weight, gain=gain, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(
    spec: str | ModelSpec,
    activation: str = "sigmoid",
    norm: str = "batch",
    placement: str = "before",
    init: str = "default",
    norm_implementation: str = "batchnorm",
    image_size: int = 28,
    seed: int | None = None,
    norm_options: NormOptions | None = None,
) -> nn.Module:
    """Build the network a spec describes (a factory spec: the module its function returns).

    Args:
        spec: a spec string or :class:`ModelSpec`.
        activation: ``sigmoid``, ``tanh`` or ``relu``.
        norm: one of :data:`NORMS` (see the module docstring): the layer
            ``bnK`` of every hidden layer, or ``none``.
        placement: ``before`` the nonlinearity (the paper's) or ``after`` it.
        init: see :func:`parse_init`.
        norm_implementation: ``batchnorm`` (this package's layers) or ``torch``.
        image_size: height and width of the input images (CNN only; checks
            that every pooling step has at least a 1x1 map).
        seed: seeds the generator of ``normal``/``kaiming``/``xavier`` init,
            so two networks that differ only in BN get the same weights.
        norm_options: parameters of the normalization variants (default
            :class:`NormOptions`).

    Returns:
        an ``nn.Sequential`` with named layers; an MLP flattens its input
        first, so both kinds take images ``(N, 1, H, W)``.

    Shape:
        - input: ``(N, C_in, H, W)`` (MLP: any shape with ``widths[0]``
          values per example); output: ``(N, classes)`` logits.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "file":  # the user's own network, built whole by their factory
        return build_factory_model(parsed.source)
    for option, value, allowed in (
        ("activation", activation, ACTIVATIONS),
        ("norm", norm, NORMS),
        ("placement", placement, PLACEMENTS),
        ("norm implementation", norm_implementation, NORM_IMPLEMENTATIONS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {option} {value!r}: expected one of {', '.join(allowed)}")
    parse_init(init)
    options = norm_options if norm_options is not None else NormOptions()
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    use_bn = norm != "none"
    bn_first = use_bn and placement == "before"

    def norm_layer(width: int, dims: int, positions: int = 1) -> nn.Module:
        return _norm_layer(norm, width, dims, norm_implementation, options, positions)

    if parsed.kind == "mlp":
        layers["flatten"] = nn.Flatten()
        hidden = parsed.widths[1:-1]
        previous = parsed.widths[0]
        for index, width in enumerate(hidden, start=1):
            layers[f"fc{index}"] = nn.Linear(previous, width, bias=not bn_first)
            if bn_first:
                layers[f"bn{index}"] = norm_layer(width, 1)
            layers[f"act{index}"] = _activation(activation)
            if use_bn and not bn_first:
                layers[f"bn{index}"] = norm_layer(width, 1)
            previous = width
        layers["out"] = nn.Linear(previous, parsed.widths[-1])
    else:
        channels = parsed.widths[1:-1]
        previous = parsed.widths[0]
        size = image_size
        for index, width in enumerate(channels, start=1):
            positions = size * size  # the block's conv and norm see size x size maps, pooled after
            size //= 2
            if size < 1:
                raise ValueError(
                    f"model spec {parsed}: {len(channels)} pooling blocks are too many for "
                    f"{image_size}x{image_size} images (block {index} would see a 0x0 map)"
                )
            layers[f"conv{index}"] = nn.Conv2d(previous, width, 3, padding=1, bias=not bn_first)
            if bn_first:
                layers[f"bn{index}"] = norm_layer(width, 2, positions)
            layers[f"act{index}"] = _activation(activation)
            if use_bn and not bn_first:
                layers[f"bn{index}"] = norm_layer(width, 2, positions)
            layers[f"pool{index}"] = nn.MaxPool2d(2)
            previous = width
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["out"] = nn.Linear(previous, parsed.widths[-1])
    model = nn.Sequential(layers)
    _init_weights(model, init, activation, seed)
    return model


def input_features(spec: str | ModelSpec) -> int:
    """Values per example (MLP) or channels (CNN) the first layer expects."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    return parsed.widths[0]
