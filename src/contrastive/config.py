"""Typed, validated configuration read from ``params.yaml``.

Every stage reads the same file through :func:`load_params`. Validation happens before any work,
and a bad value becomes one :class:`ConfigError` line that names the key and what is allowed, so
the CLI can print it and exit with status 2.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError


def _not_a_bool(value: Any) -> Any:
    """YAML's ``true``/``false`` is no number (pydantic would read it as 1.0/0.0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a number, not true/false")
    return value


# Numbers are strict where YAML could slip in something else: an int takes no bool (``epochs:
# true`` is not 1), no float and no string; a float takes ints (``lr: 1``) and strings such as
# ``1e-4`` (which YAML 1.1 reads as a string), but no bool; a bool takes only true/false.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Probability = Annotated[Float, Field(ge=0, le=1)]


def _count_or_auto(value: Any) -> Any:
    """A neighbour count: a whole number >= 1 (no bool, float or numeric string), or ``auto``."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise PydanticCustomError(
        "count_or_auto", "must be a whole number >= 1 or 'auto' (min(200, smallest train class))"
    )


CountOrAuto = Annotated[int | Literal["auto"], BeforeValidator(_count_or_auto)]

ENCODERS = ("small_cnn", "resnet18_cifar", "resnet18", "resnet34", "resnet50", "vit_tiny")
SOURCES = ("digits", "cifar10", "stl10", "npz", "imagefolder")


class ConfigError(ValueError):
    """Bad params or input: one line naming the key or file and what is allowed."""


class StageFailed(RuntimeError):
    """A stage ran but its result failed a check (diverged loss, ONNX parity): one line, exit 1."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the images come from and how they are split (stage ``prepare``)."""

    source: Literal["digits", "cifar10", "stl10", "npz", "imagefolder", "pairs"] = "digits"
    path: str | None = None
    """``npz``/``imagefolder``: the images; ``pairs``: a caption file (``.csv``, ``.tsv``,
    ``.jsonl``: an image path and a caption per row), or an ``.npz`` whose images get captions
    from their class names by CLIP's prompt templates (unset: the digits, captioned so)."""
    test_path: str | None = None
    download: StrictBool = False
    image_size: Annotated[Int, Field(ge=8, le=512)] = 16
    val_fraction: Annotated[Float, Field(gt=0, lt=0.5)] = 0.1
    test_fraction: Annotated[Float, Field(gt=0, lt=0.5)] = 0.2
    vocab_size: Annotated[Int, Field(ge=260, le=262_144)] = 1000
    """``pairs``: the most tokens of the byte-level BPE vocabulary that ``prepare`` learns from
    the training captions (the 256 bytes, 4 special tokens, and merges up to this size)."""

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source in ("npz", "imagefolder") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.test_path and self.source not in ("npz", "pairs"):
            raise ValueError("data.test_path is only used with data.source 'npz' (or 'pairs' "
                             "with an .npz)")
        return self


class TextConfig(_Section):
    """The text tower of ``train.method: clip`` (``contrastive.text_models``); which one is
    ``model.text_encoder``."""

    context_length: Annotated[Int, Field(ge=2, le=1024)] = 32
    """Tokens per caption with ``[SOS]`` and ``[EOS]``; longer captions are cut before ``[EOS]``."""
    width: Annotated[Int, Field(ge=4, le=4096)] = 128
    """Features per token inside the encoder (the GRU's hidden size per direction)."""
    layers: Annotated[Int, Field(ge=1, le=48)] = 2
    heads: Annotated[Int, Field(ge=1)] = 4
    """``transformer`` only: attention heads; must divide ``width``."""


class ModelConfig(_Section):
    """The encoder and the projection head (stage ``pretrain``)."""

    encoder: Literal[
        "small_cnn", "resnet18_cifar", "resnet18", "resnet34", "resnet50", "vit_tiny"
    ] = "small_cnn"
    width: Annotated[Int, Field(ge=4, le=512)] = 32
    """``small_cnn`` only: channels of the first stage."""
    patch_size: Annotated[Int, Field(ge=1)] = 4
    """``vit_tiny`` only: side of the square patches; must divide ``data.image_size``."""
    projection_hidden_dim: Annotated[Int, Field(ge=8)] = 256
    projection_dim: Annotated[Int, Field(ge=2)] = 64
    """The embedding the loss compares; for ``clip``, the space images and captions share."""
    text_encoder: Literal["none", "transformer", "gru"] = "none"
    """``clip`` only: the text tower, CLIP's causal transformer or a bidirectional GRU."""
    text: TextConfig = TextConfig()

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        text = self.text
        if self.text_encoder == "transformer" and text.width % text.heads:
            raise ValueError(
                f"model.text.heads: {text.heads} does not divide model.text.width "
                f"({text.width}); use a divisor of {text.width}"
            )
        return self


