"""syft.js 0.1.4's browser bundle, in headless Chromium, trains the gridfl-compiled 2NN.

The page loads tfjs-core's and syft.js's UMD bundles from the npm packages
(``tf-core.min.js``, syft.js ``dist/index.js``, the file its ``browser`` field names) and
runs the README flow against a live node over ``ws://``: the browser's own WebSocket,
XMLHttpRequest (the downloads and the speed test, cross-origin) and tfjs's CPU backend.
Expected values: the onnx plan on the same batch and the numpy reference step of
test_syftjs_compiled.py.
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
            page.set_default_timeout(120_000)
            for bundle in BUNDLES:
                page.add_script_tag(path=str(bundle))
            yield page
        finally:
            browser.close()


def test_browser_syftjs_trains_compiled_2nn(grid, mnist, two_nn, syftjs_page):
    params, plan = two_nn
    name = host_compiled(grid, two_nn, max_diffs=1)
    got = syftjs_page.evaluate(TRAIN, {
        "url": grid.ws_url, "model": name,
        "X": mnist.X.ravel().tolist(), "Xshape": list(mnist.X.shape),
        "y": mnist.y.ravel().tolist(), "yshape": list(mnist.y.shape),
    })
    loss, acc, *onnx_params = plan.execute(mnist.X, mnist.y, 64, LR, *params)
    ref_loss, _, ref_params = reference_step(mnist.X, mnist.y, params, LR)
    assert got["loss"] == pytest.approx(float(loss), abs=TOL)
    assert got["loss"] == pytest.approx(ref_loss, abs=TOL)
    assert got["accuracy"] == pytest.approx(float(acc), abs=1e-7)
    js = [np.asarray(v, np.float32).reshape(p.shape) for v, p in zip(got["params"], params,
                                                                     strict=True)]
    for j, o, r in zip(js, onnx_params, ref_params, strict=True):
        np.testing.assert_allclose(j, o, rtol=0, atol=TOL)
        np.testing.assert_allclose(j, r, rtol=0, atol=TOL)
    first = grid.status(name)["cycles"][0]
    assert (first["status"], first["reported"], first["result_checkpoint"]) == ("completed", 1, 2)
    for c, j in zip(grid.checkpoint(name, 2), js, strict=True):
        np.testing.assert_allclose(c, j, rtol=0, atol=1e-6)
