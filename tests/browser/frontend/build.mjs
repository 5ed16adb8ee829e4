// Bundles app.jsx (React + @livekit/components-react + livekit-client, from ../node_modules) into
// dist/app.js for tests/test_frontend.py. Run by ./scripts/setup --browser after `npm ci`;
// offline, and a no-op when dist/build.json records the same inputs (the stamp the test checks).
//
//   node frontend/build.mjs            build if any input changed
//   node frontend/build.mjs --force    build anyway
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, 'dist');
const stampPath = join(dist, 'build.json');
// Everything the bundle depends on: the page, this script, and the exact npm packages (the lock).
const INPUTS = ['app.jsx', 'build.mjs', 'index.html', '../package-lock.json'];

const sha256 = (path) => createHash('sha256').update(readFileSync(path)).digest('hex');
const inputs = Object.fromEntries(INPUTS.map((p) => [p, sha256(join(here, p))]));
const stamp = { esbuild: esbuild.version, inputs };

let previous = null;
try {
  previous = JSON.parse(readFileSync(stampPath, 'utf8'));
} catch {}
if (!process.argv.includes('--force') && previous && JSON.stringify(previous) === JSON.stringify(stamp)) {
  process.exit(0);
}

mkdirSync(dist, { recursive: true });
const result = await esbuild.build({
  entryPoints: [join(here, 'app.jsx')],
  outfile: join(dist, 'app.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: ['chrome120'],
  jsx: 'automatic',
  define: { 'process.env.NODE_ENV': '"production"' },
  sourcemap: true,
  logLevel: 'warning',
  metafile: true,
});
const bundled = Object.keys(result.metafile.inputs).filter((p) => p.includes('node_modules/')).length;
writeFileSync(stampPath, `${JSON.stringify(stamp, null, 2)}\n`);
console.error(`built ${relative(process.cwd(), join(dist, 'app.js'))} (${bundled} files from node_modules)`);
