"""The terminal chat of `python primary.py`: a prompt, the agent's replies and the slash commands, on the configured
Databricks workspace or, without one, on the local stand-in workspace (the localws package).

`main()` reads the environment once into `Config`, `setup()` builds the agent's clients (the SDK is imported there,
not at the top), and `Terminal` runs the chat, with `/watch` following a run's steps live. `primary.py` calls
`main()` from its `__main__` block. `--traces DIR` writes MLflow traces of the turns (and of the local job runs) to
a local tracking directory (tracing.py; mlflow is imported only then).
"""
import argparse
import configparser
import dataclasses
import itertools
import logging
import os
import re
import select
import signal
import sys
import textwrap
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg_pool import PoolTimeout

import lakebase
import llm
import tracing
from agent_io import BadRequest, check_thread_id
from llm import DEFAULT_ENDPOINT
from primary import AgentConfig, ConfigError, PrimaryAgent, TurnFailed, build_agent
from runs import describe_step, shorten, summarize

try:
    import readline  # line editing and history, where the platform has it
except ImportError:
    readline = None

HERE = Path(__file__).resolve().parent
log = logging.getLogger("terminal")
PROMPT = "> "
HEAD_LINES, TAIL_LINES = 30, 10  # a longer reply is shown as its head and tail (/last shows all of it)
RECAP_TURNS, RECAP_MESSAGES = 3, 40  # a continued thread's recap: its last exchanges, from its last messages
PASTE_SECONDS = 0.05  # without readline, lines arriving this soon after a line are pasted with it

HELP = """commands:
  /new [NAME]     start a new thread (named NAME, or a random id)
  /thread ID      switch to thread ID (a recap of its last turns if it has some)
  /runs           this thread's job runs and their states
  /watch RUN_ID   follow a run's steps live until it ends (Ctrl-C stops watching; the run goes on)
  /last           the last reply in full (a long one is shown as its head and tail)
  /help           this help
  /quit           leave (so does Ctrl-D)"""
ENVIRONMENT = f"""environment:
  DATABRICKS_HOST, DATABRICKS_TOKEN, DATABRICKS_CONFIG_PROFILE, ...
                  the workspace (the SDK's own auth); without one (no host, no profile, no DEFAULT profile in
                  ~/.databrickscfg) the local workspace starts
  DATABRICKS_JOB_ID
                  the worker job's id (needed with a workspace)
  LAKEBASE_DSN (or PGHOST, PGUSER, ...), LAKEBASE_INSTANCE or LAKEBASE_ENDPOINT, LAKEBASE_DATABASE
                  the Postgres of threads and step logs (one of them is needed with a workspace)
  LLM_ENDPOINT_NAME
                  the chat model's serving endpoint (default {DEFAULT_ENDPOINT})
  LLM_BASE_URL, LLM_MODEL, LLM_API_KEY
                  an OpenAI-compatible server instead (e.g. http://127.0.0.1:11434/v1)
  LOG_LEVEL       log records on stderr at this level (unset: warnings are said as plain notes)"""


UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # categories: controls, format (bidi, zero-width), surrogates, separators
MAYBE_UNSAFE = re.compile(r"[^\t\n\x20-\x7e]")  # what is not printable ASCII, newline or tab is looked up


def printable(text) -> str:
    """`text` as the terminal may show it: control characters (but newline and tab), bidi controls, zero-width and
    other invisible characters and line separators escaped (\\x1b, \\u202e), so text from storage, a model, Genie or
    a user can't move the cursor, recolour, retitle the window or reorder what the screen shows."""
    return MAYBE_UNSAFE.sub(_escaped, str(text))


def _escaped(match) -> str:
    char = match.group()
    if unicodedata.category(char) not in UNSAFE:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class SetupError(Exception):
    """The terminal can't start: one line saying what is missing."""


