#!/usr/bin/env node
// SIGHUP's default action ends the process, and serve's own handler (hold the signal, reload once
// started) goes in only once its modules have loaded, a hundred ms or more from here. A SIGHUP
// before then is ignored: the routes it announces have not been read yet, and serve reads them as it
// starts. (Node's own start-up, before this line runs, cannot catch a signal.)
if (process.argv[2] === 'serve') process.on('SIGHUP', () => {});
// Plain JavaScript, so that an older Node on PATH gets a clear message instead of a parse error.
const [major] = process.versions.node.split('.').map(Number);
if (major < 24) {
  process.stderr.write(`egress needs Node.js 24 or newer (this is ${process.version}). Run it through npm ("npx egress ...", "npm start"), which uses the Node 24 that "npm ci" installed.\n`);
  process.exit(2);
}
// Compiled code, and the sources already stripped of their types, are kept between runs, so a start
// that finds them neither loads the type stripper (about 18 MB that stay resident) nor compiles
// again. The folder is the project's own (node_modules/.cache), never a shared temp folder whose
// contents another user could plant. NODE_COMPILE_CACHE picks another folder and
// NODE_DISABLE_COMPILE_CACHE=1 turns it off; a folder that cannot be written only costs the saving.
const { enableCompileCache } = await import('node:module');
const { fileURLToPath } = await import('node:url');
enableCompileCache(process.env.NODE_COMPILE_CACHE || fileURLToPath(new URL('../node_modules/.cache/egress-compile', import.meta.url)));
// `serve` runs with its Node flags and malloc settings however it is started (src/cli/serve-flags.ts):
// started without them, it replaces itself (same pid) with a process that has them.
if (process.argv[2] === 'serve') {
  const { inspectorSignalOff, restartWithServeFlags } = await import('../src/cli/serve-flags.ts');
  if (!inspectorSignalOff()) {
    try {
      restartWithServeFlags(fileURLToPath(import.meta.url), process.argv.slice(2));
    } catch (err) {
      process.stderr.write(`egress: serve could not restart itself with its Node flags (${err.code ?? err.message}); start it as npm start does (node --disable-sigusr1 … bin/egress.js serve)\n`);
      process.exit(1);
    }
  }
}
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
