"""What streamed estimates are calibrated with, and how tenants are kept from gaming it.

Three figures, each learnt from exact (non-streamed) observations:

- **prompt**: Ollama's prompt tokens per token of policyd's count (the grant's `prompt`:
  text, `context` ids, images, tools; never padding or whitespace between fields), per
  model and endpoint (templates differ);
- **reply**: JSON-encoded reply bytes per completion token, per model;
- **context**: bytes per id of /api/generate's `context` array, per model.

They are kept **per tenant** (`meter_calibration`: tenant, canonical model, endpoint), so
a tenant's traffic calibrates only its own charges. A tenant without its own figures is
charged from the **base**: per figure, the median of the tenants' own figures once at
least `MIN_TENANTS` tenants have `MIN_N` observations each, else the prior; and the base
stays within `BASE_RANGE` of the prior. A tenant's own figure is blended with the base
until it has observations (`BLEND`) and may lower its charge by at most `OWN_RANGE`.

A figure is a log-space robust location: per batch, the median of the batch's plausible
observations pulls it by at most `STEP` (Huber-style clipping), with the weight of one
observation among all seen so far, never less than `RATE_FLOOR`. So a single batch moves
a trained figure by at most `STEP * max(k / n, RATE_FLOOR * k)`, capped at `STEP`, and
implausible pairs (`PLAUSIBLE`) teach nothing. docs/metering.md states the bounds.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs

from policyd.shared.tables import CALIBRATION_FIGURES

__all__ = [
    "BASE_RANGE",
    "FIGURES",
    "MIN_TENANTS",
    "OWN_RANGE",
    "PRIORS",
    "Calibration",
    "CalibrationRow",
    "Observation",
    "Step",
    "batch_steps",
    "learn_row",
    "model_key",
    "pulled",
]

#: The figures, their priors (before anything is learnt) and plausible ranges.
FIGURES: Final = CALIBRATION_FIGURES
PRIORS: Final = {"prompt": 1.1, "reply": 4.0, "context": 6.0}
PLAUSIBLE: Final = {"prompt": (0.25, 4.0), "reply": (1.0, 16.0), "context": (1.5, 12.0)}
#: Fewest units an observation needs to teach a figure (short ones are all overhead).
MIN_UNITS: Final = {"prompt": 8, "reply": 16, "context": 8}
#: Largest pull of one batch on a figure, in log space (0.1 = about 10%).
STEP: Final = 0.1
#: Smallest weight of one observation once many have been seen.
RATE_FLOOR: Final = 0.02
#: The base is the median of at least this many tenants' own figures ...
MIN_TENANTS: Final = 3
#: ... each learnt from at least this many observations.
MIN_N: Final = 20
#: The base stays within this factor of the prior.
BASE_RANGE: Final = 2.0
#: A tenant's own figure may lower its charge by at most this factor against the base
#: (context ids vary least between honest tenants: their size is the vocabulary's).
OWN_RANGE: Final = {"prompt": 1.25, "reply": 1.25, "context": 1.1}
#: Pseudo-observations of the base a tenant's own figure is blended with.
BLEND: Final = 5.0
#: Figures that lower the charge when they grow (bytes per token); prompt is the other way.
_INVERSE: Final = frozenset({"reply", "context"})
_REGISTRY: Final = re.compile(r"^(?:registry\.ollama\.ai/)?(?:library/)?")
_TAGGED: Final = re.compile(r":[^/]+$")


def model_key(model: str | None) -> str:
    """A model name as Ollama resolves it: folded, default registry and namespace dropped,
    tag defaulted (`registry.ollama.ai/library/LLAMA3.2` -> `llama3.2:latest`)."""
    name = _REGISTRY.sub("", (model or "").strip().lower(), count=1)
    if not name:
        return "?"
    return name if _TAGGED.search(name) else f"{name}:latest"


@attrs.frozen(kw_only=True)
class Observation:
    """One exact reply's teaching: per figure, the value it shows (or None)."""

    tenant: str
    model: str
    path: str
    prompt: float | None = None
    reply: float | None = None
    context: float | None = None

    @classmethod
    def build(
        cls,
        *,
        tenant: str,
        model: str,
        path: str,
        counted: int | None,
        prompt_tokens: int,
        reply_bytes: float,
        completion_tokens: int,
        context_bytes: int = 0,
        context_tokens: int = 0,
    ) -> Observation | None:
        """The plausible parts of a pair, or None if nothing in it is plausible."""
        values = {
            "prompt": _ratio("prompt", prompt_tokens, counted or 0),
            "reply": _ratio("reply", reply_bytes, completion_tokens),
            "context": _ratio("context", context_bytes, context_tokens),
        }
        if all(v is None for v in values.values()):
            return None
        return cls(tenant=tenant, model=model, path=path, **values)


def _ratio(figure: str, amount: float, units: int) -> float | None:
    """amount / units if plausible for `figure` (prompt: tokens per counted token)."""
    if figure == "prompt":
        # units = policyd's count, amount = Ollama's tokens
        if units < MIN_UNITS[figure] or amount < 1:
            return None
    elif units < MIN_UNITS[figure] or amount <= 0:
        return None
    value = amount / units
    low, high = PLAUSIBLE[figure]
    return value if low <= value <= high else None


