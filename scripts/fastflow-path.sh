# Sourced by the GPU scripts: make `import fastflow` give the full package (fastflow.backends
# and fastflow.policies live in backends/ and policies/): an install if there is one, else a
# shim of this checkout in $WORK/src. The checkout's own fastflow/ must not shadow either, so
# the working directory is not put on sys.path. Needs PY and WORK; run from the repository root.
export PYTHONSAFEPATH=1
if ! "$PY" -c "import fastflow.backends.torch_backend, fastflow.policies.ucb" >/dev/null 2>&1; then
  SHIM="$WORK/src"
  mkdir -p "$SHIM/fastflow"
  for f in "$PWD"/fastflow/*; do ln -sf "$f" "$SHIM/fastflow/"; done
  ln -sfn "$PWD/backends" "$SHIM/fastflow/backends"
  ln -sfn "$PWD/policies" "$SHIM/fastflow/policies"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "fastflow: not installed; using a shim of this checkout ($SHIM)"
fi
