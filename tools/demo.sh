#!/usr/bin/env bash
# `make demo`: the product's real path on one machine, end to end.
#   1. personalise the committed model on PORTRAIT (talkinghead finetune, ~2 min on CPU)
#   2. export the avatar's generator into the model repository (generator_demo)
#   3. start `talkinghead serve` (embedded ONNX Runtime backend) on free loopback ports
#   4. create the avatar from PORTRAIT over gRPC, stream DRIVER through it (relative motion)
#   5. write OUT/demo.mp4 and OUT/contact_sheet.png; stop the server (also on failure)
set -euo pipefail
: "${VENV:=.venv}" "${CHECKPOINT:=models/talkinghead-small.pt}" "${REPOSITORY:=model_repository}"
: "${PORTRAIT:=facekit/assets/demo_portrait.png}" "${DRIVER:=facekit/assets/demo_driver.npz}"
: "${OUT:=out/demo}" "${AVATAR:=demo}"
th="$VENV/bin/talkinghead"
py="$VENV/bin/python"
mkdir -p "$OUT"

"$th" finetune --checkpoint "$CHECKPOINT" --avatar "$AVATAR" --images "$PORTRAIT" --out "$OUT/avatar.pt"
"$th" export --checkpoint "$OUT/avatar.pt" --repository "$REPOSITORY" --no-check --report "$OUT/export.json"

read -r grpc_port metrics_port < <("$py" - <<'PY'
import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)
PY
)
"$th" serve --grpc-port "$grpc_port" --metrics-port "$metrics_port" --model-repository "$REPOSITORY" \
    --avatar-store "$OUT/avatars" >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
export TALKINGHEAD_SERVER="127.0.0.1:$grpc_port"
if ! "$py" -c "from client import Client; Client(target='$TALKINGHEAD_SERVER').wait_ready(120)"; then
    echo "demo: the service did not become ready; its log:" >&2
    tail -n 30 "$OUT/serve.log" >&2
    exit 1
fi
echo "demo: service ready on $TALKINGHEAD_SERVER (metrics http://127.0.0.1:$metrics_port/metrics, log $OUT/serve.log)"
"$th" avatar create "$AVATAR" "$PORTRAIT" --replace
"$th" animate --avatar "$AVATAR" --driver "$DRIVER" --relative --out "$OUT/demo.mp4" \
    --contact-sheet "$OUT/contact_sheet.png"
echo "demo: wrote $OUT/demo.mp4 and $OUT/contact_sheet.png"
