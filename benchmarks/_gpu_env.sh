# Sourced by gpu_check.sh and gpu_mfu.sh (from the repository root): the Python to use and, on a GPU
# host without megatron-core, its installation from the wheels carried in benchmarks/wheels/.
#
# PYTHON: $PYTHON if set, else the project's .venv/bin/python if there is one, else python3 (the GPU
# image's Python, the one that holds PyTorch; a plain `python` may not exist there).
# gpu_env_install: installs benchmarks/wheels/*.whl (--no-index --no-deps) into $GPU_CHECK_SITE
# (default /tmp/gpu_check_site) and puts it on PYTHONPATH when megatron.core or psutil is missing;
# the repository itself goes first on PYTHONPATH. Returns 2, saying why, when wheels are needed and absent.
# gpu_env_wheels_line: the line saying what a device call must carry.
GPU_ENV_MCORE=${GPU_CHECK_MCORE:-megatron-core==0.16.1}
GPU_ENV_PYVER=${GPU_CHECK_PYVER:-3.12}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

gpu_env_wheels_line() {
    shopt -s nullglob
    local w=(benchmarks/wheels/*.whl)
    if [[ ${#w[@]} == 0 ]]; then
        echo "carry: benchmarks/wheels (EMPTY: run 'bash benchmarks/gpu_check.sh --fetch-wheels' here first; needs $GPU_ENV_MCORE and psutil, cp$GPU_ENV_PYVER manylinux x86_64)"
    else
        echo "carry: benchmarks/wheels ($(du -ch "${w[@]}" | tail -n1 | cut -f1) in ${#w[@]} wheels: $(basename -a "${w[@]}" | tr '\n' ' '))"
    fi
}

gpu_env_install() {
    local missing
    missing=$("$PYTHON" -c "import importlib.util as u; print(' '.join(m for m in ('megatron.core', 'psutil') if u.find_spec(m.split('.')[0]) is None))")
    if [[ -n "$missing" ]]; then
        shopt -s nullglob
        local wheels=(benchmarks/wheels/*.whl)
        if [[ ${#wheels[@]} == 0 ]]; then
            echo "error: $missing not importable and no wheels in benchmarks/wheels/ (run 'bash benchmarks/gpu_check.sh --fetch-wheels' where an index is reachable, and carry benchmarks/wheels)" >&2
            return 2
        fi
        local site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
        echo "installing ${wheels[*]} into $site (no index, no deps)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" || return 2
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
