"""The promotion policy: decide on validation, report test, and promote only a gain larger than the noise."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.core.catalog import TRAINERS, ModelSpec
from pipeline.core.errors import DataError
from pipeline.core.params import Float, Section, Str

SPLITS = ("val", "test")
APPROVALS = ("auto", "manual")  # who moves `champion`: the policy, or a person (`llm-pipeline review approve`)
SE_SUFFIX = "_se"  # tag <t>_se holds the standard error of metric tag <t>
PARAMS = Section(
    decide_on=Str(choices=SPLITS),
    noise_z=Float(low=0),
    approval=Str(choices=APPROVALS),
    margins=Section(**{role: Float(low=0) for role in TRAINERS}),  # by model role
)


def standard_error(scores: Sequence[float]) -> float:
    """The standard error of the mean of per-example scores: their sample deviation / sqrt(n) (0.0 below 2)."""
    n = len(scores)
    if n < 2:
        return 0.0
    mean = sum(scores) / n
    return math.sqrt(sum((score - mean) ** 2 for score in scores) / (n - 1) / n)


def metric_tag(model: ModelSpec, split: str) -> str:
    """The version tag holding `model`'s key metric on `split`."""
    return model.val_tag if split == "val" else model.test_tag


def key_tags(model: ModelSpec, first: str = "val") -> dict[str, str]:
    """{tag: split} of `model`'s key metric, the `first` split first, each tag once (the base model's val and
    test are one tag, which keeps `first`)."""
    tags: dict[str, str] = {}
    for split in (first, *(s for s in SPLITS if s != first)):
        tags.setdefault(metric_tag(model, split), split)
    return tags


def metric_label(tag: str) -> str:
    """A metric tag as shown: metric.<name> is the training stage's own; other prefixes (eval.) say who measured it."""
    return tag.removeprefix("metric.")


def _number(tags: Mapping[str, str], tag: str, who: str) -> float | None:
    if tag not in tags:
        return None
    try:
        return float(tags[tag])
    except ValueError:
        raise DataError(f"{who}: tag {tag} is not a number: {tags[tag]!r}") from None


@dataclass(frozen=True)
class Measure:
    """A version's key metric on one split: its tag, value (None: not tagged) and standard error (None: unknown)."""

    tag: str
    value: float | None
    se: float | None

    def text(self) -> str:
        if self.value is None:
            return "-"
        return f"{self.value:.4g}" + ("" if self.se is None else f" ± {self.se:.2g}")


def measure(model: ModelSpec, tags: Mapping[str, str], split: str, who: str) -> Measure:
    """The key metric of a version with `tags` on `split`; `who` names the version in errors."""
    tag = metric_tag(model, split)
    return Measure(tag, _number(tags, tag, who), _number(tags, tag + SE_SUFFIX, who))


@dataclass(frozen=True)
class Verdict:
    """The challenger against the champion on the deciding metric."""

    won: bool
    gain: float | None   # how much better in the metric's direction (negative: worse); None: nothing to compare
    needed: float        # the gain required: the larger of the margin and the noise
    reason: str


def judge(model: ModelSpec, new: Measure, champion: Measure, margin: float, noise_z: float,
          champion_version: str) -> Verdict:
    """Whether `new` (whose value must be set) beats `champion` by more than both `margin` and `noise_z`
    standard errors of the difference.

    The difference's standard error is sqrt(se_new² + se_champion²): exact for independent splits, and an
    overestimate (so the policy errs towards keeping the champion) when both were scored on the same one.
    A version without a standard error borrows the other's; a champion without the metric (registered
    before it was measured) is replaced, and the reason says so.
    """
    label = metric_label(new.tag)
    if champion.value is None:
        return Verdict(True, None, margin,
                       f"champion version {champion_version} has no {label} (registered before it was measured)")
    gain = new.value - champion.value if model.higher_is_better else champion.value - new.value
    se_new = new.se if new.se is not None else champion.se
    se_old = champion.se if champion.se is not None else new.se
    noise = noise_z * math.hypot(se_new or 0.0, se_old or 0.0)
    needed = max(margin, noise)
    won = gain > needed
    versus = f"{label} {new.text()} vs {champion.text()} of version {champion_version}"
    if gain <= 0:
        return Verdict(False, gain, needed, f"{versus}: " + (f"worse by {-gain:.4g}" if gain else "no better"))
    bar = f"margin {margin:g}" if margin >= noise else f"noise {noise:.4g} ({noise_z:g} × the difference's standard error)"
    return Verdict(won, gain, needed,
                   f"{versus}: better by {gain:.4g}, {'more than' if won else 'not more than'} the {bar}")


def policy_text(policy: Mapping[str, Any], model: ModelSpec) -> str:
    """The policy for `model` in one line, for reports and model cards."""
    return (f"decide on the {policy['decide_on']} split; a new version must beat the champion by more than "
            f"max(margin {policy['margins'][model.role]:g}, {policy['noise_z']:g} × the difference's standard error)")
