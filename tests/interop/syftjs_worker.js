// Drives the published syft.js 0.1.4 client the way its README does, against a gridfl
// node. Configuration comes as one JSON argument; every event is printed as one JSON
// line on stdout for the Python test to assert on.
//
//   node syftjs_worker.js '{"url": "ws://127.0.0.1:5000", "model": "mnist", "version": "1.0",
//                           "authToken": null, "batch": "/tmp/batch", "train": true}'
//
// "batch" names a prefix: <batch>.X.f32 and <batch>.y.f32 hold the float32 data and
// one-hot targets (little-endian), <batch>.json their shapes.
'use strict';

const fs = require('fs');
// Browser globals syft.js 0.1.4 expects, from their usual Node.js polyfills.
global.WebSocket = require('ws');
global.XMLHttpRequest = require('xhr2');
// A fresh connection per XHR: Node's global agent keeps sockets alive and reuses them, and
// a request written onto a socket the server has just closed fails with ECONNRESET, where a
// browser would retry it. (syft.js's speed test sends its 64 MB upload right after the
// ping and download requests.)
global.XMLHttpRequest.nodejsSet({ httpAgent: new (require('http').Agent)({ keepAlive: false }) });
// xhr2 writes a request body in one go and never fires the `xhr.upload` events a browser
// fires. syft.js 0.1.4's upload speed test listens only to those (upload.onprogress,
// upload.onload) and would wait forever. Upload in 1 MiB chunks and fire them, as a
// browser does. (Nothing else here changes what syft.js sends.)
global.XMLHttpRequest.XMLHttpRequestUpload.prototype._startUpload = function (request) {
  const body = this._body;
  const xhr = this._request;
  if (!body || body.length === 0) {
    request.end();
    return;
  }
  const step = 1 << 20;
  let sent = 0; // bytes handed to the socket
  let over = false; // the last upload event has fired, or the caller aborted
  const fire = (type) => {
    const event = new global.XMLHttpRequest.ProgressEvent(type);
    event.lengthComputable = true;
    event.loaded = sent;
    event.total = body.length;
    this.dispatchEvent(event);
  };
  const end = (type, why) => {
    if (over) return;
    over = true;
    if (why) process.stderr.write(`upload ${type} after ${sent} of ${body.length} bytes: ${why}\n`);
    if (type === 'load') fire('progress');
    fire(type);
    fire('loadend');
  };
  // The xhr fires loadend when its response is complete, after 'error' when it fails, and
  // after 'abort' (syft.js aborts once it has measured enough). The node can read the last
  // chunk and answer before that chunk's write callback runs: every byte was sent, so the
  // upload has loaded. (Stopping silently there left syft.js waiting forever: the CI
  // flake.) Ended any other way, the upload failed, and a browser says so on xhr.upload,
  // the only object syft.js's upload test listens to.
  let failure = null;
  xhr.addEventListener('abort', () => {
    over = true;
  });
  xhr.addEventListener('error', () => {
    failure = 'the connection failed';
  });
  xhr.addEventListener('loadend', () => {
    if (failure === null && sent >= body.length) end('load');
    else end('error', failure || `the node answered first (status ${xhr.status})`);
  });
  const next = () => {
    if (over) return;
    if (sent > 0) fire('progress');
    if (sent >= body.length) {
      request.end();
      end('load');
      return;
    }
    const chunk = body.subarray(sent, sent + step);
    sent += chunk.length;
    request.write(chunk, () => setImmediate(next));
  };
  fire('loadstart');
  next();
};
// window.name: the speed test's AvgCollector constructor reads the bare browser global `name`
// ("this.name = name"), a ReferenceError in Node.js without it.
if (typeof global.name === 'undefined') global.name = '';
const tf = require('@tensorflow/tfjs-core');
const { Syft } = require('@openmined/syft.js');

const cfg = JSON.parse(process.argv[2]);
const emit = (event, data) => process.stdout.write(JSON.stringify({ event, ...data }) + '\n');

function loadBatch(prefix) {
  const shapes = JSON.parse(fs.readFileSync(prefix + '.json', 'utf8'));
  const read = (suffix, shape) => {
    const buf = fs.readFileSync(prefix + suffix);
    return tf.tensor(new Float32Array(buf.buffer, buf.byteOffset, buf.length / 4), shape);
  };
  return [read('.X.f32', shapes.X), read('.y.f32', shapes.y)];
}

async function main() {
  const syft = new Syft({ url: cfg.url, verbose: true, authToken: cfg.authToken });
  let job;
  try {
    job = await syft.newJob({ modelName: cfg.model, modelVersion: cfg.version });
  } catch (err) {
    emit('error', { message: err.message, during: 'newJob' });
    return;
  }
  const done = new Promise((resolve) => {
    job.on('accepted', async ({ model, clientConfig }) => {
      try {
        emit('accepted', {
          clientConfig,
          requestKey: job.cycleParams.request_key,
          modelId: job.cycleParams.model_id,
          planIds: job.cycleParams.plans,
          workerId: syft.worker_id,
          shapes: model.params.map((p) => p.shape),
          plans: Object.keys(job.plans),
        });
        if (cfg.train) {
          const [X, y] = loadBatch(cfg.batch);
          const batchSize = tf.scalar(clientConfig.batch_size);
          const lr = tf.scalar(clientConfig.lr);
          const [loss, acc, ...updated] = await job.plans[cfg.plan || 'training_plan'].execute(
            syft, X, y, batchSize, lr, ...model.params);
          const diff = await model.createSerializedDiff(updated);
          await job.report(diff);
          emit('reported', { loss: (await loss.data())[0], accuracy: (await acc.data())[0] });
          // the updated params themselves (float32, concatenated), for tests comparing them
          // with another runtime; a file, as stdout is cut short by process.exit
          if (cfg.paramsOut) {
            const parts = await Promise.all(updated.map(async (p) => Buffer.from((await p.data()).buffer)));
            fs.writeFileSync(cfg.paramsOut, Buffer.concat(parts));
            emit('params', { path: cfg.paramsOut });
          }
        }
      } catch (err) {
        emit('error', { message: err.message, during: 'accepted', cause: String(err.cause || '') });
      }
      resolve();
    });
    job.on('rejected', ({ timeout }) => {
      emit('rejected', { timeout: timeout === undefined ? '<undefined>' : timeout });
      resolve();
    });
    job.on('error', (err) => {
      emit('error', { message: err.message, during: 'start' });
      resolve();
    });
  });
  await job.start();
  await done;
}

main()
  .catch((err) => emit('error', { message: String(err && err.message), during: 'main' }))
  .finally(() => process.exit(0));
