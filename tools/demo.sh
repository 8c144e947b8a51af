#!/usr/bin/env bash
# `make demo`: the product's real path on one machine, end to end, through the API alone.
#   1. start `talkinghead serve` (ONNX Runtime in-process, its embedded personalisation worker)
#      on free loopback ports
#   2. create the avatar from PORTRAIT over gRPC
#   3. personalise it over gRPC (an operation: the worker fine-tunes the committed model on the
#      avatar's photos, ~70 s on 2 CPU cores, and exports generator_demo into the model repository)
#   4. stream DRIVER through it (relative motion, --paste-back: the whole photo moves, not a crop):
#      the personalised generator draws it, the server watermarks every frame
#   5. write OUT/demo.mp4 and OUT/contact_sheet.png, read the watermark back (`talkinghead verify`);
#      stop the server (also on failure)
# The watermark key is this run's own random secret (OUT/watermark.key) unless
# TALKINGHEAD_WATERMARK_KEY is set.
set -euo pipefail
: "${VENV:=.venv}" "${CHECKPOINT:=models/talkinghead-small.pt}" "${REPOSITORY:=model_repository}"
: "${PORTRAIT:=facekit/assets/demo_portrait.png}" "${DRIVER:=facekit/assets/demo_driver.npz}"
: "${OUT:=out/demo}" "${AVATAR:=demo}"
py="$VENV/bin/python"
BUNDLED=facekit/assets/demo_portrait.png
if [ "$PORTRAIT" != "$BUNDLED" ]; then
    # the bundled portrait's consent record must not be stamped on someone else's face
    if [ "${BASIS:-}" = personal ]; then
        if [ -z "${SUBJECT:-}" ] || [ -z "${STATEMENT_VERSION:-}" ] || [ -z "${DOCUMENT:-}" ]; then
            echo "demo: BASIS=personal: set SUBJECT (whose face it is), STATEMENT_VERSION (the consent" \
                "statement's version) and DOCUMENT (the signed statement's file)" >&2
            exit 2
        fi
    elif [ -z "${SUBJECT:-}" ] || [ -z "${SOURCE:-}" ]; then
        echo "demo: PORTRAIT=$PORTRAIT is not the bundled portrait: set SUBJECT (whose face it is) and SOURCE" \
            "(where it comes from), and BASIS if not public-domain; for your own face BASIS=personal with" \
            "STATEMENT_VERSION and DOCUMENT (see \`talkinghead avatar create --help\`)" >&2
        exit 2
    fi
fi
th() { "$py" -m talkinghead.cli "$@"; }  # this checkout's code, whatever the venv's editable install
mkdir -p "$OUT"
if [ -z "${TALKINGHEAD_WATERMARK_KEY:-}" ]; then
    (umask 077 && "$py" -c "import secrets; print(secrets.token_urlsafe(32))" >"$OUT/watermark.key")
    TALKINGHEAD_WATERMARK_KEY=$(cat "$OUT/watermark.key")
fi
export TALKINGHEAD_WATERMARK_KEY

read -r grpc_port metrics_port < <("$py" - <<'PY'
import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)
PY
)
"$py" -m talkinghead.cli serve --grpc-port "$grpc_port" --metrics-port "$metrics_port" --model-repository "$REPOSITORY" \
    --avatar-store "$OUT/avatars" --jobs "$OUT/jobs" --worker-checkpoint "$CHECKPOINT" >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
export TALKINGHEAD_SERVER="127.0.0.1:$grpc_port"
if ! "$py" -c "from client import Client; Client(target='$TALKINGHEAD_SERVER').wait_ready(120)"; then
    echo "demo: the service did not become ready; its log:" >&2
    tail -n 30 "$OUT/serve.log" >&2
    exit 1
fi
echo "demo: service ready on $TALKINGHEAD_SERVER (metrics http://127.0.0.1:$metrics_port/metrics, log $OUT/serve.log)"
# The consent record of the bundled portrait (a public-domain NASA photograph); a PORTRAIT of your
# own needs SUBJECT and SOURCE, or with BASIS=personal STATEMENT_VERSION and DOCUMENT (checked
# above), and COLLECTED_BY where it differs.
: "${SUBJECT:=Eileen Collins, NASA astronaut portrait}" "${BASIS:=public-domain}"
: "${COLLECTED_BY:=talkinghead demo}"
if [ "$BASIS" = personal ]; then
    ground=(--statement-version "$STATEMENT_VERSION" --document "$DOCUMENT")
else
    : "${SOURCE:=NASA photograph via scikit-image data.astronaut(); work of the US federal government}"
    ground=(--source "$SOURCE")
fi
th avatar create "$AVATAR" "$PORTRAIT" --replace --subject "$SUBJECT" --basis "$BASIS" "${ground[@]}" \
    --collected-by "$COLLECTED_BY"
th avatar personalise "$AVATAR" ${STEPS:+--steps "$STEPS"} --wait
th animate --avatar "$AVATAR" --driver "$DRIVER" --relative --paste-back --out "$OUT/demo.mp4" \
    --contact-sheet "$OUT/contact_sheet.png" --overwrite  # a rerun replaces the last demo's files
echo "demo: wrote $OUT/demo.mp4 and $OUT/contact_sheet.png"
th verify "$OUT/demo.mp4"
