// onnxq edge runner: page side. The driver (drive.mjs) calls window.onnxqRun(request) and gets back outputs and timings.
// request: {model: URL, externalData: [{path, data: URL}], ep: "wasm" | "webgpu", threads, warmup, runs,
//           inputs: [{name, dtype: "int64", dims, b64}], timing: [{name, dtype, dims, b64}] (optional second feed
//           timed alone, e.g. a one-token run), outputs: [names] or null, verbose: bool}
import * as ort from './node_modules/onnxruntime-web/dist/ort.all.min.mjs';

ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
ort.env.wasm.proxy = false;

const TYPED = {
  int64: (buf) => new BigInt64Array(buf), int32: (buf) => new Int32Array(buf),
  float32: (buf) => new Float32Array(buf), float16: (buf) => new Uint16Array(buf),
};

function fromB64(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes.buffer;
}

function toB64(typed) {
  const bytes = new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
  let out = '';
  for (let i = 0; i < bytes.length; i += 0x8000) out += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(out);
}

function feeds(specs) {
  const f = {};
  for (const s of specs) f[s.name] = new ort.Tensor(s.dtype, TYPED[s.dtype](fromB64(s.b64)), s.dims);
  return f;
}

const QUIET = {logSeverityLevel: 3};

async function timeRuns(session, feed, warmup, runs) {
  for (let i = 0; i < warmup; i++) await session.run(feed, QUIET);
  const ms = [];
  for (let i = 0; i < runs; i++) {
    const t = performance.now();
    await session.run(feed, QUIET);
    ms.push(performance.now() - t);
  }
  return ms;
}

async function webgpuInfo() {
  if (!('gpu' in navigator)) return {available: false, reason: 'navigator.gpu is undefined (WebGPU not exposed)'};
  try {
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return {available: false, reason: 'navigator.gpu.requestAdapter() returned null (no adapter)'};
    const info = adapter.info || {};
    return {available: true, vendor: info.vendor || '', architecture: info.architecture || '', description: info.description || ''};
  } catch (e) {
    return {available: false, reason: `requestAdapter() threw: ${e}`};
  }
}

window.onnxqWebgpuInfo = webgpuInfo;

// Node placement ("Node placements", "Node(s) placed on [EP]", "  OpType (name)") and warnings/errors.
const keepLine = (line) => line.includes('VerifyEachNodeIsAssignedToAnEp') || /\[[WEF]:onnxruntime/.test(line);

window.onnxqRun = async (req) => {
  const logs = [];
  const keep = (level) => (...args) => logs.push(`${level}: ${args.map(String).join(' ')}`);
  const saved = {log: console.log, warn: console.warn, error: console.error, info: console.info};
  if (req.verbose) Object.assign(console, {log: keep('log'), warn: keep('warn'), error: keep('error'), info: keep('info')});
  try {
    if (req.threads) ort.env.wasm.numThreads = req.threads;  // else onnxruntime-web's default
    ort.env.logLevel = 'warning';
    const ep = req.ep === 'webgpu' ? ['webgpu'] : ['wasm'];
    const options = {executionProviders: ep, graphOptimizationLevel: 'all', logSeverityLevel: req.verbose ? 0 : 3,
                     logVerbosityLevel: 0};
    if (req.externalData && req.externalData.length) options.externalData = req.externalData;
    const t0 = performance.now();
    const session = await ort.InferenceSession.create(req.model, options);
    const createMs = performance.now() - t0;
    Object.assign(console, saved);  // keep only what session creation logged (node placement, warnings)
    const feed = feeds(req.inputs);
    const t1 = performance.now();
    const result = await session.run(feed, QUIET);
    const firstMs = performance.now() - t1;
    const outputs = [];
    for (const name of (req.outputs || session.outputNames)) {
      const t = result[name];
      outputs.push({name, dims: t.dims, dtype: t.type, b64: toB64(await t.getData())});
    }
    const runMs = await timeRuns(session, feed, req.warmup ?? 1, req.runs ?? 3);
    const tokenMs = req.timing ? await timeRuns(session, feeds(req.timing), req.warmup ?? 1, req.runs ?? 3) : [];
    await session.release();
    return {ok: true, ortVersion: ort.env.versions ? ort.env.versions.web : '', ep: ep[0],
            threads: ep[0] === 'wasm' ? ort.env.wasm.numThreads ?? null : null, crossOriginIsolated: self.crossOriginIsolated,
            createMs, firstMs, runMs, tokenMs, outputs, logs: logs.filter(keepLine)};
  } catch (e) {
    return {ok: false, error: String(e && e.message ? e.message : e), logs: logs.filter(keepLine)};
  } finally {
    Object.assign(console, saved);
  }
};

document.getElementById('status').textContent = `onnxruntime-web ${ort.env.versions ? ort.env.versions.web : ''} ready`;
window.onnxqReady = true;