@dataclass
class Config(AgentConfig):
    watch_interval: float = 1.0  # seconds between polls of /watch
    notice_interval: float = 3.0  # seconds between looks for runs of the thread that ended (a few Jobs API reads)
    workspace: str | None = None  # what configures a Databricks workspace here (DATABRICKS_HOST, a profile), or None
    log_level: str = ""  # LOG_LEVEL: log records on stderr; unset, warnings are said as plain notes

    @classmethod
    def from_env(cls, env=os.environ) -> "Config":
        return dataclasses.replace(super().from_env(env), workspace=workspace_source(env),
                                   log_level=(env.get("LOG_LEVEL") or "").strip().upper())


def workspace_source(env) -> str | None:
    """What configures a Databricks workspace here, or None."""
    if env.get("DATABRICKS_HOST") or env.get("DATABRICKS_CONFIG_PROFILE"):
        return "DATABRICKS_HOST" if env.get("DATABRICKS_HOST") else f"profile {env['DATABRICKS_CONFIG_PROFILE']}"
    path = Path(env.get("DATABRICKS_CONFIG_FILE") or "~/.databrickscfg").expanduser()
    profiles = configparser.ConfigParser()
    try:
        profiles.read(path)
    except configparser.Error:
        return None
    return f"the DEFAULT profile of {path}" if profiles.defaults().get("host") else None


def setup(args, config: Config):
    """(agent, close): on the configured workspace, or on the local one; prints where it runs."""
    source = None if args.local else config.workspace
    if not source:
        return setup_local(args, config)
    problems = config.problems()
    if problems:
        raise SetupError(f"a workspace is configured ({source}) but not set up for this agent: {'; '.join(problems)}. "
                         f"Deploy the agent there and set these (README: Deploy to Databricks), or run "
                         f"'python primary.py --local' to use the local workspace")
    agent = build_agent(config, span=tracing.Spans() if args.traces else None)
    print(f"workspace {agent.jobs.workspace.config.host} ({source}), job {config.job_id}", flush=True)
    return agent, agent.db.close


def setup_local(args, config: Config):
    """The agent on the local workspace, which it starts (Postgres, emulator, stand-ins) and says so."""
    import localws

    data_dir = Path(args.data_dir or localws.DEFAULT_DATA_DIR).expanduser()
    try:
        ws = localws.start(HERE, data_dir=data_dir, dsn=config.database.dsn or None, chat=config.chat,
                           quirks=localws.quirks.HARSH if args.harsh else localws.quirks.from_env(),
                           mlflow_experiment=tracing.LOCAL_RUNS_EXPERIMENT if args.traces else "")
    except localws.StartError as e:
        raise SetupError(str(e)) from e
    where = f"embedded Postgres (data in {data_dir / 'pgdata'})" if ws.postgres else "Postgres at LAKEBASE_DSN"
    model = (f"the model at {config.chat.base_url}" if config.chat.base_url
             else "the offline deterministic stand-in model")
    print(f"local workspace: emulated Databricks API at {ws.host}, jobs as local worker.py processes, Genie over "
          f"the sample dataset, {where}, {model}", flush=True)
    local = dataclasses.replace(config, job_id=str(ws.job_id), database=lakebase.LakebaseConfig(dsn=ws.dsn))
    try:
        agent = build_agent(local, host=ws.host, token=ws.token, span=tracing.Spans() if args.traces else None)
    except BaseException:
        ws.close()
        raise

    def close():
        agent.db.close()
        ws.close()
    return agent, close


def start_tracing(directory: str, log_level: str):
    """Traces to a local tracking directory, for this process and the local job runs; prints where they go."""
    try:
        uri = tracing.use_directory(directory, log_level)
    except ImportError:
        raise SetupError("--traces needs mlflow: pip install mlflow-skinny (or -r requirements-dev.txt)") from None
    except OSError as e:  # a file there, a directory we may not write to
        raise SetupError(f"--traces {directory}: {e.strerror or e}: give a directory you can write to") from None
    print(f"traces: MLflow tracking directory {uri} (experiments {tracing.LOCAL_TURNS_EXPERIMENT} and "
          f"{tracing.LOCAL_RUNS_EXPERIMENT})", flush=True)