class AugmentConfig(_Section):
    """Random views, drawn independently for every image (SimCLR's recipe by default)."""

    crop_scale: tuple[Probability, Probability] = (0.2, 1.0)
    crop_ratio: tuple[PositiveFloat, PositiveFloat] = (0.75, 4 / 3)
    hflip: Probability = 0.5
    jitter_prob: Probability = 0.8
    brightness: NonNegativeFloat = 0.4
    contrast: NonNegativeFloat = 0.4
    saturation: NonNegativeFloat = 0.4
    hue: Annotated[Float, Field(ge=0, le=0.5)] = 0.1
    grayscale_prob: Probability = 0.2
    blur_prob: Probability = 0.0
    blur_sigma: tuple[PositiveFloat, PositiveFloat] = (0.1, 2.0)

    @model_validator(mode="after")
    def _ordered_ranges(self) -> AugmentConfig:
        for key in ("crop_scale", "crop_ratio", "blur_sigma"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"augment.{key} must be [low, high] with low <= high")
        if self.crop_scale[0] <= 0:
            raise ValueError("augment.crop_scale low end must be > 0")
        return self


class MoCoConfig(_Section):
    """MoCo v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder and a queue of keys."""

    queue_size: Annotated[Int, Field(gt=0)] = 4096
    """Negative keys kept in the FIFO queue; at least ``train.batch_size``."""
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.99
    """EMA factor of the key encoder: ``key = m * key + (1 - m) * query``."""
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    """``cosine`` raises the momentum from ``momentum`` to 1 over training (BYOL's schedule)."""
    symmetric: StrictBool = False
    """Also use the second view as the query and the first as the key, and average both losses."""


class TripletConfig(_Section):
    """Triplet loss (Schroff et al. 2015) with negatives mined in the batch."""

    margin: PositiveFloat = 0.2
    mining: Literal["batch_hard", "semi_hard", "all"] = "batch_hard"
    supervised: StrictBool = False
    """``true``: positives are images of the same class; ``false``: two views of one image."""


class MarginPairConfig(_Section):
    """Pairwise contrastive loss (Hadsell et al. 2006): ``d`` for positives,
    ``alpha * max(0, margin - d)^2`` for negatives."""

    margin: PositiveFloat = 0.5
    alpha: PositiveFloat = 1.0
    """Weight of the negative pairs against the positive pairs."""
    negatives_per_positive: Annotated[Int, Field(ge=1)] = 1
    supervised: StrictBool = False
    """``true``: positives are images of the same class; ``false``: two views of one image."""


METHODS = ("simclr", "moco", "triplet", "margin_pair", "supcon", "clip")
TEMPERATURE_METHODS = ("simclr", "moco", "supcon", "clip")
"""The InfoNCE family: the methods that use ``train.temperature``."""


