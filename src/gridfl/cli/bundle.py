"""``gridfl compile`` and ``gridfl host``: a model file to a bundle to a hosted process."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import click

from gridfl._exceptions import ConfigError
from gridfl.cli.common import admin_options, friendly, host_client

BUNDLE_FILE = "bundle.json"


@click.command(name="compile")
@click.argument("model_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the plan bundle to.")
@click.option("--proximal-mu", type=click.FloatRange(0), default=None,
              help="FedProx: add mu/2 ||w - w_global||^2 to the loss and host with strategy "
                   "fedprox at this mu (overrides the file's proximal_mu).")
@click.option("--tfjs", is_flag=True,
              help="Also write the tfjs variant of each plan, which syft.js 0.1.4 runs; "
                   "hosting the bundle attaches it next to the onnx plan.")
@friendly
def compile_(model_file: Path, out: Path, proximal_mu: float | None, tfjs: bool) -> None:
    """Compile MODEL_FILE (a Python file) into a plan bundle.

    The file defines ``model`` (a torch.nn.Module), ``example_data`` and
    ``example_target`` (one batch), and optionally ``loss`` ("cross_entropy",
    "cross_entropy_onehot" or "mse"; default cross_entropy), ``optimizer``
    (gridfl.compiler.SGD; default SGD(lr=0.1)), ``proximal_mu`` (FedProx), ``name``,
    ``version`` and ``client_config`` / ``server_config`` dicts to host it with.

    With ``--tfjs`` each plan gets its tfjs variant too (``*.tfjs.pb``), so syft.js
    0.1.4 trains the same model; an op it cannot run is named here, at compile time.
    """
    bundle = compile_bundle(model_file, out, proximal_mu=proximal_mu, tfjs=tfjs)
    click.echo(f"wrote {out}: {', '.join(sorted(bundle['files']))}")


def compile_bundle(model_file: Path, out: Path, *, proximal_mu: float | None = None,
                   tfjs: bool = False) -> dict:
    """Compile a model file into ``out`` (plans, initial model, bundle.json). With a
    ``proximal_mu`` (argument, else the file's) the training plan is FedProx's and the
    bundle's ``server_config.strategy`` fedprox at that mu, unless the file sets one.
    With ``tfjs`` the plans' tfjs variants are written too, and ``bundle.json`` names
    each plan's variants (``{"onnx": file, "tfjs": file}``) instead of its one file."""
    from gridfl import state
    from gridfl.compiler import SGD, compile_evaluation_plan, compile_training_plan

    ns = runpy.run_path(str(model_file))
    missing = [k for k in ("model", "example_data", "example_target") if k not in ns]
    if missing:
        raise ConfigError(f"{model_file} must define {', '.join(missing)}")
    model, loss = ns["model"], ns.get("loss", "cross_entropy")
    optimizer = ns.get("optimizer", SGD(lr=0.1))
    mu = proximal_mu if proximal_mu is not None else ns.get("proximal_mu")
    training = compile_training_plan(
        model, loss=loss, optimizer=optimizer, example_data=ns["example_data"],
        example_target=ns["example_target"], proximal_mu=mu, tfjs=tfjs,
    )
    server_config = dict(ns.get("server_config", {}))
    if mu is not None:
        server_config.setdefault("strategy", {"name": "fedprox", "proximal_mu": mu})
    evaluation = compile_evaluation_plan(
        model, loss=loss, example_data=ns["example_data"], example_target=ns["example_target"],
        tfjs=tfjs,
    )
    out.mkdir(parents=True, exist_ok=True)
    files = {"model.pb": state.dumps([p.detach().cpu().numpy() for p in model.parameters()])}
    plans: dict[str, str | dict[str, str]] = {}
    for plan_name, plan in (("training_plan", training), ("evaluation_plan", evaluation)):
        files[f"{plan_name}.onnx"] = plan.to_bytes()
        plans[plan_name] = f"{plan_name}.onnx"
        if tfjs:
            assert plan.tfjs is not None  # compiled with tfjs=True, or CompileError
            files[f"{plan_name}.tfjs.pb"] = plan.tfjs
            plans[plan_name] = {"onnx": f"{plan_name}.onnx", "tfjs": f"{plan_name}.tfjs.pb"}
    for fname, data in files.items():
        (out / fname).write_bytes(data)
    bundle = {
        "model": "model.pb",
        "plans": plans,
        "client_config": {
            "name": ns.get("name", model_file.stem),
            "version": str(ns.get("version", "1.0")),
            "lr": getattr(optimizer, "lr", 0.1),
            **ns.get("client_config", {}),
        },
        "server_config": server_config,
        "files": sorted([*files, BUNDLE_FILE]),
    }
    (out / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2))
    return bundle


# --------------------------------------------------------------------------- host
@click.command()
@admin_options
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--name", default=None, help="Process name (overrides the bundle's).")
@click.option("--version", "version_", default=None, help="Process version.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), default=None,
              help="JSON file with client_config / server_config to merge in.")
@friendly
def host(url, admin_token, admin_token_file, source: Path, name, version_, config_file) -> None:
    """Host SOURCE (a plan bundle directory, or a Python model file) on the node at URL."""
    if source.is_file():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            bundle = compile_bundle(source, Path(tmp))
            payload = bundle_payload(Path(tmp), bundle)
    else:
        bundle_path = source / BUNDLE_FILE
        if not bundle_path.exists():
            raise ConfigError(f"{source} is not a plan bundle (no {BUNDLE_FILE}); "
                              "make one with `gridfl compile`")
        payload = bundle_payload(source, json.loads(bundle_path.read_text()))
    if config_file is not None:
        extra = json.loads(config_file.read_text())
        for key in ("client_config", "server_config"):
            payload[key].update(extra.get(key, {}))
    if name:
        payload["client_config"]["name"] = name
    if version_:
        payload["client_config"]["version"] = version_
    with host_client(url, admin_token, admin_token_file) as client:
        client.host(**payload)
    cc = payload["client_config"]
    click.echo(f"hosted {cc['name']} {cc['version']} on {url}")


def bundle_payload(folder: Path, bundle: dict) -> dict:
    """The ``host`` arguments of a bundle: each plan's one file, or its variants' files."""
    plans = bundle.get("plans")
    if not isinstance(plans, dict) or not all(
        isinstance(f, str) or (isinstance(f, dict) and f and all(
            isinstance(v, str) and isinstance(vf, str) for v, vf in f.items()))
        for f in plans.values()
    ):
        raise ConfigError(
            f"{folder / BUNDLE_FILE}: 'plans' must map each plan name to a file name or to "
            '{variant: file name} (e.g. {"onnx": "training_plan.onnx"}); rewrite it with '
            "`gridfl compile`"
        )
    return {
        "model": (folder / bundle["model"]).read_bytes(),
        "plans": {n: (folder / f).read_bytes() if isinstance(f, str)
                  else {variant: (folder / vf).read_bytes() for variant, vf in f.items()}
                  for n, f in plans.items()},
        "client_config": dict(bundle["client_config"]),
        "server_config": dict(bundle.get("server_config", {})),
    }
