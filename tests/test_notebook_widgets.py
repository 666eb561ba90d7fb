"""PromptConsole driven at the widget-model level: set trait values, click buttons, watch the panes."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import tiny_settings
from toolkit import TokenGeneratorPipeline, start_model_worker
from toolkit.notebook import PromptConsole
from toolkit.notebook.console import RequestPane

TIMING = re.compile(r"^TTFT \d+\.\d{3} s · \d+\.\d tokens/s · (\d+) tokens · (stop|length|cancelled)$")


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0, message: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out {message()}"
        time.sleep(0.01)


@pytest.fixture
def console(tiny_pipe: TokenGeneratorPipeline) -> Iterator[PromptConsole]:
    c = PromptConsole(tiny_pipe, max_new_tokens=24, refresh_s=0.0, ignore_eos=True)
    yield c
    c.close()


def record_text(pane: RequestPane, log: list[tuple[str, str]]) -> None:
    pane.text.observe(lambda change: log.append((threading.current_thread().name, change["new"])), names="value")


def test_submit_streams_text_into_a_pane_and_ends_with_a_timing_line(console: PromptConsole) -> None:
    updates: list[tuple[str, str]] = []
    console.prompt.value = "Tell me about continuous batching"
    console.max_tokens.value = 24
    seen_panes: list[RequestPane] = []

    def watch(change: dict) -> None:
        for pane in console.panes.values():
            if pane not in seen_panes:
                seen_panes.append(pane)
                record_text(pane, updates)

    console.panes_box.observe(watch, names="children")
    console.submit_button.click()
    assert console.wait(timeout_s=30)

    assert len(console.panes) == 1
    (pane,) = console.panes.values()
    done = console.results[pane.request_id]
    assert done.finish_reason == "length" and len(done.token_ids) == 24
    texts = [value for _, value in updates]
    assert len(set(texts)) >= 3, "the text should arrive in several updates, not at once"
    assert texts[-1] == pane.text.value and done.text and done.text[:20] in pane.text.value.replace("&#x27;", "'")
    match = TIMING.match(pane.timing.value)
    assert match and match.group(1) == "24" and match.group(2) == "length"
    assert pane.cancel.disabled
    assert {name for name, _ in updates} == {"toolkit-console"}, "every pane update comes from the consumer thread"


def test_the_pane_shows_what_generate_returns(console: PromptConsole, tiny_pipe: TokenGeneratorPipeline) -> None:
    console.submit("The same prompt twice")
    assert console.wait(timeout_s=30)
    (done,) = console.results.values()
    expected = tiny_pipe.generate([{"role": "user", "content": "The same prompt twice"}], max_new_tokens=24,
                                  ignore_eos=True)
    assert done.token_ids == expected.token_ids and done.text == expected.text


def test_submit_times_n_opens_one_pane_per_request(console: PromptConsole) -> None:
    console.prompt.value = "load"
    console.burst_size.value = 6
    assert console.burst_button.description == "Submit ×6"
    console.burst_button.click()
    assert console.wait(timeout_s=30)
    assert len(console.panes) == 6 and len(console.panes_box.children) == 6
    assert len(console.results) == 6
    for pane in console.panes.values():
        assert TIMING.match(pane.timing.value), pane.timing.value
    assert "submitted 6 requests" in console.status.value


def test_cancel_stops_one_request_and_keeps_its_text(console: PromptConsole) -> None:
    console.prompt.value = "a long answer please"
    console.max_tokens.value = console.max_tokens.max
    console.burst_size.value = 2
    console.burst_button.click()
    wait_until(lambda: len(console.panes) == 2 and all(p.token_ids for p in console.panes.values()),
               message=lambda: f"{console.status.value} {console.panes}")
    first, second = console.panes.values()
    first.cancel.click()
    wait_until(lambda: first.request_id in console.results)
    assert console.results[first.request_id].finish_reason == "cancelled"
    assert TIMING.match(first.timing.value).group(2) == "cancelled"
    assert second.request_id not in console.results, "cancel touches only its own request"
    second.cancel.click()
    assert console.wait(timeout_s=30)
    assert len(console.results[second.request_id].token_ids) < console.max_tokens.value


def test_a_bad_prompt_is_reported_and_nothing_is_sent(console: PromptConsole) -> None:
    console.prompt.value = "   "
    console.submit_button.click()
    assert console.wait(timeout_s=10)
    assert not console.panes
    assert console.status.value.startswith("not sent: InvalidRequestError")
    console.prompt.value = "fine now"
    console.submit_button.click()
    assert console.wait(timeout_s=30)
    assert len(console.results) == 1


def test_the_consumer_thread_exits_when_idle(console: PromptConsole) -> None:
    console.submit("short", n=2)
    assert console.wait(timeout_s=30)
    wait_until(lambda: not any(t.name == "toolkit-console" for t in threading.enumerate()), timeout_s=10)


def test_the_console_displays_as_a_widget(console: PromptConsole) -> None:
    bundle = console._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == console.widget.model_id


def test_a_worker_crash_ends_the_panes_with_the_error() -> None:
    with start_model_worker(tiny_settings()) as worker:
        console = PromptConsole(TokenGeneratorPipeline(worker), max_new_tokens=1500, ignore_eos=True)
        console.submit("a long one")
        wait_until(lambda: any(p.token_ids for p in console.panes.values()))
        os.kill(worker.pid, signal.SIGKILL)
        assert console.wait(timeout_s=10), "a crash must end the request, not leave it hanging"
        (pane,) = console.panes.values()
        assert pane.timing.value.startswith("failed: WorkerCrashedError") and pane.shown

        console.submit("after the crash")
        assert console.wait(timeout_s=10)
        assert list(console.panes.values())[-1].timing.value.startswith("failed: WorkerCrashedError")
        console.close()
