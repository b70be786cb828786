"""Security specialist: does the task ask for dangerous capabilities? (SPEC §4)

Looks for five risk categories in three places: the modules the prompt imports, the
functions its code calls, and the wording of its docstring / text. Candidates always run in
the sandbox; a finding here tells the executor and validator that a correct answer may need
what the sandbox forbids, and tells the solver what to avoid.

Categories (fixed order): ``files``, ``network``, ``subprocess``, ``dynamic_code``, ``stdin``.
"""

from __future__ import annotations

import re

from agents.analyzers.syntax import prompt_syntax
from models.events import AnalyzerResult, TaskSubmitted

NAME = "security"

RISKS: tuple[str, ...] = ("files", "network", "subprocess", "dynamic_code", "stdin")
"""The risk categories, in the order findings are reported."""

_DESCRIPTION = {
    "files": "file system access",
    "network": "network access",
    "subprocess": "running processes or shell commands",
    "dynamic_code": "dynamic code execution or unsafe deserialisation",
    "stdin": "interactive input (the sandbox has no stdin)",
}
_IMPORTS = {
    "files": {"os", "shutil", "pathlib", "tempfile", "glob", "fileinput"},
    "network": {
        "socket",
        "ssl",
        "urllib",
        "http",
        "requests",
        "httpx",
        "aiohttp",
        "ftplib",
        "smtplib",
        "telnetlib",
        "poplib",
        "imaplib",
        "xmlrpc",
        "websocket",
        "websockets",
    },
    "subprocess": {"subprocess", "multiprocessing", "pty"},
    "dynamic_code": {"importlib", "pickle", "marshal", "shelve", "ctypes", "code", "dill"},
}
# Exact dotted call names; module-prefixed families are matched with _CALL_PREFIXES.
_CALLS = {
    "files": {
        "open",
        "io.open",
        "os.remove",
        "os.unlink",
        "os.rmdir",
        "os.mkdir",
        "os.makedirs",
        "os.rename",
        "os.replace",
        "os.listdir",
        "os.walk",
        "os.chmod",
    },
    "subprocess": {"os.system", "os.popen", "os.fork", "os.kill"},
    "dynamic_code": {
        "eval",
        "exec",
        "compile",
        "__import__",
        "pickle.load",
        "pickle.loads",
        "marshal.loads",
    },
    "stdin": {"input", "sys.stdin.read", "sys.stdin.readline"},
}
_CALL_PREFIXES = {
    "files": ("shutil.", "pathlib.", "tempfile."),
    "network": ("socket.", "urllib.", "http.", "requests.", "httpx."),
    "subprocess": ("subprocess.", "os.exec", "os.spawn", "multiprocessing."),
}
# Prose patterns run on the lowercased text, each only when one of its trigger substrings
# occurs: substring tests are ~100x cheaper than a regex scan, and most tasks have none.
_PROSE: dict[str, tuple[tuple[str, ...], re.Pattern[str]]] = {
    "files": (
        ("file", "director", "folder"),
        re.compile(
            r"\b(?:read|write|open|save|load|delete|remove|create|append|list)(?:s|ing|ed)?\b"
            r"[^.\n]{0,25}\b(?:files?|director(?:y|ies)|folders?)\b|\bfile ?system\b"
        ),
    ),
    "network": (
        ("http", "url", "load", "web", "internet", "network", "socket", "api", "mail"),
        re.compile(
            r"https?://|\b(?:urls?|download|upload|http requests?|web ?pages?|websites?|"
            r"internet|network|sockets?|rest api|send (?:an )?e-?mail)\b"
        ),
    ),
    "subprocess": (
        ("subprocess", "shell", "command", "terminal", "bash"),
        re.compile(
            r"\b(?:subprocess|shell commands?|(?:run|execute)s? (?:a |the )?(?:shell )?commands?|"
            r"command line|terminal|bash)\b"
        ),
    ),
    "dynamic_code": (
        ("eval", "exec", "code", "pickle", "deseriali"),
        re.compile(
            r"\b(?:eval|exec|(?:run|execute)s? (?:arbitrary|the given|python) code|pickle|"
            r"deseriali[sz]\w*)\b"
        ),
    ),
    "stdin": (
        ("stdin", "input", "prompt the user"),
        re.compile(r"\b(?:stdin|standard input|user input|prompt the user)\b"),
    ),
}


def findings(task: TaskSubmitted) -> dict[str, list[str]]:
    """Risk category -> evidence strings (``"imports socket"``, ``"calls eval"``, ``"mentions
    'download'"``), only for categories with evidence, in :data:`RISKS` order."""
    info = prompt_syntax(task.prompt, task.entry_point, task.kind)
    evidence: dict[str, list[str]] = {}
    top_imports = {module.split(".")[0] for module, level in info.imports if level == 0}
    text = info.text.lower()
    for risk in RISKS:
        found = [f"imports {m}" for m in sorted(top_imports & _IMPORTS.get(risk, set()))]
        found += [
            f"calls {c}"
            for c in sorted(info.calls)
            if c in _CALLS.get(risk, set()) or c.startswith(_CALL_PREFIXES.get(risk, ()))
        ]
        triggers, pattern = _PROSE[risk]
        if any(t in text for t in triggers) and (match := pattern.search(text)):
            found.append(f"mentions {match.group(0)!r}")
        if found:
            evidence[risk] = found
    return evidence


def analyze(task: TaskSubmitted) -> AnalyzerResult:
    """Report each risk category with its evidence; fewer findings, higher confidence.

    Confidence is 0.9 with no finding, minus 0.2 per category (floor 0.1): it is this
    specialist's confidence that the task is safe to solve in the sandbox. Features:
    ``risks`` (categories found). Pure and deterministic.
    """
    evidence = findings(task)
    issues = [f"{_DESCRIPTION[r]}: {', '.join(ev)}" for r, ev in evidence.items()]
    recommendations: list[str] = []
    action_items: list[str] = []
    if evidence:
        recommendations.append(
            "candidates run in the sandbox (no network, read-only files): a correct answer "
            "may fail there; review before running elsewhere"
        )
    if "dynamic_code" in evidence:
        action_items.append("do not use eval/exec or pickle: parse the input explicitly")
    if "stdin" in evidence:
        action_items.append("take inputs as function arguments, never from stdin")
    if evidence.keys() & {"files", "network", "subprocess"}:
        action_items.append("avoid file, network and process access unless the task needs it")
    return AnalyzerResult(
        name=NAME,
        confidence=round(max(0.9 - 0.2 * len(evidence), 0.1), 3),
        issues=issues,
        recommendations=recommendations,
        action_items=action_items,
        features={"risks": list(evidence)},
    )
