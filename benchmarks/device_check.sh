#!/usr/bin/env bash
# The GPU checks, as one command for one call of the device tool (a GPU machine lent for minutes,
# with PyTorch and Lightning installed, no network, no ../shared):
#
#   make device-bundle                      # here: .device/ = the missing wheels + the offline data
#   device run, carry [".device"]:  bash benchmarks/device_check.sh 420
#
# On the device: installs the wheels, unpacks the data, then writes under $OUT
#   machine.txt      nvidia-smi, torch / Lightning versions, the GPU's name and torch's arch list
#   gpu_tests.log    the test suite's `gpu` tests (CUDA fit in bf16, the compute-capability check)
#   overhead.csv     benchmarks/overhead.py on the GPU: whole MNIST epochs, fp32 and bf16-mixed
#   aecm_*           AE-CM^r on all 70,000 MNIST images, bf16, data resident on the GPU, stopped
#                    after BUDGET seconds (argument 1, default 420): aecm.log, aecm_metrics.json
#                    (the final evaluation, its epoch = epochs done), aecm_curve.csv (val/ari and
#                    val/acc every 10 epochs, with wall times) and aecm_seconds.txt
# $OUT stays flat (the device tool returns at most 8 files, 2 folders down); the run's own
# folder is in /tmp/aecm_run.
# ACCEL=cpu runs the same steps on a CPU (tests/test_device_check.py, tiny budget).
set -uo pipefail
budget=${1:-420}
accel=${ACCEL:-gpu}
OUT=${OUT:-$(mktemp -d)}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH=$root PYTHONUNBUFFERED=1
export PROTOS_DATA_DIR=${DEVICE_DATA_DIR:-/tmp/protos_data}
py=${PYTHON:-python3}

echo "== install and data"
$py -m pip install --quiet --no-index --find-links .device/wheels .device/wheels/*.whl || exit 1
mkdir -p "$PROTOS_DATA_DIR/MNIST/raw"
cp -r .device/data/pneumoniamnist.npz .device/data/usps .device/data/pendigits "$PROTOS_DATA_DIR/"
for f in .device/data/MNIST/raw/*.gz; do
    gunzip -c "$f" >"$PROTOS_DATA_DIR/MNIST/raw/$(basename "$f" .gz)"
done

echo "== machine"
{
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    $py - <<'PY'
import lightning, torch
print("torch", torch.__version__, "lightning", lightning.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.cuda.get_arch_list())
else:
    print("no CUDA device")
PY
} >"$OUT/machine.txt"
tail -1 "$OUT/machine.txt"

echo "== gpu tests"
$py -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -2

echo "== overhead"
if [ "$accel" = gpu ]; then
    $py benchmarks/overhead.py --accelerator gpu --out "$OUT/overhead.csv" 2>&1 | tail -9
else
    $py benchmarks/overhead.py --accelerator cpu --cases cm --precisions 32-true --steps-per-batch 1 \
        --repeats 1 --n 2000 --data random --out "$OUT/overhead.csv" 2>&1 | tail -4
fi

echo "== AE-CM^r MNIST, bf16, ${budget} s"
start=$(date +%s)
$py -m lightning_protos.cli fit --config configs/aecm_mnist.yaml --seed_everything 0 \
    --trainer.accelerator "$accel" --trainer.devices 1 --trainer.precision bf16-mixed \
    --trainer.max_time "00:00:00:${budget}" --trainer.enable_progress_bar false \
    --trainer.default_root_dir /tmp/aecm_run ${AECM_ARGS:-} >"$OUT/aecm.log" 2>&1
echo "exit $? after $(($(date +%s) - start)) s" | tee "$OUT/aecm_seconds.txt"
run=$(ls -d /tmp/aecm_run/lightning_logs/version_* | tail -1)
cp "$run/metrics.json" "$OUT/aecm_metrics.json" && cat "$OUT/aecm_metrics.json"
$py - "$run" "$OUT/aecm_curve.csv" <<'PY'
import csv, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(sys.argv[1]).Reload()
with open(sys.argv[2], "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["tag", "step", "wall_time", "value"])
    for tag in ("val/ari", "val/acc"):
        for e in events.Scalars(tag) if tag in events.Tags()["scalars"] else []:
            out.writerow([tag, e.step, round(e.wall_time, 1), round(e.value, 4)])
PY
tail -3 "$OUT/aecm_curve.csv"