class Notes(logging.Handler):
    """Warnings as the chat says them: one plain line each ("note: ..."), each kind once, not log records.
    `sink` prints a line (Terminal.notify while the chat runs)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen, self.sink = set(), lambda line: print(line, file=sys.stderr, flush=True)

    def emit(self, record):
        if (record.name, record.msg) not in self.seen:
            self.seen.add((record.name, record.msg))
            self.sink(f"note: {printable(record.getMessage())}")


class Terminal:
    """The chat loop: a prompt with line editing, the agent's replies, the slash commands, and a notice at the
    prompt when a run of the thread ends (a watcher thread, on a terminal only)."""

    def __init__(self, agent: PrimaryAgent, thread_id: str, watch_interval=1.0, notice_interval=3.0, stream=None):
        self.agent, self.thread_id, self.watch_interval = agent, thread_id, watch_interval
        self.stream = stream or agent.predict_stream  # a turn's events; with --traces, inside a trace
        self.notice_interval, self.tty = notice_interval, sys.stdin.isatty() and sys.stdout.isatty()
        self.lock, self.at_prompt, self.held = threading.Lock(), False, []  # held: notices that came mid-reply
        self.noticed, self.last_reply, self.done = set(), "", threading.Event()

    def loop(self):
        from databricks.sdk.errors import DatabricksError  # loaded already, by setup()

        self.switch(self.thread_id)
        if self.tty:
            _line_editing(self._prompt_up)
            threading.Thread(target=self._watch_runs, name="run-notices", daemon=True).start()
        try:
            while True:
                try:
                    line = self.read().strip()
                except EOFError:
                    return print()
                except KeyboardInterrupt:
                    print("\n(/quit to leave)")
                    continue
                if line in ("/quit", "/exit"):
                    return
                try:
                    if line.startswith("/"):
                        self.command(line)
                    elif line:
                        self.say(line)
                except (BadRequest, TurnFailed, lakebase.LakebaseError, psycopg.Error, llm.ToolError,
                        DatabricksError) as e:
                    print(f"error: {printable(lakebase.redact(str(e)))}", flush=True)
                except KeyboardInterrupt:
                    print("\n(interrupted: an answer still on its way is stored in the thread)", flush=True)
        finally:
            self.done.set()
            with self.lock:
                held, self.held = self.held, None  # from now on notices are printed as they come
            for notice in held:
                print(notice, flush=True)

    def read(self) -> str:
        """One message: a line, or a pasted block (bracketed paste with readline; else the lines pending with it)."""
        with self.lock:
            held, self.held = self.held, []
            self.at_prompt = not (self.tty and readline)  # with readline: once the prompt is up (_prompt_up)
        for notice in held:
            print(notice, flush=True)
        try:
            line = input(PROMPT)
        finally:
            with self.lock:
                self.at_prompt = False
        return line + (_pending_lines() if self.tty and readline is None else "")

    def _prompt_up(self):
        """readline's pre-input hook: the prompt is on the screen, notices may go above it."""
        with self.lock:
            held, self.held, self.at_prompt = self.held or [], [], True
        for notice in held:
            self.notify(notice)

    def notify(self, line: str):
        """Show a line now if the prompt is up, on a line of its own above what the user is typing; else after the
        reply being printed."""
        with self.lock:
            if self.held is not None and not self.at_prompt:
                return self.held.append(line)
            redraw = self.at_prompt and self.tty
            typed = readline.get_line_buffer() if readline and redraw else ""
            sys.stdout.write(f"\r\x1b[K{line}\n{PROMPT}{typed}" if redraw else f"{line}\n")
            sys.stdout.flush()

    def _watch_runs(self):
        """Every notice_interval: the thread's runs that ended and were not told yet get a notice, once each."""
        while not self.done.wait(self.notice_interval):
            thread = self.thread_id
            with self.lock:
                skip = [run for t, run in self.noticed if t == thread]
            try:
                reports = self.agent.finished_runs(thread, skip=skip)
            except (psycopg.Error, lakebase.LakebaseError, PoolTimeout) as e:
                log.debug("no run notices this time: %s", e)
                continue
            for report in reports:
                with self.lock:
                    seen = (thread, report["run_id"]) in self.noticed
                    self.noticed.add((thread, report["run_id"]))
                if not seen:
                    self.notify(notice(report))

    def say(self, text: str):
        """Send a message; print the reply as it streams in (a long one as its head and tail), each tool call on a
        line of its own."""
        request = {"input": [{"role": "user", "content": text}], "custom_inputs": {"thread_id": self.thread_id}}
        clip = None  # the message being printed
        for event in self.stream(request):
            item = event.get("item") or {}
            if event["type"] == "response.output_text.delta":
                clip = clip or Clip()
                clip.feed(printable(event["delta"]))
            elif event["type"] == "error":
                print("\n" * (clip is not None) + f"error: {printable(event['message'])}", flush=True)
                clip = None
            elif item.get("type") == "message":
                if clip is None:  # a message that was not streamed
                    clip = Clip()
                    clip.feed(printable(item["content"][0]["text"]))
                self.last_reply = clip.end()
                print("\n" if "custom_outputs" in event else "", flush=True)  # the reply ends with a blank line
                clip = None
            elif item.get("type") == "function_call":
                print(printable(f"  [{item['name']} {item['arguments']}]"), flush=True)

    def command(self, line: str):
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/help":
            print(HELP)
        elif name == "/new":
            self.switch(check_thread_id(arg) if arg else uuid.uuid4().hex, new=True)
        elif name == "/thread" and arg:
            self.switch(check_thread_id(arg))
        elif name == "/runs":
            self.runs()
        elif name == "/watch" and arg:
            self.watch(arg)
        elif name == "/last":
            print(self.last_reply or "no reply yet in this session")
        elif name in ("/thread", "/watch"):
            print(f"{name} needs {'a thread id' if name == '/thread' else 'a run id'}; /help lists the commands")
        else:
            print(f"unknown command {line!r}; /help lists them")

    def switch(self, thread_id: str, new=False):
        """Make `thread_id` the thread, saying whether it is new or continued (with a recap of its last turns);
        `new`: only if it has no turns yet."""
        with self.agent.db.connection() as conn:
            turns = lakebase.thread_turns(conn, thread_id)
            recent = lakebase.load_messages(conn, thread_id, last=RECAP_MESSAGES) if turns else []
        if new and turns:
            return print(f"thread {thread_id} already exists ({turns} turn{'s' * (turns != 1)}): /thread {thread_id} "
                         f"continues it")
        self.thread_id = thread_id
        if not turns:
            return print(f"thread {thread_id} (new) - /help for commands", flush=True)
        print(f"thread {thread_id} (continued, {turns} turn{'s' * (turns != 1)} so far) - /help for commands")
        for who, text in recap(recent):
            print(f"  {who}: {shorten(printable(text), 100)}")
        print(flush=True)

    def runs(self):
        with self.agent.db.connection() as conn:
            runs = lakebase.list_runs(conn, self.thread_id)
        if not runs:
            print("no job runs in this thread yet")
        rows = []
        for run in runs:
            try:
                state = summarize(self.agent.jobs.get(run["run_id"])).state
            except llm.ToolError as e:
                state = printable(f"(state unavailable: {e})")
            rows.append((f"run {run['run_id']}", state, f"{run['created_at']:%Y-%m-%d %H:%M}",
                         shorten(printable(run["request"]), 60)))
        widths = [max(len(row[i]) for row in rows) for i in range(3)] if rows else []
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])

    def watch(self, arg: str):
        """Print the run's steps as they are logged, until it ends, with a spinner (a dot per poll off a TTY)."""
        if not (arg.isascii() and arg.isdigit()):
            raise llm.ToolError(f"run {arg!r} is not a run id: /watch takes the number of a run (/runs lists them)")
        run_id = self.agent.own_run(self.thread_id, arg)
        cursor, started, spinner, tty = 0, time.monotonic(), itertools.cycle("|/-\\"), sys.stdout.isatty()
        marked = False  # a progress mark is on the current line
        try:
            while True:
                summary = summarize(self.agent.jobs.get(run_id))
                state, ended = summary.state, summary.finished
                with self.agent.db.connection() as conn:  # steps read after the end are all the steps
                    steps = lakebase.read_steps(conn, run_id, after=cursor)
                lines = [describe_step(step) for step in steps] + [f"run {run_id} ended: {state}"] * ended
                if lines:
                    print(("\r\x1b[K" if tty else "\n") * marked + printable("\n".join(lines)), flush=True)
                    cursor, marked = steps[-1]["step"] if steps else cursor, False
                if ended:
                    with self.lock:  # seen ending: no notice
                        self.noticed.add((self.thread_id, run_id))
                    return
                elapsed = time.monotonic() - started
                print(f"\r{next(spinner)} run {run_id} {state} {elapsed:.0f} s" if tty else ".", end="", flush=True)
                marked = True
                time.sleep(self.watch_interval)
        except KeyboardInterrupt:
            print(f"\nstopped watching run {run_id}; it goes on (/runs shows it)", flush=True)


