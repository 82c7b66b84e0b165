"""Diff validation and the running aggregate (pure numpy, no I/O).

The node keeps, per cycle, running sums folded in as reports arrive, so memory is O(model)
however many workers report (float32 for an all-float32 model, which halves what each report
writes; float64 when the model has float64 or integer tensors):

* ``sum_w`` = sum of ``num_samples * diff`` over reports that carried ``num_samples``
  (``count_w`` reports, total weight ``weight``);
* ``sum_x`` = sum of ``diff`` over reports without ``num_samples`` (``count_x`` reports).

No sequence of accepted reports can overflow these sums or publish a non-finite model:
:func:`validate_diff` bounds every diff value to ``±MAX_DIFF_VALUE`` and ``num_samples`` is
at most 2**53 - 1, so one float32 sum stays below 3.4e38 for up to 3e10 reports, and
:func:`apply_diff` refuses (:class:`ModelError`) a result that does not fit its dtype (a
model drifted past float32's range), which the node treats as an expired cycle.

The cycle's aggregate (see :func:`mean_diff`) is the plain mean when no report carried
``num_samples``, the ``num_samples``-weighted mean when all did, and in a mixed cycle the
weighted mean where each report without ``num_samples`` weighs the mean ``num_samples`` of
the others. With a hosted iterative averaging plan, ``sum_x`` holds the plan's running
average instead (PyGrid: ``avg = plan(avg, diff, n)``).

:class:`RunningSums` holds one cycle's sums; a :class:`Strategy` folds each report into
them and turns them into the next model (:class:`FedAvg`, :class:`IterativeAveraging`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gridfl import privacy
from gridfl._exceptions import InvalidRequestError, ModelError

#: largest magnitude of a diff value: a trained weight moving by 1e12 in one cycle is no
#: longer training, and the bound keeps float32 sums of num_samples-weighted diffs finite
#: (1e12 x (2**53 - 1) x 3e10 reports < 3.4e38)
MAX_DIFF_VALUE = 1e12
#: a sum of squares this small has every term, however rounded, under MAX_DIFF_VALUE**2
_MAX_SQUARED_SUM = MAX_DIFF_VALUE**2 * (1 - 2**-20)
_DOT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


_FLOAT32 = np.dtype(np.float32)
# values of a weighted diff scaled at a time: 1-2 MiB, within L2; 16 Ki-value chunks cost
# more in numpy calls than they save (a CNN report's fold 0.9 ms against 0.5 ms)
_SCALE_CHUNK = 1 << 18


@dataclass(frozen=True)
class ModelSpec:
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    total: int
    acc_dtype: np.dtype = _FLOAT32

    @classmethod
    def of(cls, params: Sequence[np.ndarray]) -> ModelSpec:
        shapes = tuple(tuple(int(d) for d in p.shape) for p in params)
        sizes = tuple(int(p.size) for p in params)
        offsets = tuple(int(x) for x in np.cumsum((0, *sizes))[:-1])
        dtypes = tuple(np.dtype(p.dtype) for p in params)
        narrow = all(dt.kind == "f" and dt.itemsize <= 4 for dt in dtypes)
        acc = np.dtype(np.float32 if narrow else np.float64)
        return cls(shapes, dtypes, offsets, sizes, sum(sizes), acc)

    @property
    def all_float(self) -> bool:
        """Every tensor is floating point (what compressed diffs need)."""
        return all(dt.kind == "f" for dt in self.dtypes)

    def describe(self, i: int) -> str:
        return f"{self.dtypes[i]}{list(self.shapes[i])}"


def validate_diff(arrays: Sequence[np.ndarray], spec: ModelSpec) -> None:
    """Refuse a diff that does not match the model: count, shapes, dtypes, finite values."""
    if len(arrays) != len(spec.shapes):
        raise InvalidRequestError(
            f"diff has {len(arrays)} tensors; the model has {len(spec.shapes)}"
        )
    for i, a in enumerate(arrays):
        if tuple(a.shape) != spec.shapes[i] or np.dtype(a.dtype) != spec.dtypes[i]:
            raise InvalidRequestError(
                f"diff tensor {i} is {a.dtype}{list(a.shape)}; the model's is {spec.describe(i)}"
            )
        if a.size == 0 or a.dtype.kind == "b":
            continue
        if a.dtype in _DOT_DTYPES:
            # One BLAS pass: a sum of squares (non-negative terms, so never below any
            # one of them when rounded) under the bound's square means every value is
            # within it; NaN, Inf or overflow fail the comparison and take the exact way.
            flat = a.reshape(-1)
            if float(np.dot(flat, flat)) <= _MAX_SQUARED_SUM:
                continue
        # min and max are two passes with no temporary array; NaN fails both comparisons
        lo, hi = float(a.min()), float(a.max())
        if not (lo >= -MAX_DIFF_VALUE and hi <= MAX_DIFF_VALUE):
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise InvalidRequestError(f"diff tensor {i} has NaN or infinite values")
            raise InvalidRequestError(
                f"diff tensor {i} has values beyond ±{MAX_DIFF_VALUE:g} (from {lo:g} to {hi:g}); "
                "a diff is original - trained parameters"
            )


def clip_l2(diff: Sequence[np.ndarray], clip_norm: float | None) -> Sequence[np.ndarray]:
    """Scale the whole diff (all tensors together) down to L2 norm ``clip_norm``, if above.

    >>> [a.tolist() for a in clip_l2([np.array([3.0]), np.array([4.0])], 2.5)]
    [[1.5], [2.0]]
    """
    if clip_norm is None:
        return diff
    # the one L2 clip (gridfl.privacy, float64 norm); the diff keeps its dtype here
    clipped, norm = privacy.clip(diff, clip_norm)
    if norm <= clip_norm:
        return diff
    return [c.astype(a.dtype) for a, c in zip(diff, clipped, strict=True)]


def new_sum(spec: ModelSpec) -> np.ndarray:
    return np.zeros(spec.total, dtype=spec.acc_dtype)


class DenseDiff(list):
    """A validated diff as its tensors (a list), with :meth:`fold_into` as
    :class:`~gridfl.compression.CompressedDiff` has: whatever a report decoded to adds
    itself to a running sum.

    >>> total = np.zeros(3, np.float32)
    >>> DenseDiff([np.array([1.0]), np.array([2.0, 3.0])]).fold_into(total, 2)
    >>> total.tolist()
    [2.0, 4.0, 6.0]
    """

    def fold_into(self, total: np.ndarray, weight: float | None = None) -> None:
        """``total += weight x concat(tensors)`` in place (``total`` flat), one tensor at a
        time, with no float64 round trip (a weight of ``None`` adds the tensors as they
        are)."""
        at = 0
        # the weight in the sum's dtype, and the buffer its chunks are scaled into
        scaling = None if weight is None else (
            total.dtype.type(weight), np.empty(min(_SCALE_CHUNK, total.size), total.dtype))
        for a in self:
            flat = np.asarray(a).reshape(-1)
            view = total[at : at + flat.size]
            at += flat.size
            if scaling is None:
                np.add(view, flat, out=view, casting="unsafe")
            else:
                _add_scaled(view, flat, *scaling)
        if at != total.size:
            raise ValueError(f"the diff has {at} values; the sum has {total.size}")


def _add_scaled(view: np.ndarray, flat: np.ndarray, scale, scaled: np.ndarray) -> None:
    """``view += scale x flat`` chunk by chunk: a scaled chunk is still in cache when it is
    added, where a model-sized temporary costs its page faults and one more pass."""
    for start in range(0, flat.size, _SCALE_CHUNK):
        part = flat[start : start + _SCALE_CHUNK]
        out = scaled[: part.size]
        np.multiply(part, scale, out=out, casting="unsafe")
        into = view[start : start + _SCALE_CHUNK]
        np.add(into, out, out=into)


def fold(total: np.ndarray, arrays: Sequence[np.ndarray], spec: ModelSpec, weight=None) -> None:
    """``total += weight * concat(arrays)`` in place: the diff's own ``fold_into``
    (:class:`DenseDiff`, a compressed diff from its compressed form), or as a
    :class:`DenseDiff` for a plain sequence of tensors."""
    fold_into = getattr(arrays, "fold_into", None)
    if fold_into is None:
        if len(arrays) != len(spec.sizes):
            raise ValueError(f"the diff has {len(arrays)} tensors; the model has {len(spec.sizes)}")
        fold_into = DenseDiff(arrays).fold_into
    fold_into(total, weight)


def mean_diff(
    sum_w: np.ndarray | None,
    count_w: int,
    weight: float,
    sum_x: np.ndarray | None,
    count_x: int,
) -> np.ndarray:
    """The cycle's aggregate diff as one float64 vector (rule in the module docstring).
    A side's sum is None exactly when its count is 0."""
    if count_w == 0:
        assert sum_x is not None
        return sum_x.astype(np.float64) / count_x
    assert sum_w is not None
    if count_x == 0:
        return sum_w.astype(np.float64) / weight
    assert sum_x is not None
    mean_weight = weight / count_w
    return (sum_w.astype(np.float64) + mean_weight * sum_x.astype(np.float64)) / (
        weight + mean_weight * count_x
    )


