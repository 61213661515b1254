// onnxq edge runner: driver side. Usage: node drive.mjs JOB.json RESULT.json
// JOB: {url, request, executablePath?, extraArgs?: [], timeoutMs?, probeWebgpu?: bool}
// Opens `url` (index.html served on localhost) in headless Chromium via playwright-core, calls
// window.onnxqRun(request) and writes {result, webgpu, console, browser} to RESULT.json.
import { readFileSync, writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const REQUIRED_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const [jobPath, resultPath] = process.argv.slice(2);
if (!jobPath || !resultPath) {
  console.error('usage: node drive.mjs JOB.json RESULT.json');
  process.exit(2);
}
const job = JSON.parse(readFileSync(jobPath, 'utf8'));
const timeout = job.timeoutMs ?? 300000;
const consoleLines = [];
let browser;
try {
  browser = await chromium.launch({
    executablePath: job.executablePath || '/usr/bin/chromium',
    headless: true,
    // keepGpu: drop --disable-gpu so that a software WebGPU adapter (SwiftShader) can be tried
    args: [...REQUIRED_FLAGS.filter((f) => !(job.keepGpu && f === '--disable-gpu')), ...(job.extraArgs || [])],
    timeout: 60000,
  });
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  // ORT's verbose session log (node placement) is returned by the page itself; keep the rest short
  page.on('console', (msg) => {
    const text = msg.text();
    if (!/\[[VI]:onnxruntime/.test(text) && consoleLines.length < 200) consoleLines.push(`${msg.type()}: ${text}`);
  });
  page.on('pageerror', (err) => consoleLines.push(`pageerror: ${err.message}`));
  await page.goto(job.url, { waitUntil: 'load' });
  await page.waitForFunction(() => window.onnxqReady === true, null, { timeout: 60000 });
  const webgpu = job.probeWebgpu ? await page.evaluate(() => window.onnxqWebgpuInfo()) : null;
  const result = job.request ? await page.evaluate((req) => window.onnxqRun(req), job.request) : null;
  writeFileSync(resultPath, JSON.stringify({ result, webgpu, console: consoleLines, browser: browser.version() }));
} catch (err) {
  writeFileSync(resultPath, JSON.stringify({ result: { ok: false, error: `driver: ${err.message}` }, console: consoleLines }));
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
}
