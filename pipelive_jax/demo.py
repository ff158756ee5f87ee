"""`pipelive demo`: live reconfiguration of a serving pipeline, shown and checked.

Streams a handful of chat requests over 2 stages, live-reconfigures to 3 uneven stages midway,
prints the phases, rounds, bytes and the pause, and confirms that the outputs are token-identical
to a run that never reconfigured.
"""

from __future__ import annotations

import time

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
SOURCE = [15, 15]
TARGET = {
    "stages": [
        {"devices": [0], "layers": [0, 8]},
        {"devices": [1], "layers": [8, 20]},
        {"devices": [2], "layers": [20, 30]},
    ]
}


def run_demo(model: str = "smollm2-135m", max_tokens: int = 48) -> int:
    from pipelive_jax.models.registry import load_model
    from pipelive_jax.serving.llm import LLM
    from pipelive_jax.serving.sampling import SamplingParams

    con = Console()
    con.print(f"[bold]pipelive demo[/bold]: {model}, plan {SOURCE} -> 3 uneven stages, live")
    loaded = load_model(model, progress=True)
    tok = loaded.tokenizer
    prompts = (
        [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
        if tok
        else [[1, 2, 3]] * 4
    )
    params = SamplingParams(max_tokens=max_tokens)
    opts = dict(max_model_len=256, num_pages=128, max_num_batched_tokens=256)

    con.print("reference run (no reconfiguration) ...")
    ref = LLM(loaded, plan=SOURCE, **opts).generate(prompts, params)

    llm = LLM(loaded, plan=SOURCE, **opts)
    eng = llm.engine
    queue = list(prompts)
    ids: list[str] = []

    def top_up() -> None:
        # Requests keep streaming: keep CONCURRENCY in flight while prompts remain.
        while queue and len(eng.scheduler.running) + len(eng.scheduler.waiting) < CONCURRENCY:
            ids.append(eng.add_request(queue.pop(0), params))

    top_up()
    while eng.step_count < 4:
        eng.step()
    con.print(f"serving on {eng.plan} ... reconfiguring live to {TARGET['stages']}")
    handle = eng.reconfigure(TARGET, mode="live", pause_budget_ms=10, verify=True)
    steps_during = 0
    while eng.has_unfinished() or queue:
        top_up()
        if not handle.done():
            steps_during += 1
        if not eng.step() and not eng.scheduler.has_unfinished():
            time.sleep(0.005)
    rep = handle.report()
    outs = [eng.get_output(i) for i in ids]

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
    s.add_row("engine steps during the reconfiguration", str(steps_during))
    s.add_row("requests served", str(len(outs)))
    con.print(s)
    same = all(a.token_ids == b.token_ids for a, b in zip(outs, ref, strict=True))
    for o in outs[:2]:
        con.print(f"[dim]{o.text.strip()[:100]!r}[/dim]")
    if same and rep.ok:
        con.print(
            f"[green]outputs of all {len(outs)} requests are token-identical to the run without reconfiguration[/green]"
        )
        return 0
    con.print(
        "[red]outputs differ from the run without reconfiguration[/red]"
        if not same
        else "[red]reconfiguration failed[/red]"
    )
    return 1
