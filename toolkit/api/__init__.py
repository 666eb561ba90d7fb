"""The OpenAI-compatible HTTP API over a worker handle (the MAX tutorial's chapter 2).

    with toolkit.api.serve_in_background(worker, port=0) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-").chat.completions.create(...)

or from a shell: `python -m toolkit serve --model smollm2-135m-instruct --port 8000`.
"""

from toolkit.api.app import Limits, create_app
from toolkit.api.server import BackgroundServer, CrashWatcher, serve_in_background

__all__ = ["BackgroundServer", "CrashWatcher", "Limits", "create_app", "serve_in_background"]