@attrs.frozen(kw_only=True)
class CalibrationRow:
    """One tenant's figures for one (model, path): observation counts and log values."""

    tenant: str
    model: str
    path: str
    prompt_n: float = 0.0
    prompt_log: float = math.log(PRIORS["prompt"])
    reply_n: float = 0.0
    reply_log: float = math.log(PRIORS["reply"])
    context_n: float = 0.0
    context_log: float = math.log(PRIORS["context"])

    def n(self, figure: str) -> float:
        value: float = getattr(self, f"{figure}_n")
        return value

    def log(self, figure: str) -> float:
        value: float = getattr(self, f"{figure}_log")
        return value


@attrs.frozen(kw_only=True)
class Step:
    """A batch's pull on one figure of one row: its `k` observations' median (log)."""

    k: int
    target: float


def pulled(log_value: float, n: float, step: Step) -> float:
    """`log_value` after one batch (the same rule as the SQL in writes.py).

    The first batch a tenant's figure sees sets it (its median is plausible by then);
    later ones pull it by at most STEP, weighted as one among all seen.
    """
    if n <= 0:
        return step.target
    rate = min(1.0, step.k * max(1.0 / (n + 1.0), RATE_FLOOR))
    return log_value + rate * max(-STEP, min(STEP, step.target - log_value))


def learn_row(row: CalibrationRow, steps: Mapping[str, Step]) -> CalibrationRow:
    """`row` after one batch's steps."""
    fields = attrs.asdict(row)
    for figure, step in steps.items():
        fields[f"{figure}_log"] = pulled(row.log(figure), row.n(figure), step)
        fields[f"{figure}_n"] = row.n(figure) + step.k
    return CalibrationRow(**fields)


def batch_steps(
    observations: Iterable[Observation],
) -> dict[tuple[str, str, str], dict[str, Step]]:
    """Per row, per figure: how many observations and their median, in log space."""
    grouped: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for obs in observations:
        row = grouped[(obs.tenant, obs.model, obs.path)]
        for figure in FIGURES:
            value = getattr(obs, figure)
            if value is not None:
                row[figure].append(math.log(value))
    return {
        key: {f: Step(k=len(v), target=statistics.median(v)) for f, v in figures.items()}
        for key, figures in grouped.items()
    }


class Calibration:
    """The figures of every tenant, and the base; owned by the daemon's loop."""

    def __init__(self, rows: Iterable[CalibrationRow] = ()) -> None:
        self._rows: dict[tuple[str, str, str], CalibrationRow] = {}
        self._base: dict[tuple[str, str, str], float] = {}
        self.replace(rows)

    def rows(self) -> Mapping[tuple[str, str, str], CalibrationRow]:
        return dict(self._rows)

    def replace(self, rows: Iterable[CalibrationRow]) -> None:
        """Take the stored figures (every node contributes) and recompute the base."""
        self._rows = {(r.tenant, r.model, r.path): r for r in rows}
        self._base = _bases(self._rows.values())

    def learn(self, observations: Sequence[Observation]) -> None:
        """Apply one batch's observations (the base moves only at `replace`)."""
        for key, steps in batch_steps(observations).items():
            tenant, model, path = key
            row = self._rows.get(key) or CalibrationRow(tenant=tenant, model=model, path=path)
            self._rows[key] = learn_row(row, steps)

    def base(self, figure: str, model: str, path: str = "") -> float:
        """The trusted figure for tenants without their own (not in log space)."""
        return math.exp(self._base.get((figure, model, path), math.log(PRIORS[figure])))

    def figure(self, figure: str, tenant: str, model: str, path: str) -> float:
        """The figure `tenant` is charged with: its own, blended with and bounded by the base."""
        scope = path if figure == "prompt" else ""
        base = self._base.get((figure, model, scope), math.log(PRIORS[figure]))
        own_n, own_log = self._own(figure, tenant, model, path)
        value = (own_n * own_log + BLEND * base) / (own_n + BLEND)
        bound = math.log(OWN_RANGE[figure])
        # Only the direction that lowers the tenant's own charge is bounded.
        value = min(value, base + bound) if figure in _INVERSE else max(value, base - bound)
        return math.exp(value)

    def _own(self, figure: str, tenant: str, model: str, path: str) -> tuple[float, float]:
        if figure == "prompt":
            row = self._rows.get((tenant, model, path))
            return (row.prompt_n, row.prompt_log) if row is not None else (0.0, 0.0)
        # Reply and context bytes per token are the model's, whatever the endpoint.
        n = total = 0.0
        for (t, m, _), row in self._rows.items():
            if t == tenant and m == model:
                n += row.n(figure)
                total += row.n(figure) * row.log(figure)
        return (n, total / n) if n > 0 else (0.0, 0.0)


def _bases(rows: Iterable[CalibrationRow]) -> dict[tuple[str, str, str], float]:
    """Per (figure, model, path or ""): the median tenant's own figure, within the range."""
    per_tenant: dict[tuple[str, str, str], dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        for figure in FIGURES:
            if row.n(figure) > 0:
                scope = row.path if figure == "prompt" else ""
                per_tenant[(figure, row.model, scope)][row.tenant].append(
                    (row.n(figure), row.log(figure))
                )
    bases = {}
    for (figure, model, scope), tenants in per_tenant.items():
        figures = []
        for parts in tenants.values():
            n = sum(p[0] for p in parts)
            if n >= MIN_N:
                figures.append(sum(p[0] * p[1] for p in parts) / n)
        if len(figures) >= MIN_TENANTS:
            prior = math.log(PRIORS[figure])
            spread = math.log(BASE_RANGE)
            median = statistics.median_low(figures)
            bases[(figure, model, scope)] = max(prior - spread, min(prior + spread, median))
    return bases
