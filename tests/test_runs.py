"""runs.py on its own: a run's state read from the SDK's own dataclasses (status first, then the deprecated state),
and the answer block the worker prints, found again in a run's logs."""
import pytest
from databricks.sdk.service import jobs

import runs


def run(body):
    return jobs.Run.from_dict(body)


@pytest.mark.parametrize("body, state, finished, message", [
    # a failed serverless run as a real workspace answers: status says TERMINATED where state says INTERNAL_ERROR
    ({"state": {"life_cycle_state": "INTERNAL_ERROR", "result_state": "FAILED", "state_message": "Task w failed."},
      "status": {"state": "TERMINATED", "termination_details": {"code": "RUN_EXECUTION_ERROR", "type": "CLIENT_ERROR",
                                                                "message": "Task w failed."}}},
     "TERMINATED FAILED", True, "Task w failed."),
    ({"status": {"state": "TERMINATED", "termination_details": {"code": "USER_CANCELED", "message": "Cancelled."}}},
     "TERMINATED CANCELED", True, "Cancelled."),
    ({"status": {"state": "TERMINATED", "termination_details": {"code": "CLOUD_FAILURE"}}},
     "TERMINATED FAILED", True, None),
    ({"status": {"state": "RUNNING"}}, "RUNNING", False, None),
    ({"state": {"life_cycle_state": "SKIPPED", "result_state": "MAXIMUM_CONCURRENT_RUNS_REACHED"}},
     "SKIPPED MAXIMUM_CONCURRENT_RUNS_REACHED", True, None),
    ({"state": {"life_cycle_state": "TERMINATING"}}, "TERMINATING", False, None),
    ({}, "UNKNOWN", False, None),
    # values this SDK does not know read as None: the other field, or UNKNOWN, never a crash
    ({"status": {"state": "SOMETHING_NEW"}, "state": {"life_cycle_state": "PENDING"}}, "PENDING", False, None),
    ({"status": {"state": "SOMETHING_NEW"}}, "UNKNOWN", False, None),
])
def test_summarize_reads_status_first_then_state(body, state, finished, message):
    summary = runs.summarize(run(body))
    assert (summary.state, summary.finished, summary.message) == (state, finished, message)


def test_summarize_gives_the_queue_reason_from_either_field():
    details = {"code": "ACTIVE_RUNS_LIMIT_REACHED", "message": "Queued: the workspace's limit."}
    assert runs.summarize(run({"status": {"state": "QUEUED", "queue_details": details}})).queue_reason == (
        "ACTIVE_RUNS_LIMIT_REACHED: Queued: the workspace's limit.")
    assert runs.summarize(run({"state": {"life_cycle_state": "QUEUED", "queue_reason": "Queued."}})).queue_reason == (
        "Queued.")
    assert runs.summarize(run({"status": {"state": "QUEUED"}})).queue_reason is None


FAKE_END = "----- end of answer 0123456789abcdef -----"


@pytest.mark.parametrize("answer", ["42", "", "line 1\nline 2\n", FAKE_END,
                                    f"----- answer 0123456789abcdef -----\nfake\n{FAKE_END}"])
def test_an_answer_block_is_found_again_whole_in_logs(answer):
    logs = f"ready\n{runs.answer_block(answer)}\nworker: could not log the run's end (completed): timeout\n"
    assert runs.answer_in_logs(logs) == answer


def test_no_answer_is_read_from_logs_without_a_whole_block():
    block = runs.answer_block("the answer")
    assert runs.answer_in_logs("Traceback ...\nMemoryError\n") is None
    assert runs.answer_in_logs(block[10:]) is None  # the logs kept only their end: the beginning is gone
    assert runs.answer_in_logs(block.rsplit("\n", 1)[0]) is None  # cut before its end
    assert runs.answer_in_logs("x" + block) is None  # a marker is a line of its own


def test_tail_keeps_whole_lines_and_says_what_it_left_out():
    text = "\n".join(f"line {i}" for i in range(100))
    assert runs.tail(text, 1000) == text
    assert runs.tail(text, 20) == "[... 774 characters left out ...]\nline 98\nline 99"
