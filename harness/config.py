"""Study files: YAML loaded into typed, frozen config objects.

One study file describes one experiment: where the data is and how it is split
(`data`), the default value of every searchable parameter (`params`, which is
also trial 0 of a study), the fixed training settings (`train`), what the study
searches (`search`), where runs are tracked (`tracking`) and how the best trials
are promoted (`ensemble`). Unknown keys, wrong types and out-of-range values are
rejected at load with the file, the key path and what is allowed. Names taken from a
registry (heads, losses, objectives, ...) are checked by harness.preflight, where the
registries are imported: this layer imports nothing of the harness, and loading a
study file imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A study file that cannot be used; the message says where and why."""


DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?")


def parse_duration(value: str | float | int) -> float:
    """Seconds of a duration: a number of seconds, or hours, minutes and seconds as in "1h30m", "20m", "90s"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = DURATION.fullmatch(text)
        if not text or match is None:
            raise ValueError(f"{value!r} is not a duration; write seconds (900) or e.g. 20m, 1h30m, 90s")
        seconds = sum(float(match[unit] or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1)))
    if not seconds > 0:
        raise ValueError(f"{value!r}: a duration must be more than 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """900 -> "15m00s", 4000 -> "1h06m40s", 42.5 -> "42s"."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- data


class ImageSize(_Frozen):
    """Training size every image is decoded and resized to once (in the cache)."""

    height: int = Field(128, ge=16, le=4096)
    width: int = Field(96, ge=16, le=4096)


class SyntheticData(_Frozen):
    """Generate a synthetic competition-layout dataset at `root` when it is missing."""

    people: int = Field(120, ge=12, le=100_000)
    seed: int = 0
    height: int = Field(512, ge=32, le=4096)
    width: int = Field(384, ge=32, le=4096)
    eval_images: int | None = Field(None, ge=1)
    # chance that a train person's background follows their gender and age group (the trap); 0: no trap
    trap_strength: float = Field(0.85, ge=0.0, le=1.0)
    # share of train persons given one label error of the real data's kinds (train/label_noise.csv lists them)
    label_noise: float = Field(0.0, ge=0.0, le=0.5)


class HeldOutConfig(_Frozen):
    """A held-out test set for image-folder and CSV data: predicted and scored like the competition's eval set
    (`harness predict`), never trained on and never used to choose anything. One of:

    fraction   hold out this share of the labelled groups (whole groups: a group is never split)
    root       a folder of its own: <root>/<class>/<image> (labelled by the folder, which must be one of the
               training classes) or images directly in <root> (unlabelled)
    root + csv a CSV under root with columns path[,label] (an empty label: unknown)
    """

    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    seed: int = 0  # fraction: which groups are held out
    root: Path | None = None
    csv: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> HeldOutConfig:
        if (self.fraction is None) == (self.root is None):
            raise ValueError("give either `fraction` (hold out a share of the labelled data) or `root` (a folder "
                             "of test images, with `csv` for a CSV index), not both and not neither")
        if self.csv is not None and self.root is None:
            raise ValueError("`csv` names a file under `root`; set root too")
        return self


class DataConfig(_Frozen):
    format: Literal["competition", "imagefolder", "csv"] = "competition"
    root: Path = Path("data")
    csv: Path | None = None  # csv format: the index file, relative to root
    synthetic: SyntheticData | None = None
    sample: str | None = None  # imagefolder format: a real dataset of an installed package (harness.data.samples)
    image_size: ImageSize = ImageSize()
    resize: Literal["area", "bilinear"] = "area"
    age_bounds: tuple[int, int] = (30, 60)
    corrections: Path | None = None
    valid_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    on_bad_image: Literal["fail", "exclude"] = "fail"
    cache_dir: Path = Path("runs/cache")
    cache_workers: int = Field(0, ge=0, le=256)  # 0: one per CPU core
    test: HeldOutConfig | None = None  # image-folder / CSV data: the held-out test set (competition: eval/)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        low, high = self.age_bounds
        if not 0 < low < high < 150:
            raise ValueError(f"age_bounds must be two ages with 0 < low < high < 150, got {list(self.age_bounds)}")
        if self.format == "csv" and self.csv is None:
            raise ValueError("format 'csv' needs `csv:`, the index file (columns path,label[,group]) relative to root")
        if self.format == "competition" and self.test is not None:
            raise ValueError("test: the competition layout's test set is its eval/ folder (eval/info.csv, and "
                             "eval/gt.csv to score it); remove `test:` or use format imagefolder / csv")
        if self.sample is not None:  # its name is checked against harness.data.samples by the preflight
            if self.format != "imagefolder" or self.synthetic is not None:
                raise ValueError("sample: a sample dataset is written as an image folder; set format: imagefolder "
                                 "and no synthetic:")
        return self


