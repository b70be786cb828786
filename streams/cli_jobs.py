"""`rmo job` and `rmo escalations`: Cortex jobs from the command line (streams/jobs.py holds
the operations; this module parses, calls and renders)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from streams import jobs
from streams.cli_common import fail, services

job_app = typer.Typer(help="Cortex jobs: a coordinator, domain masters with budgets, escalations (agents/cortex).",
                      no_args_is_help=True)
escalations_app = typer.Typer(help="What the coordinator asks a person: failed subtasks, exhausted budgets.",
                              no_args_is_help=True)


def _read(file: str, what: str) -> tuple[str, str]:
    """(text, source name) of a file argument, ``-`` being stdin."""
    if file == "-":
        return sys.stdin.read(), "stdin"
    path = Path(file)
    if not path.is_file():
        raise fail(f"{file} is not a file; give {what} or - for stdin")
    return path.read_text(), file


@job_app.command("submit")
def job_submit(file: Annotated[str, typer.Argument(help="JSON job document, or - for stdin.")]) -> None:
    """Produce one JobSubmitted to the jobs topic; prints the job id. The job is checked
    first (subtasks, dependencies, budget): a bad one submits nothing. See `rmo schema
    JobSubmitted`."""
    text, source = _read(file, "a JSON job document")
    try:
        event = jobs.parse_job(text, source)
    except jobs.InvalidJob as exc:
        raise fail(f"{exc}; a job is one JSON object with job_id and goal or subtasks "
                   "(see `rmo schema JobSubmitted`)") from None
    with services() as s:
        submitted = asyncio.run(jobs.submit_job(s, event))
    typer.echo(submitted.job_id)


@job_app.command("list")
def job_list(as_json: Annotated[bool, typer.Option("--json")] = False,
             limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 100) -> None:
    """The namespace's jobs, newest first: phase, end status, subtasks accepted, tokens used
    of the budget, open escalations."""
    with services() as s:
        lines = asyncio.run(jobs.list_jobs(s, limit))
    if as_json:
        typer.echo(json.dumps([j.to_dict() for j in lines]))
        return
    if not lines:
        typer.echo("no jobs (submit one with `rmo job submit FILE`)", err=True)
    for j in lines:
        budget = f"{j.budget_tokens:,}" if j.budget_tokens is not None else "unlimited"
        typer.echo(f"{j.job_id}  {j.submitted_at[:19]}  {j.phase:8} {j.status or '-':9} "
                   f"{j.accepted}/{j.subtasks} accepted  {j.tokens_used:,} of {budget} tokens  "
                   f"{j.escalations} open escalation(s)")


@job_app.command("status")
def job_status(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A job's phase, its masters' budget lines (allocated, used, held, reserve granted), its
    subtasks and open escalations. Exit 1 when no job of that id was applied."""
    with services() as s:
        try:
            report = asyncio.run(jobs.job_status(s, job_id))
        except jobs.JobNotFound as exc:
            raise fail(f"{exc} (a worker applies submitted jobs; is one running?)", code=1) from None
    typer.echo(json.dumps(report.to_dict()) if as_json else "\n".join(report.render()))


@job_app.command("report")
def job_report(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", help="Directory to write job-ID.md and job-ID.html into.")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Write the job's run report (Cortex phase 5): executive summary, per-master detail,
    token budget flow, timeline and artefacts, as Markdown and a self-contained HTML page
    with plots; prints the two paths."""
    from streams.job_report import build_job_report  # matplotlib: only for this command

    with services() as s:
        try:
            report = asyncio.run(build_job_report(s, job_id))
        except jobs.JobNotFound as exc:
            raise fail(f"{exc} (a worker applies submitted jobs; is one running?)", code=1) from None
    try:
        md, page = report.write(out)
    except OSError as exc:
        raise fail(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    if as_json:
        typer.echo(json.dumps({"markdown": str(md), "html": str(page), "events": report.events}))
    else:
        typer.echo(f"{md}\n{page}")


@escalations_app.command("list")
def escalations_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Open escalations: id, job, subtask, master, reason and detail."""
    with services() as s:
        open_ = asyncio.run(jobs.list_escalations(s))
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in open_]))
        return
    if not open_:
        typer.echo("no open escalations", err=True)
    for e in open_:
        typer.echo(f"{e.escalation_id}  {e.domain}  {e.reason}  {e.detail}")


@escalations_app.command("resolve")
def escalations_resolve(
    escalation_id: str,
    answer: Annotated[str | None, typer.Option("--answer", help="File holding the subtask's answer (- for stdin).")] = None,
    skip: Annotated[bool, typer.Option("--skip", help="Skip the subtask (and what depends on it).")] = False,
) -> None:
    """Give an escalated subtask its answer, or skip it; the job goes on."""
    if (answer is None) == (not skip):
        raise fail("give --answer FILE or --skip (one of them)")
    text = _read(answer, "a file holding the answer")[0] if answer is not None else None
    with services() as s:
        try:
            r = asyncio.run(jobs.resolve_escalation(s, escalation_id, answer=text, skip=skip))
        except jobs.EscalationNotFound as exc:
            raise fail(str(exc), code=1) from None
    typer.echo(f"{'skipped' if r.skipped else 'answered'} {r.escalation_id}")
