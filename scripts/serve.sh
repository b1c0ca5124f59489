#!/usr/bin/env bash
# Set up (if needed) and run the service on the default model, with a demo completion.
# Extra arguments go to `parrot serve` (e.g. --port 9000, --model PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
# serve: the service; client: what the README's examples import (openai, LangChain, ChatOpenAI).
bash scripts/install.sh serve,client
exec "${PYTHON:-python3}" -m parrot.service serve --demo "$@"
