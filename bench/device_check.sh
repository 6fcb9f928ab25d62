#!/usr/bin/env bash
# The device check (DEVELOPERS.md: "device"): on a lent 16-core GPU machine, within 8
# minutes, B7 at 1, 2, 4 and 8 nodes x 2 workers (a core per process) once with the
# compiled data plane and once with ADAPM_DATA_PLANE=python, and the CUDA tests of
# adapm.torch. Run from the checkout's root:
#
#     bash bench/device_check.sh            # results and logs under $OUT (or bench/results)
#
# The machine reaches nothing outside it: the environment is a virtual environment that
# sees the machine's own packages (its CUDA torch), with AdaPM built in place; anything
# missing is reported, never fetched. Each part has its own time limit, so that one that
# hangs still leaves the others their time; the exit code says whether every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
start=$SECONDS
status=0

echo "== machine: $(nproc) cores"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"

echo "== environment"
python3 -m venv --system-site-packages .device-venv
# shellcheck disable=SC1091
. .device-venv/bin/activate
missing=$(python - <<'EOF'
import importlib
print(" ".join(m for m in ("numpy", "zmq", "posix_ipc", "click", "Cython", "pytest",
                           "pytest_timeout", "torch")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "!! missing on this machine: $missing (trying pip, which works only with a package index)"
  pip install -q numpy pyzmq posix_ipc click Cython pytest pytest-timeout || status=1
fi
python setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 || { echo "!! build failed"; tail "$OUT/build.log"; exit 1; }
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== CUDA tests of adapm.torch (limit 120 s)"
timeout 120 python -m pytest tests/integration/ml/test_torch.py -q -p no:cacheprovider \
  -k cuda -rs 2>&1 | tee "$OUT/device_cuda_tests.txt" || status=1

for plane in compiled python; do
  left=$(( 470 - (SECONDS - start) ))
  limit=$(( plane == compiled ? left * 6 / 10 : left ))
  echo "== B7, ADAPM_DATA_PLANE=$plane (limit ${limit} s)"
  (cd bench && ADAPM_DATA_PLANE=$plane timeout "$limit" python bench_scale.py \
     --nodes 1,2,4,8 --workers-per-node 2) 2>&1 | tee "$OUT/device_b7_$plane.txt" || status=1
done
echo "== done in $(( SECONDS - start )) s, status $status"
exit $status
