// Drives Debian's Chromium through playwright-core for tests/test_browser.py.
//
//   node run.mjs '{"executablePath": "/usr/bin/chromium", "userDataDir": "...", "args": [...], "url": "http://127.0.0.1:..."}'
//
// Prints JSON lines on stdout: {"event": "ready", ...} once the page is loaded, {"event": "blocked", "url"}
// for any request that would leave loopback (it is aborted), {"event": "console"|"pageerror", ...},
// and one {"id", "value"} or {"id", "error"} per request. Requests are JSON lines on stdin:
// {"id": 1, "expr": "window.__results"}: the expression is evaluated in the page (promises awaited).
// Closing stdin (or SIGTERM) closes the browser and ends the process.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const cfg = JSON.parse(process.argv[2]);
const out = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]']);

let context = null;
let closing = null;
function shutdown(code = 0) {
  closing ??= (async () => {
    try {
      if (context) await context.close();
    } catch (e) {
      process.stderr.write(`close: ${e}\n`);
    }
    process.exit(code);
  })();
  return closing;
}
process.on('SIGTERM', () => shutdown(0));
process.on('SIGINT', () => shutdown(0));

try {
  context = await chromium.launchPersistentContext(cfg.userDataDir, {
    executablePath: cfg.executablePath,
    headless: true,
    args: cfg.args,
    // Playwright mutes audio by default; the agent's track must really play.
    ignoreDefaultArgs: ['--mute-audio'],
    timeout: cfg.launchTimeoutMs ?? 60000,
  });
  // Belt and braces for "nothing from the internet": any non-loopback HTTP(S) request is aborted and reported.
  await context.route('**/*', (route) => {
    const u = new URL(route.request().url());
    if (u.protocol === 'data:' || LOOPBACK.has(u.hostname)) return route.continue();
    out({ event: 'blocked', url: u.href });
    return route.abort('blockedbyclient');
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => out({ event: 'console', type: m.type(), text: m.text() }));
  page.on('pageerror', (e) => out({ event: 'pageerror', text: String(e && e.stack ? e.stack : e) }));
  await page.goto(cfg.url, { waitUntil: 'load', timeout: cfg.loadTimeoutMs ?? 30000 });
  out({ event: 'ready', browserVersion: context.browser()?.version() ?? null, userAgent: await page.evaluate('navigator.userAgent') });

  const rl = createInterface({ input: process.stdin });
  rl.on('line', async (line) => {
    let id = null;
    try {
      const req = JSON.parse(line);
      id = req.id;
      out({ id, value: await page.evaluate(req.expr) });
    } catch (e) {
      out({ id, error: String(e && e.message ? e.message : e) });
    }
  });
  rl.on('close', () => shutdown(0));
} catch (e) {
  out({ event: 'fatal', error: String(e && e.stack ? e.stack : e) });
  await shutdown(1);
}
