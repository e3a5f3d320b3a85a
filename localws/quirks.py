"""Quirks: what the real Databricks services do that the local workspace does only when asked.

By default the local workspace is kind, so the README's walk-through stays quick. Each quirk plays one behaviour
of the real services (found in the SDK's source, Databricks' own clients and the docs). A test switches on the
ones it needs with `localws.Emulator(quirks={...})`, and `localws.start(quirks=...)` takes the same names.
`python primary.py` plays every quirk with `--harsh` ("as harsh as the real one"), else those LOCALWS_HARSH names
(`from_env`): "1" for all of them, or a comma-separated list. A new quirk is one line in QUIRKS and a check of
`name in emulator.quirks` where it applies.
"""
import logging
import os

log = logging.getLogger(__name__)

QUIRKS = {
    "genie_self_correction": "answers with SQL are self-corrected: a failed first query attachment (and a text "
                             "about it), then the query that answers",
    "genie_clarifying_question": "a question the answerer can't answer is COMPLETED with a clarifying question "
                                 "(text purpose FOLLOW_UP_QUESTION) instead of FAILED",
    "genie_suggested_questions": "completed answers carry suggested follow-up questions",
    "genie_summary_without_id": "the summary text attachment has no attachment_id",
    "genie_description_only": "every second answer with SQL has no text: the query's description is its only "
                              "explanation",
    "genie_pending_results": "a re-executed query reads PENDING, then RUNNING, and SUCCEEDED only after "
                             "genie_result_delay seconds (the warehouse starting)",
    "genie_result_expiry": "a query result expires genie_result_ttl seconds after it is ready: the message reads "
                           "QUERY_RESULT_EXPIRED and its result CLOSED until re-executed",
    "genie_rate_limit": "5 questions a minute per workspace; more are answered 429 with Retry-After",
    "jobs_queued": "every run first waits QUEUED for jobs_queue_delay seconds, queue_details "
                   "ACTIVE_RUNS_LIMIT_REACHED (as when the workspace's limit of active runs is reached), then starts",
}
HARSH = frozenset(QUIRKS)  # all of them
ENV = "LOCALWS_HARSH"


def check(names) -> frozenset:
    """The quirk names as a set; a ValueError names any unknown one and lists the known ones."""
    names = frozenset(names or ())
    unknown = sorted(names - HARSH)
    if unknown:
        raise ValueError(f"unknown local workspace quirk(s) {', '.join(unknown)}; known: {', '.join(sorted(QUIRKS))}")
    return names


def from_env(env=os.environ) -> frozenset:
    """LOCALWS_HARSH: "1" (or true, yes, all) for every quirk, "0" or unset for none, else a comma-separated list
    of names (unknown ones are left out with a warning)."""
    value = env.get(ENV, "").strip()
    if value.lower() in ("1", "true", "yes", "all"):
        return HARSH
    names = {name.strip() for name in value.split(",") if name.strip()} - {"0", "false", "no"}
    if names - HARSH:
        log.warning("%s: unknown quirk(s) %s left out; known: %s", ENV, ", ".join(sorted(names - HARSH)),
                    ", ".join(sorted(QUIRKS)))
    return frozenset(names & HARSH)