# -------------------------------------------------------------------------- params


class Params(_Frozen):
    """Every value a study may search, with its default (which is trial 0)."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    head: str = "multiclass"
    freeze: str = "none"
    freeze_k: int = Field(1, ge=0, le=100)
    loss: str = "ce"
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    aug_strength: float = Field(0.3, ge=0.0, le=1.0)
    preprocess: str = "none"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.01, ge=0.0, le=10.0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    bgswap_p: float = Field(0.0, ge=0.0, le=1.0)  # training: chance an image's person goes on another's background

    def replace(self, **changes: Any) -> Params:
        return Params.model_validate({**self.model_dump(), **changes})


# --------------------------------------------------------------------------- train


class TrainConfig(_Frozen):
    epochs: int = Field(4, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    warmup_epochs: float = Field(0.5, ge=0.0)
    backbone_lr_scale: float = Field(0.1, gt=0.0, le=1.0)  # warmup_head: backbone lr after unfreezing
    grad_clip: float | None = Field(1.0, gt=0.0)
    num_workers: int = Field(0, ge=0, le=64)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # multihead: mask, gender, age
    max_train_batches: int | None = Field(None, ge=1)  # cap an epoch (smoke runs)
    # pretrained: true and a backbone with no ImageNet weights here: refuse before any compute (the
    # default), or train that backbone from random init (an explicit choice, never a silent one)
    missing_weights: Literal["refuse", "from_scratch"] = "refuse"


# -------------------------------------------------------------------------- search


class _Param(_Frozen):
    when: dict[str, list[Any]] | None = None  # conditional: sampled only if parent params take these values

    def active(self, values: dict[str, Any]) -> bool:
        """Whether this param is sampled, given the values its parents took (`values`: all params)."""
        return not self.when or all(values[parent] in allowed for parent, allowed in self.when.items())


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    def contains(self, value: Any) -> bool:
        return value in self.choices


class IntParam(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    def contains(self, value: Any) -> bool:
        return self.low <= value <= self.high

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0.0)

    def contains(self, value: Any) -> bool:
        return self.low <= value <= self.high

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled range needs low > 0, got {self.low}")
        return self


SearchParam = Annotated[CategoricalParam | IntParam | FloatParam, Field(discriminator="type")]


class SamplerConfig(_Frozen):
    name: Literal["tpe", "random", "cmaes", "qmc"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(5, ge=0)


class PrunerConfig(_Frozen):
    """The pruner sees val F1 after every epoch, at step = epochs trained so far (1, 2, ...)."""

    name: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(3, ge=0)  # median: trials that complete before it prunes anything
    n_warmup_steps: int = Field(1, ge=0)  # epochs a trial trains before it can be stopped (SH/hyperband: min_resource)
    reduction_factor: int = Field(3, ge=2)  # successive_halving/hyperband: 1/this of a rung's trials go on
    # stop a trial only on evidence (harness.pruners.EvidencePruner): where the pruner says stop AND the upper
    # end of the trial's 95% person-bootstrap interval at that epoch is below the value it needed to go on
    evidence: bool = False
    # never stop an enqueued trial (trial 0, search.enqueue recipes, a warm start): harness.pruners.SparingKnown
    spare_known: bool = False


class SearchConfig(_Frozen):
    trials: int = Field(12, ge=1, le=100_000)
    # what trials are ranked, pruned and promoted by (harness.metrics.OBJECTIVES)
    objective: str = "val/f1"
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    space: dict[str, SearchParam] = Field(default_factory=dict)
    # known recipes, enqueued after trial 0 when the study is created: each a partial params mapping (the rest
    # are the study file's defaults), e.g. the best configuration of an earlier study of the same data
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    # wall clock for the whole of `make study` (search, eval scores, ensemble, promotion, submission), e.g. 20m:
    # harness.budget plans every step inside it from measured costs; None: no budget (the search runs its trials)
    budget: float | None = None
    heartbeat_s: int = Field(10, ge=1)  # a trial with no heartbeat for 3x this long is stale and retried
    max_failed: int = Field(10, ge=1)  # stop the study after this many failed trials (it is probably broken)

    @field_validator("budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return None if value in (None, "", "none") else parse_duration(value)

    @model_validator(mode="after")
    def _known_names(self) -> SearchConfig:
        known = set(Params.model_fields)
        seen: list[str] = []
        for name, spec in self.space.items():
            if name not in known:
                raise ValueError(f"space.{name}: unknown parameter; searchable ones are {sorted(known)}")
            for parent in spec.when or {}:
                if parent not in seen:  # parents are sampled first, so they must come earlier
                    raise ValueError(f"space.{name}.when: parent {parent!r} is not in the search space above {name!r}")
            seen.append(name)
        return self


# ------------------------------------------------------- tracking, ensemble, promotion


class TrackingConfig(_Frozen):
    project: str = "harness"
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    # An unreachable W&B server must cost seconds: how long one online start or finish may wait, and how
    # long after a failed start the study's runs stay offline before one tries online again
    init_timeout_s: float = Field(10.0, gt=0, le=600)
    finish_timeout_s: float = Field(15.0, gt=0, le=3600)
    retry_online_s: float = Field(300.0, ge=0, le=86_400)


class EnsembleConfig(_Frozen):
    enabled: bool = True
    top_k: int = Field(5, ge=1, le=1000)
    max_gap: float | None = None
    rounds: int = Field(25, ge=1, le=10_000)
    method: str = "greedy"  # how the candidates are combined: a harness.promotion.selection.METHODS entry


class PromotionConfig(_Frozen):
    """`harness promote`: the top configurations retrained on person-grouped folds of all labelled persons."""

    folds: int = Field(5, ge=2, le=20)
    top_k: int = Field(3, ge=1, le=100)  # configurations, best by the study's objective
    # epochs a pruned trial must have trained to be promoted (a late rung); None: half of train.epochs
    min_epochs: int | None = Field(None, ge=1)
    # epochs of each fold run: "full" (train.epochs), or "best": the configuration's own best epoch on the single
    # split, at least min_epochs (a budget chooses "best" when full epochs do not fit)
    epochs: Literal["full", "best"] = "full"


class ShortcutConfig(_Frozen):
    """Where the person-based shortcut measures apply (harness.applicability) and the dataset-level
    shortcut audit (harness.context_audit).

    robust/f1, the background-swap probe, `bgswap_p`, `face_crop` and `remove_background` assume portraits:
    a face in nearly every image and a person mask segmented from it. A study that uses any of them on data
    where faces are found in fewer than `min_face_share` of the images, or person masks come from the
    segmentation (not the template fallback) in fewer than `min_mask_share`, is refused before any training.
    """

    min_face_share: float = Field(0.8, ge=0.0, le=1.0)
    min_mask_share: float = Field(0.7, ge=0.0, le=1.0)
    face_sample: int = Field(64, ge=8, le=100_000)  # images checked for faces before the full foreground
    # the context audit: can the labels be predicted from what lies outside the object alone?
    audit: bool = True
    audit_folds: int = Field(5, ge=2, le=20)
    audit_permutations: int = Field(20, ge=5, le=1000)  # label shuffles that measure chance
    # images the audit reads at most: beyond it a seeded sample of whole persons (at 18,900 images the audit was
    # half of the data preparation, 350 s; its interval is narrow long before). None: every image
    audit_images: int | None = Field(4000, ge=200)


class StoreConfig(_Frozen):
    """Where trial files go besides the local runs folder, for studies run on several machines (harness.store)."""

    url: str | None = None  # s3://BUCKET[/PREFIX], or a shared folder every machine mounts (/path, file:///path)
    endpoint_url: str | None = None  # an S3-compatible server other than AWS (MinIO, Ceph, rclone serve s3)
    region: str | None = None

    @field_validator("url", "endpoint_url", "region")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None  # `--set store.url=$UNSET` from a launch script means no store

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(s3://[^/]+|file:///|/)", value):
            raise ValueError(f"{value!r}: use s3://BUCKET[/PREFIX] or an absolute shared folder (/path or "
                             "file:///path)")
        return value


# --------------------------------------------------------------------------- study


class StudyConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    seed: int = 0
    runs_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    params: Params = Params()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    promotion: PromotionConfig = PromotionConfig()
    shortcuts: ShortcutConfig = ShortcutConfig()
    store: StoreConfig = StoreConfig()
    smoke: dict[str, Any] | None = None  # overrides that shrink the study to CPU-seconds

    @model_validator(mode="after")
    def _recipes_inside_the_space(self) -> StudyConfig:
        """An enqueued recipe names params that exist, with values valid for them and inside the searched space."""
        for index, recipe in enumerate(self.search.enqueue):
            where = f"search.enqueue.{index}"
            unknown = sorted(set(recipe) - set(Params.model_fields))
            if unknown:
                raise ValueError(f"{where}: unknown parameter(s) {unknown}; searchable ones are "
                                 f"{sorted(Params.model_fields)}")
            try:
                self.params.replace(**recipe)
            except ValidationError as error:
                raise ValueError(f"{where}: {error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}") from None
            for name, value in recipe.items():
                spec = self.search.space.get(name)
                if spec is not None and not spec.contains(value):
                    raise ValueError(f"{where}.{name}: {value!r} lies outside search.space.{name}")
        return self

    @model_validator(mode="after")
    def _defaults_inside_the_space(self) -> StudyConfig:
        """Trial 0 runs the defaults, so a categorical default must be one of the searched choices."""
        for name, spec in self.search.space.items():
            default = getattr(self.params, name)
            if spec.type == "categorical" and default not in spec.choices:
                raise ValueError(f"params.{name} is {default!r}, which is not among search.space.{name}.choices "
                                 f"{spec.choices}; trial 0 runs the defaults, so add it to the choices or change it")
        return self

    @property
    def study_dir(self) -> Path:
        return self.runs_dir / self.name

    @property
    def promotion_min_epochs(self) -> int:
        """Epochs a pruned trial must have trained to be promotable (a late rung): promotion.min_epochs, else half of
        train.epochs; also the fewest epochs of a fold run."""
        return self.promotion.min_epochs or math.ceil(self.train.epochs / 2)

    def replace(self, overrides: dict[str, Any]) -> StudyConfig:
        """A new config with dotted-key overrides (``{"train.epochs": 2}``) validated again."""
        raw = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            _set_dotted(raw, dotted, value)
        return _validate(raw, source="overrides")

    def search_space_hash(self) -> str:
        """What makes two trials comparable: the space, the defaults, the training recipe and the objective.

        Where a trial runs (train.device, train.num_workers) and how the study searches (sampler,
        pruner, trial count) are left out: changing them on resume mixes nothing.
        """
        space = {k: v.model_dump(mode="json") for k, v in self.search.space.items()}
        recipe = self.train.model_dump(mode="json", exclude={"device", "num_workers"})
        blob = json.dumps({"space": space, "params": self.params.model_dump(mode="json"), "train": recipe,
                           "image_size": self.data.image_size.model_dump(mode="json"),
                           "objective": self.search.objective}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[leaf] = value


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid study file ({error.error_count()} problem(s))"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"] if not _is_union_tag(p)) or "(top level)"
        msg = item["msg"]
        if item["type"] == "value_error":  # our validators' messages, "Value error, " dropped
            msg = str(item["ctx"]["error"])
            key, sep, rest = msg.partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.]*", key):  # "space.loss.choices: ..." names a key below path
                path, msg = (key if path == "(top level)" else f"{path}.{key}"), rest
        if item["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif item["type"] == "missing":
            msg = "required key is missing"
        given = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    return part in ("categorical", "int", "float")


def _validate(raw: Any, source: str) -> StudyConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a study file must be a YAML mapping of keys, got {type(raw).__name__}")
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def parse_study(text: str, source: str = "<string>", smoke: bool = False) -> StudyConfig:
    try:
        raw = yaml.safe_load(text)  # safe loader: a study file is data and never runs code
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    cfg = _validate(raw, source)
    if smoke:
        if not cfg.smoke:
            raise ConfigError(f"{source}: has no `smoke:` section to shrink it with")
        try:
            cfg = cfg.replace(cfg.smoke)
        except ConfigError as error:  # name the section to edit, not the generic "overrides"
            raise ConfigError(f"{source}: its `smoke:` section does not fit the study; edit it to match "
                              f"the study's data and space:\n{error}") from None
    return cfg


def load_study(path: str | Path, smoke: bool = False, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load and validate a study file; `smoke` applies its `smoke:` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    cfg = parse_study(path.read_text(), source=str(path), smoke=smoke)
    if overrides:
        try:
            cfg = cfg.replace(overrides)
        except ConfigError as error:
            raise ConfigError(f"{path} with overrides {overrides}:\n{error}") from None
    return cfg
