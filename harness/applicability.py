"""Where the person-based shortcut measures apply: measured on the data, enforced before any training.

The background-swap probe, the objectives built on it (robust/f1, val/f1_bgswap), background-swap
augmentation (`bgswap_p`) and the preprocessors that read where the person is (face_crop,
remove_background) assume portraits: a face in nearly every image, and a person mask segmented from
it (harness.foreground). On other data they measure nothing true: a "swapped background" of a
handwritten digit is a piece of another digit. So:

    foreground_users(cfg)       what in a study needs the foreground, as the study file names it
    prepare_foreground(cfg, c)  the foreground of a decoded cache, or None where nothing needs it or it
                                does not apply, with the measured Applicability; raises NotApplicable
                                (before any training) when the study needs it and the data does not meet
                                `shortcuts.min_face_share` / `shortcuts.min_mask_share`

The foreground is computed when the study uses it, or, as a probe shown beside the figures and steering
nothing, when the data is in the competition layout (portraits by construction); on other data it is
not computed at all. Before the full foreground (GrabCut and inpainting of every image) a sample of
`shortcuts.face_sample` images is searched for faces: data without faces is refused in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from harness.config import StudyConfig
from harness.preflight import PreflightError

log = logging.getLogger(__name__)


NOT_COMPUTED = ("not computed: nothing in the study uses faces or person masks and the data is not in the "
                "portrait layout")


class NotApplicable(PreflightError):
    """A study whose objective or remedies need portraits, on data where faces or person masks are not found."""


def reads_foreground(preprocess: str, bgswap_p: float) -> bool:
    """Whether training with this preprocessor and swap probability needs the foreground."""
    from harness.augment import PREPROCESSORS

    return bgswap_p > 0 or PREPROCESSORS.get(preprocess).uses_foreground


def foreground_users(cfg: StudyConfig) -> list[str]:
    """What in the study reads the foreground, named as the study file names it (empty: nothing)."""
    from harness.metrics import OBJECTIVES

    users = []
    if "bgswap" in OBJECTIVES.get(cfg.search.objective).views:
        users.append(f"search.objective {cfg.search.objective}")
    if cfg.params.bgswap_p > 0:
        users.append(f"params.bgswap_p {cfg.params.bgswap_p}")
    swap = cfg.search.space.get("bgswap_p")
    if swap is not None and (swap.type != "categorical" or any(value > 0 for value in swap.choices)):
        users.append("search.space.bgswap_p")
    if reads_foreground(cfg.params.preprocess, 0.0):
        users.append(f"params.preprocess {cfg.params.preprocess}")
    space = cfg.search.space.get("preprocess")
    for choice in space.choices if space is not None and space.type == "categorical" else []:
        if choice != cfg.params.preprocess and reads_foreground(choice, 0.0):
            users.append(f"search.space.preprocess {choice}")
    return users


def portrait_layout(cfg: StudyConfig) -> bool:
    """Data whose layout says it is portraits (the competition's): the probe is measured there even when
    nothing in the study uses it."""
    return cfg.data.format == "competition"


@dataclass(frozen=True)
class Applicability:
    """What the foreground step found on a dataset, and whether the person-based measures apply to it."""

    images: int
    checked: int  # images the face share was measured on: a sample before the full foreground, else all
    face_share: float  # share of the checked images where a detector found a face
    mask_share: float | None  # share where the person mask came from GrabCut, not the template; None: not run
    min_face_share: float
    min_mask_share: float
    users: list[str] = field(default_factory=list)  # what in the study needs it
    detectors: dict = field(default_factory=dict)

    @property
    def applies(self) -> bool:
        masks_ok = self.mask_share is None or self.mask_share >= self.min_mask_share
        return self.face_share >= self.min_face_share and masks_ok

    def as_dict(self) -> dict:
        return {**asdict(self), "applies": self.applies}

    def describe(self) -> str:
        """One line: what was found, against the thresholds."""
        scope = "all" if self.checked == self.images else f"a sample of {self.checked} of {self.images}"
        text = (f"faces found in {self.face_share:.0%} of {scope} images (needs >= {self.min_face_share:.0%})")
        if self.mask_share is not None:
            text += f"; person mask segmented (not the template fallback) in {self.mask_share:.0%} " \
                    f"(needs >= {self.min_mask_share:.0%})"
        verdict = "the person-based probe and remedies apply" if self.applies else \
            "the person-based probe and remedies do NOT apply to this data"
        return f"{text}: {verdict}"

    def refusal(self, study: str) -> str:
        return (f"study {study!r} uses what needs portraits ({', '.join(self.users)}), but on this data "
                f"{self.describe()}.\n"
                "  to fix: set `search.objective: val/f1`, remove bgswap_p from params and search.space, and keep "
                "preprocess to none / center_crop (studies/digits.yaml is such a study); or, if the images are "
                "portraits the detectors miss, lower `shortcuts.min_face_share` / `shortcuts.min_mask_share` "
                "in the study file on purpose")


def measured(fg, cfg: StudyConfig, users: list[str]) -> Applicability:
    """The applicability of a computed foreground (harness.foreground.Foreground)."""
    counts = fg.counts()
    images = max(1, counts["images"])
    return Applicability(images=counts["images"], checked=counts["images"],
                         face_share=1 - counts["no_face"] / images, mask_share=1 - counts["mask_fallback"] / images,
                         min_face_share=cfg.shortcuts.min_face_share, min_mask_share=cfg.shortcuts.min_mask_share,
                         users=users, detectors=dict(fg.stats["detectors"]))


def sample_faces(images: np.ndarray, cfg: StudyConfig, users: list[str]) -> Applicability:
    """The face share on an evenly spread sample of `shortcuts.face_sample` images (detection only: seconds)."""
    from harness.foreground import detect_face

    count = len(images)
    rows = np.unique(np.linspace(0, count - 1, min(count, cfg.shortcuts.face_sample)).round().astype(int))
    detectors: dict[str, int] = {}
    for row in rows:
        _, name = detect_face(np.asarray(images[row]))
        detectors[name] = detectors.get(name, 0) + 1
    found = len(rows) - detectors.get("none", 0)
    return Applicability(images=count, checked=len(rows), face_share=found / max(1, len(rows)), mask_share=None,
                         min_face_share=cfg.shortcuts.min_face_share, min_mask_share=cfg.shortcuts.min_mask_share,
                         users=users, detectors=detectors)


def prepare_foreground(cfg: StudyConfig, cache, refuse: bool = True):
    """(Foreground or None, Applicability or None) of a decoded cache for this study; see the module docstring.

    Raises NotApplicable when the study needs the foreground and the data does not meet the thresholds;
    with `refuse` False (`harness remedies`, `check-data`: they report what applies) returns None instead."""
    from harness.foreground import foreground, has_foreground

    users = foreground_users(cfg)
    if not users and not portrait_layout(cfg):
        return None, None
    if not has_foreground(cache, cfg.data.cache_dir):
        sample = sample_faces(cache.images, cfg, users)
        if not sample.applies:
            return _not_applicable(cfg, sample, refuse)
    fg = foreground(cache, cfg.data.cache_dir)
    found = measured(fg, cfg, users)
    return (fg, found) if found.applies else _not_applicable(cfg, found, refuse)


def _not_applicable(cfg: StudyConfig, found: Applicability, refuse: bool):
    if found.users and refuse:
        raise NotApplicable(found.refusal(cfg.name))
    log.info("background probe not measured: %s", found.describe())
    return None, found
