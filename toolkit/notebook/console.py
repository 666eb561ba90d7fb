"""PromptConsole: submit prompts from ipywidgets and watch every answer stream into its own pane.

Requests go through the pipeline's callback API (`TokenGeneratorPipeline.submit`). One consumer thread makes every
widget change: click handlers and the callbacks (on the worker's I/O thread) only put events on its queue. So no
update races another, and none lands in the wrong cell (ipykernel 7 routes thread output by parent). The thread
exits when nothing is outstanding.
"""

from __future__ import annotations

import html
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets

from toolkit.errors import InvalidRequestError, ToolkitError
from toolkit.pipeline import Completion, RequestHandle, StreamChunk, TokenGeneratorPipeline
from toolkit.pipeline.generate import Prompt

from .kernel import adopt_parent, current_parent

IDLE_EXIT_S = 1.0  # the consumer thread exits after this long with nothing outstanding


# ---- events on the consumer's queue ---------------------------------------------------------------------


@dataclass(slots=True)
class _Submit:
    prompt: Prompt
    n: int
    params: dict[str, Any]


@dataclass(slots=True)
class _Cancel:
    request_id: str


@dataclass(slots=True)
class _Chunk:
    chunk: StreamChunk


@dataclass(slots=True)
class _Done:
    completion: Completion
    error: Exception | None


@dataclass(slots=True)
class _Close:
    pass


# ---- one request's pane ---------------------------------------------------------------------------------


def _pre(text: str) -> str:
    return f'<pre style="white-space: pre-wrap; margin: 0">{html.escape(text)}</pre>'


def timing_line(c: Completion) -> str:
    """'TTFT 0.123 s · 45.6 tokens/s · 32 tokens · length': how the request went, once it has ended."""
    ttft = "–" if c.ttft_s is None else f"{c.ttft_s:.3f}"
    return f"TTFT {ttft} s · {c.tokens_per_s:.1f} tokens/s · {len(c.token_ids)} tokens · {c.finish_reason}"


@dataclass(slots=True)
class RequestPane:
    """A request's pane: title and Cancel, the text streamed so far, and a timing line when it ends.

    `handle` is None for a request the worker refused (dead, stopped, full): its pane shows only the error.
    """

    request_id: str
    handle: RequestHandle | None
    box: widgets.VBox
    text: widgets.HTML
    timing: widgets.HTML
    cancel: widgets.Button
    shown: str = ""  # the text of every chunk so far
    token_ids: list[int] = field(default_factory=list)
    dirty: bool = False
    done: bool = False
    error: str | None = None

    @classmethod
    def create(
        cls, request_id: str, handle: RequestHandle | None, title: str, on_cancel: Callable[[str], None]
    ) -> RequestPane:
        text = widgets.HTML(_pre(""))
        text.add_class("tk-pane-text")
        timing = widgets.HTML("<i>streaming…</i>")
        timing.add_class("tk-pane-timing")
        cancel = widgets.Button(description="Cancel", button_style="warning", layout=widgets.Layout(width="6em"))
        cancel.on_click(lambda _: on_cancel(request_id))
        header = widgets.HBox([widgets.HTML(f"<b>{html.escape(title)}</b>"), cancel])
        box = widgets.VBox([header, text, timing], layout=widgets.Layout(border="1px solid #ddd", padding="4px"))
        box.add_class("tk-pane")
        return cls(request_id, handle, box, text, timing, cancel)

    def add(self, chunk: StreamChunk) -> None:
        self.shown += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self.text.value = _pre(self.shown)
            self.dirty = False

    def finish(self, completion: Completion) -> None:
        self.done = True
        self.shown = completion.text  # the same text, now also when the request ended without a last chunk
        self.dirty = True
        self.flush()
        self.timing.value = f"failed: {html.escape(self.error)}" if self.error else timing_line(completion)
        self.cancel.disabled = True

    def close(self) -> None:
        for w in (self.box, self.text, self.timing, self.cancel):
            w.close()


# ---- the console ----------------------------------------------------------------------------------------


