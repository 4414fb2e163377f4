#!/usr/bin/env bash
# The main job: build a K-Face-layout sample from real faces, run the whole pipeline
# (select -> detect -> merge -> split -> crops -> train -> evaluate) with the embedded
# Prefect server and a CPU-sized config, and print where the report is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2
FACES="${KFACE_SHARED_DATA:-../shared/data}/faces/aaf"
SAMPLE="${SAMPLE:-artifacts/sample-kface}"
OUT="${OUT:-artifacts/demo}"
.venv/bin/kface sample-data --faces "$FACES" --out "$SAMPLE" --subjects "${SUBJECTS:-120}"
.venv/bin/kface run -c configs/cpu-small.yaml --data-root "$SAMPLE" \
  --metadata "$SAMPLE/KFace_metadata.csv" --out "$OUT"
# analyse one photo with the model just trained (labels in the sample are real, photos synthetic)
PHOTO="${KFACE_SHARED_DATA:-../shared/data}/scenes/insightface_t1.jpg"
.venv/bin/kface predict "$PHOTO" --model "$OUT/model" --out "$OUT/predictions" --annotated
echo "Report: $OUT/reports/report.md"
