"""OperationOutcome: how every FHIR error CardioScan returns is worded."""

from __future__ import annotations

from typing import Any


def operation_outcome(
    diagnostics: str, *, code: str = "invalid", severity: str = "error",
    expression: list[str] | None = None,
) -> dict[str, Any]:
    """One-issue OperationOutcome; identical in R4 and R5.

    ``code`` is from the IssueType value set (``structure``, ``invalid``, ``too-costly``,
    ``not-supported``, ``processing``, ``not-found``, ``exception``, ``timeout``...).
    """
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_text(outcome: Any) -> str:
    """The diagnostics of an OperationOutcome (or a short repr of anything else), one line."""
    if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in outcome.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
            parts.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {text}".strip())
        return "; ".join(parts) or "OperationOutcome without issues"
    return str(outcome)[:500]