class PromptConsole:
    """Prompt box, max-tokens and temperature controls, Submit and Submit ×N, one streaming pane per request.

    Extra keyword arguments (top_p, top_k, seed, stop, ignore_eos, ...) go to every request. `chat` sends the
    prompt through the chat template (default: when the tokenizer has one). `wait()` blocks until all is done.
    """

    def __init__(
        self,
        pipeline: TokenGeneratorPipeline,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        burst: int = 8,
        chat: bool | None = None,
        refresh_s: float = 0.1,
        max_panes: int = 32,
        **params: Any,
    ) -> None:
        self.pipeline = pipeline
        self.params = params
        self.chat = bool(getattr(pipeline.tokenizer, "chat_template", None)) if chat is None else chat
        self.refresh_s = refresh_s
        self.max_panes = max_panes
        self.panes: dict[str, RequestPane] = {}
        self.results: dict[str, Completion] = {}
        self._build_widgets(max_new_tokens, temperature, burst)
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._thread: threading.Thread | None = None
        self._parent = current_parent()
        self._count = 0

    def _build_widgets(self, max_new_tokens: int, temperature: float, burst: int) -> None:
        limit = max(max_new_tokens, min(1024, self.pipeline.worker.info.max_model_len - 1))
        self.prompt = widgets.Textarea(placeholder="Type a prompt…", layout=widgets.Layout(width="96%"))
        self.prompt.add_class("tk-prompt")
        label = {"description_width": "initial"}
        self.max_tokens = widgets.IntSlider(
            value=max_new_tokens, min=1, max=limit, description="max tokens", style=label
        )
        self.temperature = widgets.FloatSlider(
            value=temperature, min=0.0, max=2.0, step=0.05, description="temperature", style=label
        )
        self.submit_button = widgets.Button(description="Submit", button_style="primary")
        self.submit_button.add_class("tk-submit")
        self.burst_size = widgets.BoundedIntText(value=burst, min=1, max=256, layout=widgets.Layout(width="5em"))
        self.burst_button = widgets.Button(description=f"Submit ×{burst}")
        self.status = widgets.HTML()
        self.panes_box = widgets.VBox()
        self.submit_button.on_click(lambda _: self.submit())
        self.burst_button.on_click(lambda _: self.submit(n=self.burst_size.value))
        self.burst_size.observe(self._relabel, names="value")
        controls = widgets.HBox([self.max_tokens, self.temperature])
        buttons = widgets.HBox([self.submit_button, self.burst_button, widgets.Label("N ="), self.burst_size])
        self.widget = widgets.VBox([self.prompt, controls, buttons, self.status, self.panes_box])

    def _relabel(self, change: dict[str, Any]) -> None:
        self.burst_button.description = f"Submit ×{change['new']}"

    # ---- what users and tests call ------------------------------------------------------------

    def submit(self, prompt: str | None = None, n: int = 1) -> None:
        """Queue `n` requests of `prompt` (default: the prompt box) with the current controls; returns at once."""
        text = self.prompt.value if prompt is None else prompt
        params = {"max_new_tokens": int(self.max_tokens.value), "temperature": float(self.temperature.value)}
        payload: Prompt = [{"role": "user", "content": text}] if self.chat else text
        self._post(_Submit(payload, n, {**params, **self.params}), outstanding=n)

    def cancel(self, request_id: str) -> None:
        self._post(_Cancel(request_id))

    def wait(self, timeout_s: float | None = 60.0) -> bool:
        """Block until every submitted request has ended and its pane is final; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout_s)

    def close(self) -> None:
        """Cancel whatever still runs and stop the consumer thread (there is none while idle)."""
        with self._idle:
            thread = self._thread
            if thread is not None:
                self._events.put(_Close())
        if thread is not None:
            thread.join(timeout=10)

    def _post(self, event: object, outstanding: int = 0) -> None:
        with self._idle:
            self._outstanding += outstanding
            self._events.put(event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="toolkit-console", daemon=True)
                self._thread.start()

    # ---- the consumer thread ------------------------------------------------------------------

    def _run(self) -> None:
        last_flush = 0.0
        with adopt_parent(self._parent):
            while True:
                dirty = any(p.dirty for p in self.panes.values())
                try:
                    event = self._events.get(timeout=self.refresh_s if dirty else IDLE_EXIT_S)
                except queue.Empty:
                    event = None
                if isinstance(event, _Close):
                    self._close_all()
                    self._exit_if_idle(force=True)
                    return
                if event is None:
                    if self._exit_if_idle(force=False):
                        return
                else:
                    self._handle(event)
                if time.monotonic() - last_flush >= self.refresh_s:
                    for pane in self.panes.values():
                        pane.flush()
                    last_flush = time.monotonic()

    def _exit_if_idle(self, force: bool) -> bool:
        with self._idle:
            if force or (self._outstanding == 0 and self._events.empty()):
                self._outstanding = 0
                self._idle.notify_all()
                self._thread = None
                return True
            return False

    def _handle(self, event: object) -> None:
        try:
            if isinstance(event, _Submit):
                self._start(event)
            elif isinstance(event, _Cancel):
                pane = self.panes.get(event.request_id)
                if pane is not None:
                    self._cancel_pane(pane)
            elif isinstance(event, _Chunk):
                pane = self.panes.get(event.chunk.request_id)
                if pane is not None and not pane.done:
                    pane.add(event.chunk)
            elif isinstance(event, _Done):
                self._on_done(event)
        except Exception as exc:  # the console must outlive any one bad event
            self._set_status(f"error: {type(exc).__name__}: {exc}")

    def _start(self, event: _Submit) -> None:
        status = f"submitted {event.n} request{'s' if event.n > 1 else ''}"
        for i in range(event.n):
            self._count += 1
            try:
                handle = self.pipeline.submit(
                    event.prompt, on_chunk=lambda c: self._post(_Chunk(c)),
                    on_done=lambda c, e: self._post(_Done(c, e)), **event.params,
                )
            except Exception as exc:
                if isinstance(exc, InvalidRequestError) or not isinstance(exc, ToolkitError):  # nothing was sent
                    status = f"not sent: {type(exc).__name__}: {exc}"
                    self._done(event.n - i)
                    break
                # the worker is dead, stopped or full: this pane ends at once
                pane = RequestPane.create(f"not-sent-{self._count}", None, self._title(event), self.cancel)
                self.panes[pane.request_id] = pane
                pane.error = f"{type(exc).__name__}: {exc}"
                self._finish(pane, Completion(pane.request_id, "", [], None, 0))
                continue
            pane = RequestPane.create(handle.request_id, handle, self._title(event), self.cancel)
            self.panes[pane.request_id] = pane
        self._show_panes()
        self._set_status(status)

    def _title(self, event: _Submit) -> str:
        text = event.prompt[-1]["content"] if isinstance(event.prompt, list) else str(event.prompt)
        short = text if len(text) <= 60 else text[:57] + "…"
        return f"#{self._count} {short!r}"

    def _on_done(self, event: _Done) -> None:
        pane = self.panes.get(event.completion.request_id)
        if pane is None or pane.done:
            return
        if event.error is not None:  # WorkerCrashedError and friends end this request only
            pane.error = f"{type(event.error).__name__}: {event.error}"
        self._finish(pane, event.completion)

    def _finish(self, pane: RequestPane, completion: Completion) -> None:
        self.results[pane.request_id] = completion
        pane.finish(completion)
        self._done(1)

    def _done(self, n: int) -> None:
        with self._idle:
            self._outstanding -= n
            self._idle.notify_all()

    def _cancel_pane(self, pane: RequestPane) -> None:
        """End the pane now (the _Done that cancel() also posts then finds it done)."""
        handle = pane.handle
        if not pane.done and handle is not None:
            handle.cancel()
            assert handle.completion is not None
            self._on_done(_Done(handle.completion, handle.error))

    def _close_all(self) -> None:
        for pane in self.panes.values():
            self._cancel_pane(pane)

    def _show_panes(self) -> None:
        """Newest last; once over max_panes, the oldest finished panes are dropped from view."""
        shown = list(self.panes.values())
        while len(shown) > self.max_panes and shown[0].done:
            old = shown.pop(0)
            del self.panes[old.request_id]
            old.close()
        self.panes_box.children = tuple(p.box for p in shown)

    def _set_status(self, message: str) -> None:
        self.status.value = html.escape(message)

    # ---- notebook protocol --------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"PromptConsole({len(self.panes)} panes, {self._outstanding} outstanding)"
