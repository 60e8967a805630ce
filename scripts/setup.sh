#!/usr/bin/env bash
# Create .venv and install the project with its dev tools, as on a new machine.
# torch is pinned here (CPU build from the local wheel cache / PyPI), not in the library's requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# the app extra (Gradio), the video extra (MP4 files: imageio + its bundled ffmpeg) and Playwright, which drives Debian's chromium in the app's browser test
.venv/bin/python -m pip install -q -e ".[dev,app,video]" "playwright>=1.40,<2"
