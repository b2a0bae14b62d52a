// Validate a .glb with the Khronos glTF validator; print its JSON report; exit 1 when it has errors.
import { readFile } from "node:fs/promises";
import validator from "gltf-validator";

const path = process.argv[2];
if (!path) {
  console.error("usage: node validate.mjs FILE.glb");
  process.exit(2);
}
const data = new Uint8Array(await readFile(path));
const report = await validator.validateBytes(data, { maxIssues: 50 });
console.log(JSON.stringify(report));
process.exit(report.issues.numErrors > 0 ? 1 : 0);
