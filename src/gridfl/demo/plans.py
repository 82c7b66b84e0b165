"""The demo's initial model and plans: from the plan cache, or compiled in a child process."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from gridfl import state
from gridfl.datasets import Mnist, load_mnist
from gridfl.plan_cache import plan_key, resolve_cache

if TYPE_CHECKING:
    from gridfl.demo.options import DemoOptions

__all__ = ["compile_evaluation", "compile_training", "demo_plans"]


def demo_plans(options: DemoOptions, mnist: Mnist | None,
           step: Callable[[str], None]) -> tuple[bytes, bytes, bytes]:
    """The initial model and its training and evaluation plans: from the plan cache
    (read without torch) or compiled, then cached. The demo's models are named by
    gridfl's sources, which the key's versions cover (named without torch: the
    compiler's own keys describe a torch module)."""
    store = resolve_cache(None)
    key = plan_key("demo", {"model": options.model, "seed": options.seed},
                   batch_size=options.batch_size, loss="cross_entropy", lr=options.lr,
                   proximal_mu=options.proximal_mu)
    blobs = None if store is None else store.get(key)
    if store is not None and blobs is not None and set(blobs) == {
        "model", "training", "evaluation"
    }:
        step(f"plans found in the cache ({store.directory})")
        return blobs["model"], blobs["training"], blobs["evaluation"]
    if mnist is None:  # the shards were ready: MNIST only for the example batch
        mnist = load_mnist()
    x, y = mnist.x_train[: options.batch_size], mnist.y_train[: options.batch_size]
    # torch lives only in a short-lived compiler process: this one stays small.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        step(f"compiling the {options.model.upper()} training plan (imports PyTorch)")
        model_bytes, training_bytes = pool.submit(compile_training, options, x, y).result()
        step("compiling the evaluation plan")
        evaluation_bytes = pool.submit(compile_evaluation, options, x, y).result()
    if store is not None:
        store.put(key, {"model": model_bytes, "training": training_bytes,
                        "evaluation": evaluation_bytes})
        step(f"plans cached in {store.directory}")
    return model_bytes, training_bytes, evaluation_bytes


def compile_training(options: DemoOptions, x: np.ndarray, y: np.ndarray) -> tuple[bytes, bytes]:
    """The initial model's State bytes and its training plan's bytes (runs in a child
    process: imports torch)."""
    from gridfl.compiler import SGD, compile_training_plan
    from gridfl.demo.models import build_model

    model = build_model(options.model, seed=options.seed)
    training = compile_training_plan(
        model,
        loss="cross_entropy",
        optimizer=SGD(lr=options.lr),
        example_data=x,
        example_target=y,
        proximal_mu=options.proximal_mu,
        cache=False,  # the demo caches its plans, model included, in the parent
    )
    return state.dumps([p.detach().numpy() for p in model.parameters()]), training.to_bytes()


def compile_evaluation(options: DemoOptions, x: np.ndarray, y: np.ndarray) -> bytes:
    """The evaluation plan's bytes (a second call to the same child process, so the two
    compilations are told apart; the plan takes the parameters as inputs, so the model
    built again here only gives it its shapes)."""
    from gridfl.compiler import compile_evaluation_plan
    from gridfl.demo.models import build_model

    model = build_model(options.model, seed=options.seed)
    return compile_evaluation_plan(
        model, loss="cross_entropy", example_data=x, example_target=y, cache=False
    ).to_bytes()
