"""syft.js 0.1.4's browser bundle, in headless Chromium, trains the gridfl-compiled 2NN
and CNN.

The page loads tfjs-core's and syft.js's UMD bundles from the npm packages
(``tf-core.min.js``, syft.js ``dist/index.js``, the file its ``browser`` field names) and
runs the README flow against a live node over ``ws://``: the browser's own WebSocket,
XMLHttpRequest (the downloads and the speed test, cross-origin) and tfjs's CPU backend.
Expected values: the onnx plan on the same batch, and the reference steps of
compiled_models.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from .compiled_models import LR, TOL, host_compiled, reference_step
from .syftjs_runner import HERE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BUNDLES = [
    HERE / "node_modules" / "@tensorflow" / "tfjs-core" / "dist" / "tf-core.min.js",
    HERE / "node_modules" / "@openmined" / "syft.js" / "dist" / "index.js",
]

TRAIN = """async ({url, model, X, Xshape, y, yshape}) => {
  await tf.setBackend('cpu');  // the backend syft.js's Node runs use: same float32 kernels
  const worker = new syft.Syft({url, verbose: true});
  const job = await worker.newJob({modelName: model, modelVersion: '1.0'});
  return await new Promise((resolve, reject) => {
    job.on('accepted', async ({model, clientConfig}) => {
      try {
        const [loss, acc, ...updated] = await job.plans['training_plan'].execute(
          worker, tf.tensor(X, Xshape), tf.tensor(y, yshape),
          tf.scalar(clientConfig.batch_size), tf.scalar(clientConfig.lr), ...model.params);
        await job.report(await model.createSerializedDiff(updated));
        resolve({loss: (await loss.data())[0], accuracy: (await acc.data())[0],
                 params: await Promise.all(updated.map(async (p) => Array.from(await p.data())))});
      } catch (err) { reject(new Error(String(err && err.message))); }
    });
    job.on('rejected', () => reject(new Error('rejected')));
    job.on('error', (err) => reject(new Error(String(err && err.message))));
    job.start();
  });
}"""


@pytest.fixture(scope="module")
def syftjs_page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.set_default_timeout(300_000)  # the CNN step takes ~1 min on a busy CPU
            for bundle in BUNDLES:
                page.add_script_tag(path=str(bundle))
            yield page
        finally:
            browser.close()


def _train(page, grid, name, X, Y) -> tuple[dict, list[np.ndarray]]:
    got = page.evaluate(TRAIN, {
        "url": grid.ws_url, "model": name,
        "X": X.ravel().tolist(), "Xshape": list(X.shape),
        "y": Y.ravel().tolist(), "yshape": list(Y.shape),
    })
    return got, [np.asarray(v, np.float32) for v in got["params"]]


def _check_checkpoint(grid, name, js) -> None:
    first = grid.status(name)["cycles"][0]
    assert (first["status"], first["reported"], first["result_checkpoint"]) == ("completed", 1, 2)
    for c, j in zip(grid.checkpoint(name, 2), js, strict=True):
        np.testing.assert_allclose(c, j, rtol=0, atol=1e-6)


def test_browser_syftjs_trains_compiled_2nn(grid, mnist, two_nn, syftjs_page):
    params, plan = two_nn
    name = host_compiled(grid, two_nn, max_diffs=1)
    got, flat = _train(syftjs_page, grid, name, mnist.X, mnist.y)
    js = [f.reshape(p.shape) for f, p in zip(flat, params, strict=True)]
    loss, acc, *onnx_params = plan.execute(mnist.X, mnist.y, 64, LR, *params)
    ref_loss, _, ref_params = reference_step(mnist.X, mnist.y, params, LR)
    assert got["loss"] == pytest.approx(float(loss), abs=TOL)
    assert got["loss"] == pytest.approx(ref_loss, abs=TOL)
    assert got["accuracy"] == pytest.approx(float(acc), abs=1e-7)
    for j, o, r in zip(js, onnx_params, ref_params, strict=True):
        np.testing.assert_allclose(j, o, rtol=0, atol=TOL)
        np.testing.assert_allclose(j, r, rtol=0, atol=TOL)
    _check_checkpoint(grid, name, js)


def test_browser_syftjs_trains_compiled_cnn(grid, cnn, syftjs_page):
    name = host_compiled(grid, (cnn.params, cnn.plan), max_diffs=1, batch_size=8)
    got, flat = _train(syftjs_page, grid, name, cnn.X, cnn.Y)
    js = [f.reshape(p.shape) for f, p in zip(flat, cnn.params, strict=True)]
    loss, _, *onnx_params = cnn.plan.execute(cnn.X, cnn.Y, 8, LR, *cnn.params)
    eager_loss, eager = cnn.eager_step()
    assert got["loss"] == pytest.approx(float(loss), abs=TOL)
    assert got["loss"] == pytest.approx(eager_loss, abs=TOL)
    for j, o, e in zip(js, onnx_params, eager, strict=True):
        np.testing.assert_allclose(j, o, rtol=0, atol=TOL)
        np.testing.assert_allclose(j, e, rtol=0, atol=TOL)
    _check_checkpoint(grid, name, js)