class TrainConfig(_Section):
    """Contrastive pretraining: method, optimiser, schedule and precision.

    ``method`` chooses the objective; a method's own params sit under its name
    (``train.moco.queue_size``) and are read only when that method is chosen.
    """

    method: Literal["simclr", "moco", "triplet", "margin_pair", "supcon", "clip"] = "simclr"
    epochs: Annotated[Int, Field(ge=1, le=10_000)] = 60
    batch_size: Annotated[Int, Field(ge=2)] = 256
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: PositiveFloat = 0.3
    """Learning rate for a batch of 256; the used rate is ``lr * batch_size / 256``."""
    weight_decay: NonNegativeFloat = 1e-4
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    warmup_epochs: Annotated[Int, Field(ge=0)] = 5
    temperature: PositiveFloat = 0.2
    """InfoNCE methods (simclr, moco, supcon): the softmax temperature, or its start value."""
    learn_temperature: StrictBool = False
    """Learn the temperature as a parameter in log space, clamped to [0.01, 1] as CLIP does."""
    class_balance: Literal["none", "sampler", "weights"] = "none"
    """Methods that use labels: a class-balanced batch order, or inverse-frequency loss weights."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast; ``auto``: on CUDA and on CPUs with native bf16 (runtime.resolve_precision)."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """NHWC memory format; ``auto``: on CUDA and on CPUs with native bf16, as ``precision``."""
    compile: StrictBool = False
    knn_every: Annotated[Int, Field(ge=0)] = 5
    """Run the kNN monitor on the validation split every N epochs (0: never)."""
    devices: Literal["auto"] | Annotated[Int, Field(ge=1)] = 1
    """Processes the ``contrastive pretrain`` command launches through ``torch.distributed.run``
    (one per device): ``auto`` is one per CUDA GPU, 1 on the CPU. Under ``torchrun`` its own
    ``--nproc-per-node`` decides instead. ``batch_size`` is the global batch over all of them."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Distributed backend with several processes: ``auto`` is NCCL on CUDA, gloo on the CPU."""
    sync_bn: StrictBool = False
    """With several processes, BatchNorm normalises with the statistics of the global batch."""
    streaming: Literal["auto", "on", "off"] = "auto"
    """Read the training images from the memory-mapped prepared file, step by step, instead of
    holding them on the device (the same batches either way); ``auto``: only when the split's
    uint8 bytes exceed half the free memory of the device (``contrastive.train.should_stream``)."""
    loader_workers: Annotated[Int, Field(ge=0, le=64)] = 2
    """DataLoader processes that read the images ahead when streaming (0: the training process)."""
    moco: MoCoConfig = MoCoConfig()
    triplet: TripletConfig = TripletConfig()
    margin_pair: MarginPairConfig = MarginPairConfig()

    @property
    def uses_labels(self) -> bool:
        """Whether the chosen method reads the labels of the prepared data."""
        return (
            self.method == "supcon"
            or (self.method == "triplet" and self.triplet.supervised)
            or (self.method == "margin_pair" and self.margin_pair.supervised)
        )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs must be smaller than train.epochs ({self.epochs}), got "
                f"{self.warmup_epochs}: the schedule would never reach its peak"
            )
        if self.learn_temperature and self.method not in TEMPERATURE_METHODS:
            raise ValueError(
                f"train.learn_temperature: method '{self.method}' has no temperature; "
                f"it is for {', '.join(TEMPERATURE_METHODS)}"
            )
        if self.class_balance != "none" and not self.uses_labels:
            raise ValueError(
                f"train.class_balance: '{self.class_balance}' needs a method that uses labels "
                "(supcon, or triplet/margin_pair with supervised: true); use none"
            )
        if self.devices != "auto" and self.devices > self.batch_size:
            raise ValueError(
                f"train.devices: {self.devices} processes but train.batch_size is "
                f"{self.batch_size}: every process needs at least one image per batch; use at "
                f"most {self.batch_size}"
            )
        if self.devices != "auto" and self.batch_size % self.devices:
            raise ValueError(
                f"train.batch_size: {self.batch_size} (the global batch) is not divisible by "
                f"train.devices ({self.devices}); use a multiple of {self.devices}"
            )
        if self.method == "moco" and self.moco.queue_size < self.batch_size:
            raise ValueError(
                f"train.moco.queue_size must be at least train.batch_size ({self.batch_size}), "
                f"got {self.moco.queue_size}"
            )
        return self


class ProbeConfig(_Section):
    """Frozen-feature evaluation (stage ``probe``)."""

    weight_decays: list[NonNegativeFloat] = Field(
        default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3, 1e-2], min_length=1
    )
    max_iter: Annotated[Int, Field(ge=1)] = 200
    """The most L-BFGS iterations of one fit of the regularisation path."""
    tolerance: PositiveFloat = 1e-4
    """A fit stops once no entry of its (preconditioned) gradient exceeds this."""
    tsne_points: Annotated[Int, Field(ge=0)] = 1000
    """The most test embeddings in the t-SNE map, drawn with the seed (0: none; PCA maps all)."""
    knn_k: CountOrAuto = "auto"
    """Neighbours that vote in the kNN classifier (probe and pretrain's monitor). ``auto``:
    min(200, the smallest train class), so votes stay within one class's worth of images: 200 is
    the CIFAR protocol (5,000 train images per class), but on digits (about 126 per class) it
    reaches into other classes. The k used is reported in metrics/probe.json."""
    knn_temperature: PositiveFloat = 0.1
    anomaly_k: Annotated[Int, Field(ge=1)] = 2
    """Deep-kNN anomaly score: mean cosine distance to this many nearest train embeddings
    (Bergman et al. 2020 use 2)."""
    batch_size: Annotated[Int, Field(ge=1)] = 512


