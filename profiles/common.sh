# Sourced by the Nsight scripts after PATTERN, LENGTH and PY are set:
# `require_profiler TOOL` exits with a hint when TOOL is not on PATH, and `set_device_out`
# sets DEVICE (this GPU's name) and OUT=profiles/<device slug> (where its results go).

require_profiler() {
    if ! command -v "$1" >/dev/null; then
        echo "$1 not found: use '$PY -m profiles.torch_profile --pattern $PATTERN --length $LENGTH' instead" >&2
        exit 1
    fi
}

set_device_out() {
    DEVICE=$($PY -c "from bench.common import device_name; print(device_name())")
    OUT=profiles/$($PY -c "import sys; from bench.report import device_slug; print(device_slug(sys.argv[1]))" "$DEVICE")
}
