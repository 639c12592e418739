// Builds the browser terminal into dist/: one bundle (the page's code, @clawterm/client from
// ../js/src and xterm.js with its fit addon, all from the npm registry via the lock file),
// xterm's stylesheet and the page. `clawtermd` serves dist/ on its WebSocket port.
import * as esbuild from "esbuild";
import { cpSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });
await esbuild.build({
  entryPoints: [join(here, "src/main.ts")],
  bundle: true,
  format: "esm",
  target: "es2020",
  minify: true,
  sourcemap: true,
  outfile: join(dist, "app.js"),
  alias: { "@clawterm/client": join(here, "../js/src/index.ts") },
  logLevel: "warning",
});
cpSync(join(here, "node_modules/@xterm/xterm/css/xterm.css"), join(dist, "xterm.css"));
cpSync(join(here, "src/index.html"), join(dist, "index.html"));
cpSync(join(here, "src/page.css"), join(dist, "page.css"));
console.log(`browser terminal built in ${dist}`);