def split(flat: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    """Split a flat vector into per-parameter arrays (views, float64)."""
    return [
        flat[off : off + size].reshape(shape)
        for off, size, shape in zip(spec.offsets, spec.sizes, spec.shapes, strict=True)
    ]


def apply_diff(params: Sequence[np.ndarray], flat: np.ndarray, spec: ModelSpec) -> list:
    """``new = current - aggregate``, computed in float64 and cast back to each dtype.

    Raises :class:`ModelError` when a value does not fit its dtype (beyond float32's range,
    or an integer dtype's): the caller keeps the current checkpoint.
    """
    out = []
    for i, (p, d) in enumerate(zip(params, split(flat, spec), strict=True)):
        if p.dtype.kind == "b":
            out.append((p - np.rint(d)).astype(p.dtype))
            continue
        new = p - np.rint(d) if p.dtype.kind in "iu" else p.astype(np.float64) - d
        if new.size and p.dtype.kind in "iu":
            info = np.iinfo(p.dtype)
            fits = info.min <= new.min() and new.max() <= info.max
        else:
            with np.errstate(over="ignore"):  # overflow is what the check below finds
                new = new.astype(p.dtype)
            fits = bool(np.isfinite(new).all())
        if not fits:
            raise ModelError(
                f"the aggregate moves model tensor {i} ({spec.describe(i)}) beyond the range "
                f"of {p.dtype}"
            )
        out.append(new.astype(p.dtype, copy=False))
    return out


def averaging_step(plan, avg: np.ndarray, item: Sequence[np.ndarray], n: int, spec: ModelSpec):
    """One call of an iterative averaging plan: ``avg = plan(avg, item, n)`` (flat float64)."""
    avg_arrays = [a.astype(dt) for a, dt in zip(split(avg, spec), spec.dtypes, strict=True)]
    args = []
    for slot in plan.inputs:
        if slot.role == "average":
            args.append(avg_arrays[slot.index])
        elif slot.role == "item":
            args.append(np.asarray(item[slot.index]))
        elif slot.role == "count":
            dtype = np.dtype(slot.dtype) if slot.dtype is not None else np.float32
            shape = tuple(slot.shape) if slot.shape is not None else (1,)
            shape = tuple(1 if not isinstance(d, int) else d for d in shape)
            args.append(np.full(shape, n, dtype=dtype))
        else:  # pragma: no cover - refused when hosting
            raise InvalidRequestError(f"averaging plan input role {slot.role!r} unsupported")
    outs = plan.execute(*args)
    new = [None] * len(spec.shapes)
    for slot, value in zip(plan.outputs, outs, strict=True):
        if slot.role == "average":
            new[slot.index] = np.asarray(value)
    result = np.empty(spec.total, dtype=spec.acc_dtype)
    for off, size, a in zip(spec.offsets, spec.sizes, new, strict=True):
        result[off : off + size] = np.asarray(a, dtype=np.float64).reshape(-1)
    return result


@dataclass(eq=False)
class StrategyState:
    """What a strategy carries from one cycle to the next: its step count, named flat
    float64 vectors (a server optimizer's moments) and JSON ``meta`` (scalars, such as an
    accountant's or an adaptive clip's). Persisted beside the checkpoint it produced, so
    the cycle trained on that checkpoint resumes from exactly this.

    >>> s = StrategyState(2, {"m": np.array([0.5, -1.0]), "c": np.array([3.0])}, {"eps": 1.5})
    >>> back = StrategyState.decode(*s.encode())
    >>> back.tensors["m"].tolist(), back.tensors["c"].tolist(), back.meta
    ([0.5, -1.0], [3.0], {'eps': 1.5})
    """

    step: int
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> tuple[int, dict[str, Any], bytes]:
        """``(step, layout, bytes)``: the vectors concatenated in the layout's order."""
        flat = {n: np.asarray(v, dtype=np.float64).reshape(-1) for n, v in self.tensors.items()}
        layout = {"tensors": [[n, int(v.size)] for n, v in flat.items()], "meta": self.meta}
        data = np.concatenate(list(flat.values())).tobytes() if flat else b""
        return self.step, layout, data

    @classmethod
    def decode(cls, step: int, layout: dict[str, Any], data: bytes) -> StrategyState:
        values = np.frombuffer(data, dtype=np.float64)
        tensors, at = {}, 0
        for name, size in layout["tensors"]:
            tensors[name] = values[at : at + size].copy()
            at += size
        return cls(step, tensors, dict(layout.get("meta") or {}))


@dataclass(eq=False)
class RunningSums:
    """One cycle's folded reports (the sums of the module docstring), O(model) in memory.

    ``version`` counts the folds stored so far (the aggregate row's ``version``, which
    tells whether an in-memory copy is current); ``changed`` names the side of the last
    fold, ``"w"`` or ``"x"``, whose columns are the ones to store, or ``"kept"`` when a
    strategy that needs every diff kept the report as is (``kept``, one flat vector, stored
    as its own row). ``diffs`` holds every kept diff of the cycle (one row each), read back
    only when the cycle completes.
    """

    spec: ModelSpec
    version: int = 0
    count_w: int = 0
    weight: float = 0.0
    sum_w: np.ndarray | None = None
    count_x: int = 0
    sum_x: np.ndarray | None = None
    changed: str | None = None
    kept: np.ndarray | None = None
    diffs: np.ndarray | None = field(default=None, repr=False)

    def keep(self, diff: Sequence[np.ndarray]) -> None:
        """Count one validated diff and keep it whole (strategies that need every diff)."""
        flat = new_sum(self.spec)
        fold(flat, diff, self.spec)
        self.kept = flat
        self.count_x += 1
        self.changed = "kept"

    def fold(self, diff: Sequence[np.ndarray], num_samples: int | None = None) -> None:
        """Add one validated diff: weighted by ``num_samples`` when given, else unweighted."""
        if num_samples is not None:
            if self.sum_w is None:
                self.sum_w = new_sum(self.spec)
            fold(self.sum_w, diff, self.spec, weight=num_samples)
            self.count_w += 1
            self.weight += num_samples
            self.changed = "w"
        else:
            if self.sum_x is None:
                self.sum_x = new_sum(self.spec)
            fold(self.sum_x, diff, self.spec)
            self.count_x += 1
            self.changed = "x"

    def result(self) -> np.ndarray:
        """The mean diff (:func:`mean_diff`) as one flat float64 vector."""
        return mean_diff(self.sum_w, self.count_w, self.weight, self.sum_x, self.count_x)


def unmasked_sums(total: np.ndarray, reports: int, params: Any, spec: ModelSpec) -> RunningSums:
    """A secure-aggregation cycle's unmasked sum ``[sum w, sum w*q...]`` (signed, from
    :class:`gridfl.secagg.NodeSession`) of ``reports`` weighted inputs as running sums, as
    if each report had been folded with its weight."""
    from gridfl.secagg.quantize import decode

    sums = RunningSums(spec)
    sums.count_w = reports
    sums.weight = float(total[0])
    sums.sum_w = decode(total, params) * sums.weight
    return sums


class Strategy:
    """How a cycle's reports become the next model: the seam for aggregation rules.

    The node calls :meth:`fold` once per accepted report, inside the report's transaction
    (the diff is already validated against the model), and :meth:`aggregate` once when the
    cycle completes, with the current parameters and the :class:`StrategyState` persisted
    with them (``None`` before the first step). ``aggregate`` is :meth:`combine` (the
    cycle's aggregate diff, one flat float64 vector) then :meth:`step` (apply it; returns
    the new parameters and the state to persist, ``None`` for a stateless rule). Raising
    :class:`~gridfl._exceptions.ModelError` (as :func:`apply_diff` does for a result that
    does not fit the model's dtypes) expires the cycle and keeps the current checkpoint.
    This base class is FedAvg: ``fold`` clips each report to ``clip_norm`` (L2, all
    tensors together, ``None``: no clip) and adds it to the sums, ``combine`` is their
    mean, ``step`` is ``new = current - mean``.

    * **server optimizers** (:mod:`gridfl.server.optimizers`) override ``step``: the mean
      diff is a pseudo-gradient, their moments the state.
    * **robust rules** (:mod:`gridfl.server.robust`) set ``needs_every_diff = True``: their
      ``fold`` keeps each diff (:meth:`RunningSums.keep`, one database row per report), and
      ``combine`` gets them all in ``sums.diffs``.
    * **secure aggregation** sets ``sums_only = True`` (a class declaring both flags is
      refused): its ``fold`` adds masked vectors, its ``combine`` unmasks the sum; any
      ``step`` (FedAvg's, an optimizer's) then applies it.
    * **differential privacy** (:mod:`gridfl.server.privacy`) wraps the strategy: it clips
      in ``fold`` (before the sum), and its ``combine`` adds the noise to the sum and
      divides by a fixed denominator; the inner ``step`` (an optimizer's) comes after, as
      post-processing; the accountant and the adaptive clip norm live in its per-cycle
      ledger (table ``privacy_cycles``).
    """

    #: the rule needs every diff of the cycle, not their sums (median, Krum)
    needs_every_diff: ClassVar[bool] = False
    #: the rule must work from the sum alone (secure aggregation): no per-diff rule with it
    sums_only: ClassVar[bool] = False

    def __init__(self, *, clip_norm: float | None = None) -> None:
        #: per-report L2 bound, applied before the report is folded or kept
        self.clip_norm = clip_norm

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.needs_every_diff and cls.sums_only:
            raise TypeError(
                f"{cls.__name__}: a rule that needs every diff cannot work from their sum alone"
            )

    def fold(
        self, sums: RunningSums, diff: Sequence[np.ndarray], num_samples: int | None
    ) -> None:
        """Fold one report into the cycle's sums, clipped to ``clip_norm`` first."""
        sums.fold(clip_l2(diff, self.clip_norm), num_samples)

    def combine(self, sums: RunningSums) -> np.ndarray:
        """The cycle's aggregate diff, one flat float64 vector: the (weighted) mean diff."""
        return sums.result()

    def step(
        self,
        update: np.ndarray,
        params: Sequence[np.ndarray],
        spec: ModelSpec,
        state: StrategyState | None,
    ) -> tuple[list[np.ndarray], StrategyState | None]:
        """``(new params, state to persist)``: ``new = current - update``, no state."""
        return apply_diff(params, update, spec), None

    def aggregate(
        self, sums: RunningSums, params: Sequence[np.ndarray], state: StrategyState | None = None
    ) -> tuple[list[np.ndarray], StrategyState | None]:
        """``(new params, state to persist)`` from the cycle's sums and current params."""
        return self.step(self.combine(sums), params, sums.spec, state)

    def describe(self, state: StrategyState) -> dict[str, Any]:
        """A short JSON summary of the persisted state, for the status."""
        return {}


class FedAvg(Strategy):
    """``new = current - mean diff`` (weighted as the module docstring says); no state."""


class IterativeAveraging(Strategy):
    """A hosted averaging plan (PyGrid's ``avg = plan(avg, diff, n)``): ``sum_x`` holds the
    running average, the first diff as is; ``num_samples`` is ignored."""

    def __init__(self, plan) -> None:
        super().__init__()
        self.plan = plan

    def fold(self, sums, diff, num_samples):
        if sums.count_x == 0:
            sums.sum_x = None  # the first diff starts the average
            sums.fold(diff)
        else:
            sums.sum_x = averaging_step(self.plan, sums.sum_x, diff, sums.count_x, sums.spec)
            sums.count_x += 1
            sums.changed = "x"

    def combine(self, sums):
        assert sums.sum_x is not None  # a cycle completes with at least one report
        return sums.sum_x.astype(np.float64)


FED_AVG = FedAvg()
