// Production build: minified JS (the app's entry and the chunk it shares with the
// inference panel, which is imported after the first chart is drawn),
// content-hashed, with .gz and .br siblings (the gateway serves them when the
// browser accepts them), and dist/index.html pointing at the entry with the CSS
// inlined. Prints the gzip size: what the first screen loads, and everything.
import { build } from "esbuild";
import { mkdir, readFile, rm, writeFile, readdir } from "node:fs/promises";
import { gzipSync, brotliCompressSync, constants } from "node:zlib";
import path from "node:path";

// The page speaks binary gRPC-Web only (rpc.ts: useBinaryFormat), but Connect's
// serializers import protobuf-es's JSON reader and writer (with the well-known
// types' JSON forms) for the JSON format: about 9 KiB gzip of the first screen it
// never runs. They are replaced by a function that throws if a JSON call is ever made.
const binaryOnly = {
  name: "binary-only",
  setup(b) {
    b.onLoad({ filter: /@connectrpc[\\/]connect[\\/]dist[\\/]esm[\\/]protocol[\\/]serialization\.js$/ }, async (args) => {
      const source = await readFile(args.path, "utf8");
      const imports = 'import { fromBinary, fromJsonString, toBinary, toJsonString, } from "@bufbuild/protobuf";';
      if (!source.includes(imports)) throw new Error(`binary-only: ${args.path} changed; update build.mjs`);
      return {
        contents: source.replace(imports, 'import { fromBinary, toBinary } from "@bufbuild/protobuf";\n' +
          'const fromJsonString = () => { throw new Error("JSON is not in this build: binary gRPC-Web only"); };\n' +
          "const toJsonString = fromJsonString;"),
        loader: "js",
      };
    });
  },
};

const dist = "dist";
await rm(dist, { recursive: true, force: true });
await mkdir(path.join(dist, "assets"), { recursive: true });

const result = await build({
  entryPoints: { app: "src/main.ts" },
  bundle: true,
  minify: true,
  format: "esm",
  splitting: true,
  target: ["es2022"],
  outdir: path.join(dist, "assets"),
  entryNames: "[name]-[hash]",
  chunkNames: "[name]-[hash]",
  metafile: true,
  legalComments: "none",
  logLevel: "warning",
  plugins: [binaryOnly],
});

const outputs = Object.keys(result.metafile.outputs).map((p) => path.basename(p));
const [entryPath, entry] = Object.entries(result.metafile.outputs).find(([, o]) => o.entryPoint === "src/main.ts");
const js = path.basename(entryPath);
// The entry's CSS (a lazy chunk's CSS would repeat what the entry imported).
const css = entry.cssBundle ? path.basename(entry.cssBundle) : undefined;
// What the page loads before its first chart: the entry and the chunks it imports
// statically (the dynamic imports come later).
const firstLoad = new Set([js, ...entry.imports.filter((i) => i.kind === "import-statement").map((i) => path.basename(i.path))]);
const template = await readFile("index.html", "utf8");
// The CSS is inlined: no render-blocking request before the first paint.
const cssText = css ? await readFile(path.join(dist, "assets", css), "utf8") : "";
const html = template
  .replace("<!--CSS-->", cssText ? `<style>${cssText}</style>` : "")
  .replace("<!--JS-->", [...firstLoad].filter((f) => f !== js)  // fetched with the entry, not after it
    .map((f) => `<link rel="modulepreload" href="/assets/${f}">`)
    .concat(`<script type="module" src="/assets/${js}"></script>`).join(""));
await writeFile(path.join(dist, "index.html"), html);

let gz = 0;
let gzFirst = 0;
const names = await readdir(path.join(dist, "assets"));
for (const name of names.filter((n) => n.endsWith(".css"))) await rm(path.join(dist, "assets", name));
const files = names.filter((n) => !n.endsWith(".css")).map((name) => path.join(dist, "assets", name));
for (const file of [path.join(dist, "index.html"), ...files]) {
  const data = await readFile(file);
  const zipped = gzipSync(data, { level: 9 });
  gz += zipped.length;
  if (file.endsWith("index.html") || firstLoad.has(path.basename(file))) gzFirst += zipped.length;
  await writeFile(file + ".gz", zipped);
  await writeFile(file + ".br", brotliCompressSync(data, {
    params: { [constants.BROTLI_PARAM_QUALITY]: 11 },
  }));
}
// Budgets. First screen 50 KiB: what the page needs before its first chart (the
// inference panel comes after it; at 500 kbit/s every KiB is 16 ms): 47 KiB with the
// page's own charts (src/plot.ts) instead of uPlot (68 KiB with uPlot, 77.6 before
// Connect's JSON serialization was left out). All 56 KiB: 53 with the inference panel.
// Browsers that accept brotli get files about 10-15 % smaller.
const firstLimit = 50 * 1024;
const limit = 56 * 1024;
console.log(`bundle: ${js} + index.html with inlined CSS: first screen ${(gzFirst / 1024).toFixed(1)} KiB gzip ` +
  `(limit ${firstLimit / 1024}), all ${(gz / 1024).toFixed(1)} KiB gzip (JS + CSS + HTML in ${files.length + 1} files, ` +
  `limit ${limit / 1024} KiB for all)`);
if (gz > limit || gzFirst > firstLimit) {
  console.error("bundle is over its gzip budget");
  process.exit(1);
}
