#!/usr/bin/env bash
# Every check that needs a GPU, in one command, for a lent GPU machine: its python3 has PyTorch but
# no network, and clean-fid is the one package of ours it lacks.
#
#   here, once:  make device-wheels                 # clean-fid's wheel into .whl/ (git-ignored)
#   there:       bash benchmarks/device_check.sh    # from the repo root, with .whl carried along
#   then here:   cat <returned RESULTS.md> >> benchmarks/RESULTS.md
#
# 1. tests that run only with CUDA (the ECT loss on the GPU against the same computation by hand);
# 2. benchmarks/gpu_check.py: 200 ECT iterations of the full CIFAR-10 network at batch 128 in fp32
#    and bf16 autocast, and 10k samples scored through the Inception path.
# Results go to $OUT (the device tool's return folder; benchmarks/out elsewhere). Extra arguments go
# to gpu_check.py (`--smoke` checks this script on a machine with no GPU).
set -euo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ect-site .whl/*.whl
    export PYTHONPATH=/tmp/ect-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
tests_failed=0  # a failing test is reported, and the measurements still run
python3 -m pytest -q -p no:cacheprovider -rs tests/test_loss.py -k cuda 2>&1 | tee "$OUT/cuda-tests.log" || tests_failed=1
python3 benchmarks/gpu_check.py --out "$OUT/RESULTS.md" "$@" 2>&1 | tee "$OUT/gpu-check.log"
exit $tests_failed
