#!/usr/bin/env node
// Plain JavaScript, so that an older Node on PATH gets a clear message instead of a parse error.
const [major] = process.versions.node.split('.').map(Number);
if (major < 24) {
  process.stderr.write(`egress needs Node.js 24 or newer (this is ${process.version}). Run it through npm ("npx egress ...", "npm start"), which uses the Node 24 that "npm ci" installed.\n`);
  process.exit(2);
}
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