class ExportConfig(_Section):
    """ONNX export and its checks against torch (stage ``export``)."""

    opset: Annotated[Int, Field(ge=18, le=23)] = 20
    atol: PositiveFloat = 1e-4
    latency_repeats: Annotated[Int, Field(ge=1)] = 20


class RegistryConfig(_Section):
    """MLflow tracking and the promotion gate (stage ``register``).

    The tracking server is not a param: ``MLFLOW_TRACKING_URI`` chooses it (default: the embedded
    ``sqlite:///mlflow.db``), so moving to a server does not make DVC rerun anything.
    """

    experiment: Annotated[str, Field(min_length=1)] = "contrastive"
    model_name: Annotated[str, Field(min_length=1, pattern=r"^[\w.-]+$")] = "contrastive-encoder"
    min_improvement: Annotated[Float, Field(ge=0, le=1)] = 0.005
    """How much the linear-probe top-1 must beat the champion's to replace it (0.005 = 0.5 pt)."""


class ScheduleConfig(_Section):
    """When the Prefect deployment retrains (``make serve``)."""

    cron: str = "0 3 * * 1"
    """Standard five-field cron: by default Mondays at 03:00."""
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _five_fields(self) -> ScheduleConfig:
        if len(self.cron.split()) != 5:
            raise ValueError(
                f"schedule.cron must have five fields (minute hour day month weekday), "
                f"got '{self.cron}'"
            )
        return self


class Params(_Section):
    """The whole of ``params.yaml``."""

    seed: Annotated[Int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    probe: ProbeConfig = ProbeConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _text_for_clip(self) -> Params:
        text_encoder, method = self.model.text_encoder, self.train.method
        if method == "clip" and text_encoder == "none":
            raise ValueError("model.text_encoder: 'none', but train.method 'clip' pairs images "
                             "with captions; use transformer or gru")
        if method != "clip" and text_encoder != "none":
            raise ValueError(f"model.text_encoder: '{text_encoder}', but train.method "
                             f"'{method}' learns from images alone; use none, or method clip")
        return self


def _method_sections_with(name: str) -> list[str]:
    """The method sections of ``train`` that have a key ``name``: ``["train.moco"]``."""
    return [
        f"train.{method}"
        for method, field in TrainConfig.model_fields.items()
        if isinstance(field.annotation, type)
        and issubclass(field.annotation, _Section)
        and name in field.annotation.model_fields
    ]


def _describe(error: dict[str, Any], where: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        section: type[BaseModel] = Params
        for part in error["loc"][:-1]:
            section = section.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(section.model_fields)
        owners = _method_sections_with(str(error["loc"][-1]))
        hint = f" ('{error['loc'][-1]}' belongs to {' and '.join(owners)})" if owners else ""
        return f"{where}: unknown key '{key}'{hint}; allowed here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return f"{where}: {message}"
    return f"{where}: {key}: {message} (got {error.get('input')!r})"


def parse_params(raw: dict[str, Any] | None, where: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise :class:`ConfigError` naming the first bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], where)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (it would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the safe loader itself refuses such a key
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first at line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """``line N: what is wrong``: the first line of a YAML error, with where it is."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    An empty file is an error, not "all defaults": the code's defaults differ from the shipped
    file, so a file emptied by accident would silently run another pipeline.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML at {_yaml_error(exc)}") from None
    if not raw:
        raise ConfigError(f"{path}: empty; it must hold the pipeline's sections (seed, data, "
                          "model, ...) as in the project's params.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, str(path))


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.3}}`` -> ``{"train.lr": 0.3}``, for logging and hashing."""
    items = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    flat: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params_hash(*sections: BaseModel | dict[str, Any]) -> str:
    """A short, stable hash of the given sections' values."""
    payload = json.dumps([flatten(s) for s in sections], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
