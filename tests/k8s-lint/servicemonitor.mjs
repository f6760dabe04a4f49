// Validates one ServiceMonitor (JSON on stdin) against the prometheus-operator's schema, as
// compiled into the npm package @kubernetes-models/prometheus-operator (kubernetes-validate has
// no schema for it). Types, required fields, enums and patterns (durations, schemes) are checked;
// unknown fields are not, as the models allow them. Usage:
//   WARREN_K8S_NODE_MODULES=<dir>/node_modules node servicemonitor.mjs < servicemonitor.json
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.WARREN_K8S_NODE_MODULES;
if (!modules) {
  console.error("WARREN_K8S_NODE_MODULES is not set");
  process.exit(2);
}
const model = join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js");
const { ServiceMonitor } = await import(pathToFileURL(model).href);

const doc = JSON.parse(readFileSync(0, "utf8"));
try {
  new ServiceMonitor(doc).validate();
} catch (e) {
  console.log(e.message);
  process.exit(1);
}