def notice(report: dict) -> str:
    """One line saying how a run ended: its answer's first line, or what to ask."""
    run, first = f"run {report['run_id']}", ""
    if "answer" in report:
        lines = [line for line in report["answer"].splitlines() if line.strip()] or [""]
        first = shorten(printable(lines[0]), 100)
        rest = len(lines) > 1 or first.endswith("...")
        how = "ended without data" if "no_data" in report else "answered"
        return f"* {run} {how}: {first}" + (" (ask me for the whole answer)" if rest else "")
    if "error" in report:
        return f"* {run} failed: ask me for the details"
    if "cancelled" in report:
        return f"* {run} was cancelled"
    return f"* {run} ended without an answer ({report['state']}): ask me for the details"


def recap(messages: list) -> list[tuple[str, str]]:
    """The last RECAP_TURNS exchanges of a thread: ("you", message) and ("agent", its last reply) pairs."""
    pairs = []
    for m in messages:
        if m.get("role") == "user":
            pairs.append([("you", m.get("content") or "")])
        elif m.get("role") == "assistant" and m.get("content") and pairs:
            pairs[-1][1:] = [("agent", m["content"])]
    return [line for pair in pairs[-RECAP_TURNS:] for line in pair]


class Clip:
    """A reply printed as it streams in: its first HEAD_LINES lines as they come, the rest held; at its end the rest,
    or, when that is long, how many lines are left out and the last TAIL_LINES (/last shows the whole reply)."""

    def __init__(self):
        self.text, self.shown = "", 0  # all of the reply so far; how much of it is on the screen

    def feed(self, delta: str):
        self.text += delta
        head = _after_lines(self.text, HEAD_LINES)
        if head > self.shown:
            print(self.text[self.shown:head], end="", flush=True)
            self.shown = head

    def end(self) -> str:
        """Print what is held; the whole reply."""
        rest = self.text[self.shown:].split("\n")
        if len(rest) > TAIL_LINES + 5:
            rest = [f"[... {len(rest) - TAIL_LINES} more lines: /last shows the whole reply ...]", *rest[-TAIL_LINES:]]
        print("\n".join(rest), end="", flush=True)
        return self.text


