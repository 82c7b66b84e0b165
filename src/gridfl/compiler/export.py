"""FX graph -> ONNX plan bytes: export, check portability, attach gridfl metadata."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import re
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch.export import Dim
from torch.onnx._internal.exporter import _core as _onnx_core
from torch.onnx._internal.exporter import _registration

from gridfl._exceptions import CompileError
from gridfl.plan import FORMAT_VERSION

from .fuse import fuse_sgd_updates
from .ops import translation_table
from .recurrent import lower_scans

__all__ = ["STANDARD_DOMAINS", "attach_metadata", "export_onnx"]

STANDARD_DOMAINS = ("", "ai.onnx")
OPSET = 18

_OVERLOAD_RE = re.compile(r"OpOverload\(op='([^']+)', overload='([^']+)'\)")
_ATEN_RE = re.compile(r"(aten::[A-Za-z0-9_.]+)")


def _explain_export_error(e: Exception) -> str:
    """Name the op the exporter could not translate, with the exporter's one-line reason."""
    text = str(e)
    m = _OVERLOAD_RE.search(text)
    if m:
        name = m.group(1) if m.group(2) == "default" else f"{m.group(1)}.{m.group(2)}"
        return f"op {name} has no ONNX translation (it cannot run in a plan)"
    m = _ATEN_RE.search(text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    summary = next(
        (ln for ln in lines if "<class" in ln and "Error" in ln and "ConversionError" not in ln),
        lines[0] if lines else type(e).__name__,
    )
    if m:
        return f"op {m.group(1)} cannot be exported to ONNX ({summary})"
    return summary


def export_onnx(
    gm: torch.fx.GraphModule,
    args: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_inputs: Sequence[int] = (),
    min_batch: int = 1,
) -> onnx.ModelProto:
    """Export a traced step with a dynamic batch dimension on ``batch_inputs`` (dim 0)."""
    dynamic_shapes = None
    if batch_inputs:
        batch = Dim("batch", min=min_batch)
        dynamic_shapes = tuple(
            {0: batch} if i in batch_inputs else None for i in range(len(args))
        )
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    emit_stack_traces = torch.fx.config.do_not_emit_stack_traces
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        # Source locations on every node of the re-traced graph: ~15% of an export
        torch.fx.config.do_not_emit_stack_traces = True
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            prog = _onnx_core.export(
                gm,
                tuple(args),
                registry=_registry(),
                dynamic_shapes=dynamic_shapes,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as e:
        raise CompileError(f"ONNX export failed: {_explain_export_error(e)}") from e
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit_stack_traces
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)
    if prog is None:  # torch returns None only when asked to write a file
        raise CompileError("ONNX export returned no program")
    model = prog.model_proto
    _inline_functions(model)
    lower_scans(model)
    fuse_sgd_updates(model)
    check_portable(model)
    return model


@functools.cache
def _registry() -> _registration.ONNXRegistry:
    """torchlib's translations and gridfl's, built once per process.

    ``torch.onnx.export`` rebuilds this registry at every call by parsing the source of
    every torchlib function (~0.4 s); its ``_core.export`` takes one ready-made. torch
    is pinned to one minor version, which keeps these internal names stable."""
    registry = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)
    for torch_op, onnx_op in translation_table().items():
        registry.register_op(torch_op, onnx_op, is_complex=False)
    return registry


def _inline_functions(model: onnx.ModelProto) -> None:
    if model.functions:
        from onnx import inliner

        inlined = inliner.inline_local_functions(model)
        model.CopyFrom(inlined)


def check_portable(model: onnx.ModelProto) -> None:
    """Every node must be a standard ONNX op (no contrib or custom domains)."""
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise CompileError(
                f"the exported graph uses op {node.domain}::{node.op_type}, which is not a "
                "standard ONNX op; plans must run on any ONNX runtime"
            )


def attach_metadata(
    model: onnx.ModelProto, kind: str, inputs: list[dict], outputs: list[dict], extra=None
) -> bytes:
    """Write the gridfl metadata into ``metadata_props`` and return the model bytes."""
    graph_inputs = [i.name for i in model.graph.input]
    graph_outputs = [o.name for o in model.graph.output]
    if graph_inputs != [d["name"] for d in inputs]:
        raise CompileError(
            f"exported graph inputs {graph_inputs} do not match the declared roles "
            f"{[d['name'] for d in inputs]} (an unused input may have been dropped)"
        )
    if graph_outputs != [d["name"] for d in outputs]:
        raise CompileError(
            f"exported graph outputs {graph_outputs} do not match the declared roles"
        )
    del model.metadata_props[:]
    props = {
        "gridfl.format": FORMAT_VERSION,
        "gridfl.kind": kind,
        "gridfl.inputs": json.dumps(inputs, separators=(",", ":")),
        "gridfl.outputs": json.dumps(outputs, separators=(",", ":")),
        "gridfl.compiler": f"gridfl {_version()} torch {torch.__version__}",
    }
    props.update(extra or {})
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "gridfl"
    return model.SerializeToString()


def _version() -> str:
    try:
        from gridfl import __version__

        return __version__
    except Exception:  # noqa: BLE001  # pragma: no cover - a version only labels the file
        return "?"
