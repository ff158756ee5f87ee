"""`pipelive demo`: live reconfiguration of a serving pipeline, shown and checked.

Streams chat requests over 2 stages, live-reconfigures to 3 uneven stages midway, prints the
phases, rounds, bytes and the pause, and confirms that every output is token-identical to a run
that never reconfigured.

Requests keep arriving (the prompts cycled, CONCURRENCY in flight) until the reconfiguration is
done: on a cold machine the new plan's ahead-of-time compilation alone takes tens of seconds, and
a fixed handful of requests would all finish before any KV page moved, which would show nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a pipeline is in one sentence.",
    "Name three primary colours.",
    "Give me a tip for learning to cook.",
    "What does a compiler do?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "What is 12 times 12?",
    "Write one sentence about autumn.",
    "How do bees make honey?",
    "What is the tallest mountain on Earth?",
    "Tell me a fun fact about octopuses.",
    "What is a good way to start the day?",
    "Explain gravity to a child.",
]
CONCURRENCY = 4
STEPS_BEFORE = 4  # engine steps served on the source plan before the reconfiguration starts


def plans(num_layers: int) -> tuple[list[int], dict[str, Any]]:
    """Source (2 even stages) and target (3 uneven stages: 8/12/10 of 30 layers, scaled)."""
    a, b = round(num_layers * 8 / 30), round(num_layers * 20 / 30)
    target = {
        "stages": [
            {"devices": [0], "layers": [0, a]},
            {"devices": [1], "layers": [a, b]},
            {"devices": [2], "layers": [b, num_layers]},
        ]
    }
    return [num_layers // 2, num_layers - num_layers // 2], target


@dataclass
class DemoResult:
    """One demo run: the reconfiguration's report and each served request against its reference.

    outputs[i] answered prompt prompt_index[i]; expected[k] is prompt k's tokens from the run that
    never reconfigured.
    """

    report: Any  # ReconfigReport
    outputs: list[Any]  # RequestOutput, in arrival order
    prompt_index: list[int]
    expected: list[list[int]]
    steps_during: int
    served_during: int  # requests that were in flight at some step of the reconfiguration

    @property
    def mismatched(self) -> list[int]:
        """Indices into outputs whose tokens differ from their prompt's reference."""
        return [
            i
            for i, (o, k) in enumerate(zip(self.outputs, self.prompt_index, strict=True))
            if o.token_ids != self.expected[k]
        ]

    @property
    def ok(self) -> bool:
        return bool(self.report.ok) and not self.mismatched


def live_demo(
    loaded: Any, max_tokens: int = 48, concurrency: int = CONCURRENCY, con: Console | None = None
) -> DemoResult:
    """Serves the prompts on the source plan, reconfigures live to the target while requests keep
    streaming, drains, and returns what happened next to the reference run's tokens."""
    from pipelive_jax.serving.llm import LLM
    from pipelive_jax.serving.sampling import SamplingParams

    con = con or Console()
    tok = loaded.tokenizer
    prompts = (
        [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
        if tok
        else [[1 + (7 * k + j) % 50 for j in range(5 + k % 7)] for k in range(len(PROMPTS))]
    )
    source, target = plans(loaded.config.num_layers)
    params = SamplingParams(max_tokens=max_tokens)
    opts = dict(max_model_len=256, num_pages=128, max_num_batched_tokens=256)

    eng = LLM(loaded, plan=source, **opts).engine
    ids: list[str] = []
    prompt_index: list[int] = []

    def top_up(limit: int | None = None) -> None:
        """Adds one request per step while fewer than `concurrency` are in flight. One, not a
        cohort: requests of equal length that start together also finish together, and a switch
        landing between two cohorts would find no sequence holding pages to move. Staggered
        starts keep some in flight at every step."""
        if len(eng.scheduler.running) + len(eng.scheduler.waiting) >= concurrency:
            return
        if limit is not None and len(ids) >= limit:
            return
        k = len(ids) % len(prompts)
        ids.append(eng.add_request(prompts[k], params))
        prompt_index.append(k)

    # The reference: every prompt once, on this engine before it reconfigures (the same
    # compiled functions and batch shapes then serve the live run: nothing compiles twice).
    con.print("reference run (no reconfiguration) ...")
    top_up(len(prompts))
    while eng.has_unfinished():
        eng.step()
        top_up(len(prompts))
    expected = [eng.get_output(i).token_ids for i in ids]
    ids.clear()
    prompt_index.clear()
    during: set[str] = set()

    start = eng.step_count
    while eng.step_count < start + STEPS_BEFORE:
        top_up()
        eng.step()
    con.print(f"serving on {eng.plan} ... reconfiguring live to {target['stages']}")
    handle = eng.reconfigure(target, mode="live", pause_budget_ms=10, verify=True)
    steps_during = 0
    while not handle.done():
        top_up()  # requests keep streaming for the whole reconfiguration
        during.update(r.request_id for r in eng.scheduler.running)
        steps_during += 1
        eng.step()
    while eng.has_unfinished():
        eng.step()
    return DemoResult(
        report=handle.report(),
        outputs=[eng.get_output(i) for i in ids],
        prompt_index=prompt_index,
        expected=expected,
        steps_during=steps_during,
        served_during=len(during),
    )


def print_result(res: DemoResult, con: Console) -> None:
    rep = res.report
    t = Table(title=f"reconfiguration {rep.source}  ->  {rep.target}")
    t.add_column("phase")
    t.add_column("ms", justify="right")
    for ph, ms in rep.phase_ms.items():
        t.add_row(ph, f"{ms:.1f}")
    con.print(t)
    s = Table(title="summary")
    s.add_column("what")
    s.add_column("value", justify="right")
    s.add_row("ok", str(rep.ok) + ("" if rep.ok else f" ({rep.reason})"))
    s.add_row("switch pause", f"{rep.pause_ms:.2f} ms" if rep.pause_ms is not None else "-")
    s.add_row("patch rounds", str(rep.rounds))
    s.add_row("weights moved", f"{rep.bytes_weights / 2**20:.1f} MiB")
    s.add_row("KV pre-copied", f"{rep.bytes_kv_precopy / 2**20:.2f} MiB")
    s.add_row("KV patched", f"{rep.bytes_kv_patched / 2**20:.3f} MiB")
    s.add_row("pages verified byte-identical", str(rep.verified_pages))
    s.add_row("compiled inside the pause", str(rep.compiled_in_pause))
    s.add_row("engine steps during the reconfiguration", str(res.steps_during))
    s.add_row("requests in flight during it", str(res.served_during))
    s.add_row("requests served", str(len(res.outputs)))
    con.print(s)
    for o in res.outputs[:2]:
        con.print(f"[dim]{o.text.strip()[:100]!r}[/dim]")


def run_demo(model: str = "smollm2-135m", max_tokens: int = 48) -> int:
    from pipelive_jax.models.registry import load_model

    con = Console()
    con.print(f"[bold]pipelive demo[/bold]: {model}, 2 stages -> 3 uneven stages, live")
    res = live_demo(load_model(model, progress=True), max_tokens=max_tokens, con=con)
    print_result(res, con)
    if res.ok:
        con.print(
            f"[green]outputs of all {len(res.outputs)} requests are token-identical to the run "
            "without reconfiguration[/green]"
        )
        return 0
    if not res.report.ok:
        con.print(f"[red]reconfiguration failed: {res.report.reason}[/red]")
    if res.mismatched:
        con.print(
            f"[red]{len(res.mismatched)} of {len(res.outputs)} outputs differ from the run "
            "without reconfiguration[/red]"
        )
    return 1
