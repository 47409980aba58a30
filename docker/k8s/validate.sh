#!/usr/bin/env bash
# Validate docker/k8s/*.yaml against their schemas, offline but for package registries:
#   - Kubernetes: the JSON schemas shipped in the PyPI package kubernetes-validate (made standalone here);
#   - KEDA ScaledObject: the CRD's openAPIV3Schema from the Go module github.com/kedacore/keda/v2;
#   - kubeconform (go install github.com/yannh/kubeconform/cmd/kubeconform@latest) checks, -strict.
# Usage: bash docker/k8s/validate.sh [kubernetes version, default 1.33.0]
set -euo pipefail
K8S="${1:-1.33.0}"
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
KUBECONFORM="$(command -v kubeconform || echo "$(go env GOPATH)/bin/kubeconform")"
[ -x "$KUBECONFORM" ] || go install github.com/yannh/kubeconform/cmd/kubeconform@latest
python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q kubernetes-validate pyyaml
KEDA_DIR="$(cd "$WORK" && go mod download -json github.com/kedacore/keda/v2@latest | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
"$WORK/venv/bin/python" - "$WORK" "v$K8S" "$KEDA_DIR" <<'PY'
import json, os, sys, yaml
import kubernetes_validate
work, version, keda = sys.argv[1:]
src = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema", f"{version}-local-strict")
out = os.path.join(work, "schemas")
os.makedirs(out)
ref = "/api/_definitions.json#/$defs/"
defs = json.loads(open(os.path.join(src, "_definitions.json")).read().replace(ref, "#/$defs/"))["$defs"]
for name in ("deployment-apps-v1.json",):
    schema = json.loads(open(os.path.join(src, name)).read().replace(ref, "#/$defs/"))
    schema["$defs"] = defs
    json.dump(schema, open(os.path.join(out, name), "w"))
crd = yaml.safe_load(open(os.path.join(keda, "config/crd/bases/keda.sh_scaledobjects.yaml")))
def strict(s):
    if isinstance(s, dict):
        if s.get("type") == "object" and "properties" in s:
            s.setdefault("additionalProperties", False)
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
for v in crd["spec"]["versions"]:
    schema = v["schema"]["openAPIV3Schema"]
    strict(schema)
    json.dump(schema, open(os.path.join(out, f"scaledobject_{v['name']}.json"), "w"))
PY
"$KUBECONFORM" -strict -summary \
  -schema-location "$WORK/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
  -schema-location "$WORK/schemas/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json" \
  "$HERE"/*.yaml
