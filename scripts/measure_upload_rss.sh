#!/bin/bash
# The API's peak RSS while it validates one large model upload (docs/hostile-input.md).
# usage: scripts/measure_upload_rss.sh CODE_DIR LABEL PORT
#   CODE_DIR: a checkout to run (e.g. `git archive <commit> | tar -x -C /tmp/old`); the file comes from
#   scripts/make_large_safetensors.py $FILE. Starts `vitq api` from CODE_DIR on SQLite (127.0.0.1 only),
#   uploads $FILE with curl and prints VmHWM before and after, the request time and the answer.
set -e
CODE=$1; LABEL=$2; PORT=$3
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
FILE=${FILE:-/tmp/rss/big.safetensors}
D=$(mktemp -d /tmp/rss-data-$LABEL-XXXX)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 VITQ_DATA_DIR=$D VITQ_MAX_UPLOAD_BYTES=1200000000 PYTHONPATH=$CODE
cd $CODE
$PY -m vitq.cli migrate >/dev/null 2>&1
KEY=$($PY -m vitq.cli keys create --tenant rss --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["key"])')
$PY -m vitq.cli api --host 127.0.0.1 --port $PORT --log-level warning > $D/api.log 2>&1 &
PID=$!
for i in $(seq 60); do curl -s -o /dev/null http://127.0.0.1:$PORT/healthz && break; sleep 1; done
curl -s -o /dev/null -H "Authorization: Bearer $KEY" http://127.0.0.1:$PORT/v1/models
BEFORE=$(grep VmHWM /proc/$PID/status)
START=$(date +%s.%N)
ANSWER=$(curl -s -w ' HTTP %{http_code}' -H "Authorization: Bearer $KEY" -F "file=@$FILE" \
  -F timm_name=vit_large_patch16_224 -F 'timm_kwargs={"depth": 20, "num_classes": 10}' http://127.0.0.1:$PORT/v1/models)
END=$(date +%s.%N)
AFTER=$(grep VmHWM /proc/$PID/status)
CPU=$(awk '{print ($14+$15)/100}' /proc/$PID/stat)
kill $PID; wait $PID 2>/dev/null || true
echo "$LABEL: before upload $BEFORE; after $AFTER; request $(echo "$END - $START" | bc) s; API CPU total ${CPU} s; answer: ${ANSWER:0:300}"
rm -rf $D
