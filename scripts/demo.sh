#!/usr/bin/env bash
# The main job: build a K-Face-layout sample, run the whole pipeline (select -> detect ->
# merge -> split -> crops -> train -> evaluate) with the embedded Prefect server and a
# CPU-sized config, analyse one photo with the trained model and with the shipped one, and
# print the report's path.
# With ../shared/data: real AAF faces and their labels. Without it: scikit-image's
# public-domain astronaut photo with SYNTHETIC labels (it runs end to end, learns nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo  # no dev tools: the demo needs neither JAX nor Playwright
export PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2
SHARED="${KFACE_SHARED_DATA:-../shared/data}"
if [ -f "$SHARED/faces/aaf/labels.csv" ]; then
  SAMPLE="${SAMPLE:-artifacts/sample-kface}" OUT="${OUT:-artifacts/demo}"
  .venv/bin/kface sample-data --faces "$SHARED/faces/aaf" --out "$SAMPLE" --subjects "${SUBJECTS:-120}"
  PHOTO="$SHARED/scenes/insightface_t1.jpg"  # six people, none of them in the sample
else
  echo "$SHARED/faces/aaf not found: building the sample from a public-domain photo (synthetic labels)"
  SAMPLE="${SAMPLE:-artifacts/sample-public}" OUT="${OUT:-artifacts/demo-public}"
  .venv/bin/kface sample-data --out "$SAMPLE" --subjects "${SUBJECTS:-40}"
  PHOTO=""
fi
.venv/bin/kface run -c configs/cpu-small.yaml --data-root "$SAMPLE" \
  --metadata "$SAMPLE/KFace_metadata.csv" --out "$OUT"
if [ -z "$PHOTO" ]; then  # a photo of a test subject: the model never trained on it
  PHOTO="$SAMPLE/$(.venv/bin/python -c "import pandas as pd; s = pd.read_parquet('$OUT/split.parquet'); print(s[s.split == 'test'].path.iloc[0])")"
  echo "sample prediction on $PHOTO (a test subject, not trained on)"
fi
.venv/bin/kface predict "$PHOTO" --model "$OUT/experiments/default/model" --out "$OUT/predictions" --annotated
echo
echo "the same photo with the model shipped with kface (trained on thousands of people):"
.venv/bin/kface predict "$PHOTO" --out "$OUT/predictions-shipped" --annotated
echo
echo "Next: 'source .venv/bin/activate' puts kface on your PATH (or call .venv/bin/kface), then"
echo "  kface status --out $OUT       kface experiments --out $OUT       kface --help"