def _after_lines(text: str, lines: int) -> int:
    """Where `text`'s first `lines` lines end (after their newline); its length if it has fewer."""
    at = -1
    for _ in range(lines):
        at = text.find("\n", at + 1)
        if at < 0:
            return len(text)
    return at + 1


def _line_editing(prompt_up):
    """Arrows edit and recall lines (readline, which also lifts the terminal's line length limit: it reads key by
    key); a pasted block arrives as one message (bracketed paste). `prompt_up()` runs once each prompt is shown."""
    if readline is None:
        return
    if "libedit" not in (readline.__doc__ or ""):  # libedit (macOS) has a syntax of its own
        readline.parse_and_bind("set enable-bracketed-paste on")
        readline.parse_and_bind("set horizontal-scroll-mode off")
    readline.set_pre_input_hook(prompt_up)


def _pending_lines() -> str:
    """Lines typed or pasted together with the one just read (without readline): they belong to one message."""
    more = ""
    while select.select([sys.stdin], [], [], PASTE_SECONDS)[0]:
        line = sys.stdin.readline()
        if not line:
            break
        more += "\n" + line.rstrip("\n")
    return more


class Wrapped(argparse.RawDescriptionHelpFormatter):
    """Keeps the lines of the description and epilog (the command and variable lists), wrapped to the terminal's
    width as argparse wraps the options, continuing under the text column."""

    def _fill_text(self, text, width, indent):
        entries = []  # [indent, text]: a line, with the lines continuing it (as indented as it, by 4 or more)
        for line in text.splitlines():
            depth = len(line) - len(line.lstrip())
            if entries and depth >= 4 and depth == entries[-1][0] and line.strip():
                entries[-1][1] += " " + line.strip()
            else:
                entries.append([depth, line])
        lines = []
        for _, line in entries:
            hang = re.match(r"\s*(?:\S+(?: \S+)*\s{2,})?", line).end()  # "  /watch RUN_ID   " or the indent
            lines += textwrap.wrap(line, width, subsequent_indent=" " * min(hang, width // 2),
                                   break_on_hyphens=False) or [""]
        return "\n".join(indent + line for line in lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="primary.py", formatter_class=Wrapped,
                                description="Chat with the primary agent: small talk answered directly, data "
                                            "questions answered by a Databricks Job run.",
                                epilog=f"{HELP}\n\n{ENVIRONMENT}\n\n'python primary.py deploy ...' deploys the "
                                       f"agent to Model Serving (serving.py; see 'deploy --help').")
    p.add_argument("--local", action="store_true", help="use the local workspace even when one is configured")
    p.add_argument("--data-dir", help="the local workspace's data directory (default ~/.local/share/async-agent)")
    p.add_argument("--thread", help="continue this thread (default: a new one)")
    p.add_argument("--harsh", action="store_true", help="a local workspace as harsh as the real one (LOCALWS_HARSH=1)")
    p.add_argument("--traces", metavar="DIR", help="write MLflow traces of the turns (and of the local job runs) to "
                   "the tracking directory DIR; needs mlflow. See them with: MLFLOW_ALLOW_FILE_STORE=true mlflow ui "
                   "--backend-store-uri DIR")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lakebase.guard_secrets()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is a KeyboardInterrupt from here on
    if argv[:1] == ["deploy"]:
        try:
            import serving  # with mlflow, which only the deploy command needs (it says how to install it)

            return serving.deploy_main(argv[1:])
        except KeyboardInterrupt:
            print("\nprimary.py deploy: interrupted; run it again to finish deploying", file=sys.stderr)
            return 130
    args = parser().parse_args(argv)
    config, notes = Config.from_env(), Notes()
    if config.log_level and not isinstance(logging.getLevelName(config.log_level), int):  # a number for a name
        print(f"primary.py: LOG_LEVEL={printable(config.log_level)} is not a log level: set DEBUG, INFO, WARNING or "
              f"ERROR, or leave it unset", file=sys.stderr)
        return 2
    if config.log_level:
        logging.basicConfig(level=config.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, handlers=[notes])
    try:
        thread_id = check_thread_id(args.thread or uuid.uuid4().hex)
        if args.traces:
            start_tracing(args.traces, config.log_level or "WARNING")
        agent, close = setup(args, config)
    except (SetupError, ConfigError, BadRequest, lakebase.LakebaseError, psycopg.Error) as e:
        print(f"primary.py: {printable(lakebase.redact(str(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nprimary.py: interrupted while starting", file=sys.stderr)
        return 130
    stream = tracing.traced_stream(agent.predict_stream) if args.traces else None
    terminal = Terminal(agent, thread_id, config.watch_interval, config.notice_interval, stream)
    notes.sink = terminal.notify
    try:
        terminal.loop()
    except KeyboardInterrupt:  # before the first prompt: the loop handles it after that
        print()
    finally:
        try:
            close()
        except KeyboardInterrupt:
            print("\nprimary.py: interrupted while stopping", file=sys.stderr)
    return 0
