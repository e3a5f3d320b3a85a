"""The terminal chat of `python primary.py`: a prompt, the agent's replies and the slash commands, on the configured
Databricks workspace or, without one, on the local stand-in workspace (the localws package).

`main()` reads the environment once into `Config`, `setup()` builds the agent's clients (the SDK is imported there,
not at the top), and `Terminal` runs the chat, with `/watch` following a run's steps live. `primary.py` calls
`main()` from its `__main__` block.
"""
import argparse
import configparser
import dataclasses
import itertools
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

import lakebase
import llm
from agent_io import BadRequest, check_thread_id
from llm import DEFAULT_ENDPOINT
from primary import AgentConfig, ConfigError, PrimaryAgent, TurnFailed, build_agent
from runs import FINISHED, describe_step, run_state, shorten

HERE = Path(__file__).resolve().parent

HELP = """commands:
  /new            start a new thread
  /thread ID      switch to thread ID
  /runs           this thread's job runs and their states
  /watch RUN_ID   follow a run's steps live until it ends (Ctrl-C stops watching; the run goes on)
  /help           this help
  /quit           leave (so does Ctrl-D)"""
ENVIRONMENT = f"""environment:
  DATABRICKS_HOST, DATABRICKS_TOKEN, DATABRICKS_CONFIG_PROFILE, ...  the workspace (the SDK's own auth); without
                  one (no host, no profile, no DEFAULT profile in ~/.databrickscfg) the local workspace starts
  DATABRICKS_JOB_ID   the worker job's id (needed with a workspace)
  LAKEBASE_DSN (or PGHOST, PGUSER, ...), LAKEBASE_INSTANCE or LAKEBASE_ENDPOINT, LAKEBASE_DATABASE
                  the Postgres of threads and step logs (one of them is needed with a workspace)
  LLM_ENDPOINT_NAME   the chat model's serving endpoint (default {DEFAULT_ENDPOINT})
  LLM_BASE_URL, LLM_MODEL, LLM_API_KEY   an OpenAI-compatible server instead (e.g. http://127.0.0.1:11434/v1)
  LOG_LEVEL       logging on stderr (default WARNING)"""


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but newline and tab: text must not drive the terminal


def printable(text: str) -> str:
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class SetupError(Exception):
    """The terminal can't start: one line saying what is missing."""


@dataclass
class Config(AgentConfig):
    watch_interval: float = 1.0  # seconds between polls of /watch
    workspace: str | None = None  # what configures a Databricks workspace here (DATABRICKS_HOST, a profile), or None
    log_level: str = "WARNING"  # LOG_LEVEL

    @classmethod
    def from_env(cls, env=os.environ) -> "Config":
        return dataclasses.replace(super().from_env(env), workspace=workspace_source(env),
                                   log_level=env.get("LOG_LEVEL") or "WARNING")


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
        raise SetupError(f"a workspace is configured ({source}) but {'; '.join(problems)}")
    agent = build_agent(config)
    print(f"workspace {agent.jobs.workspace.config.host} ({source}), job {config.job_id}", flush=True)
    return agent, agent.db.close


def setup_local(args, config: Config):
    """The agent on the local workspace, which it starts (Postgres, emulator, stand-ins) and says so."""
    import localws

    data_dir = Path(args.data_dir or localws.DEFAULT_DATA_DIR).expanduser()
    try:
        ws = localws.start(HERE, data_dir=data_dir, dsn=config.database.dsn or None, chat=config.chat,
                           quirks=localws.quirks.HARSH if args.harsh else localws.quirks.from_env())
    except localws.StartError as e:
        raise SetupError(str(e)) from e
    where = f"embedded Postgres (data in {data_dir / 'pgdata'})" if ws.postgres else "Postgres at LAKEBASE_DSN"
    model = (f"the model at {config.chat.base_url}" if config.chat.base_url
             else "the offline deterministic stand-in model")
    print(f"local workspace: emulated Databricks API at {ws.host}, jobs as local worker.py processes, Genie over "
          f"the sample dataset, {where}, {model}", flush=True)
    local = dataclasses.replace(config, job_id=str(ws.job_id), database=lakebase.LakebaseConfig(dsn=ws.dsn))
    try:
        agent = build_agent(local, host=ws.host, token=ws.token)
    except BaseException:
        ws.close()
        raise

    def close():
        agent.db.close()
        ws.close()
    return agent, close


class Terminal:
    """The chat loop: a prompt, the agent's replies, and the slash commands."""

    def __init__(self, agent: PrimaryAgent, thread_id: str, watch_interval=1.0):
        self.agent, self.thread_id, self.watch_interval = agent, thread_id, watch_interval

    def loop(self):
        from databricks.sdk.errors import DatabricksError  # loaded already, by setup()

        print(f"thread {self.thread_id} - /help for commands", flush=True)
        while True:
            try:
                line = input("> ").strip()
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
                print(f"error: {lakebase.redact(str(e))}", flush=True)
            except KeyboardInterrupt:
                print("\n(interrupted: an answer still on its way is stored in the thread)", flush=True)

    def say(self, text: str):
        """Send a message; print the reply as it streams in, each tool call on a line of its own."""
        request = {"input": [{"role": "user", "content": text}], "custom_inputs": {"thread_id": self.thread_id}}
        line_open = False  # streamed text is on the screen and its line not ended yet
        for event in self.agent.predict_stream(request):
            item = event.get("item") or {}
            if event["type"] == "response.output_text.delta":
                print(printable(event["delta"]), end="", flush=True)
                line_open = True
            elif event["type"] == "error":
                print("\n" * line_open + f"error: {printable(event['message'])}", flush=True)
                line_open = False
            elif item.get("type") == "message":
                if not line_open:  # a message that was not streamed
                    print(printable(item["content"][0]["text"]), end="")
                print("\n" if "custom_outputs" in event else "", flush=True)  # the reply ends with a blank line
                line_open = False
            elif item.get("type") == "function_call":
                print(printable(f"  [{item['name']} {item['arguments']}]"), flush=True)

    def command(self, line: str):
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/help":
            print(HELP)
        elif name == "/new":
            self.thread_id = uuid.uuid4().hex
            print(f"thread {self.thread_id}")
        elif name == "/thread" and arg:
            self.thread_id = check_thread_id(arg)
            print(f"thread {self.thread_id}")
        elif name == "/runs":
            self.runs()
        elif name == "/watch" and arg:
            self.watch(arg)
        elif name in ("/thread", "/watch"):
            print(f"{name} needs {'a thread id' if name == '/thread' else 'a run id'}; /help lists the commands")
        else:
            print(f"unknown command {line!r}; /help lists them")

    def runs(self):
        with self.agent.db.connection() as conn:
            runs = lakebase.list_runs(conn, self.thread_id)
        if not runs:
            print("no job runs in this thread yet")
        for run in runs:
            try:
                state = run_state(self.agent.jobs.get(run["run_id"]))
            except llm.ToolError as e:
                state = f"(state unavailable: {e})"
            print(f"run {run['run_id']}  {state}  {run['created_at']:%Y-%m-%d %H:%M}  {shorten(run['request'], 60)}")

    def watch(self, arg: str):
        """Print the run's steps as they are logged, until it ends, with a spinner (a dot per poll off a TTY)."""
        run_id = self.agent.own_run(self.thread_id, arg)
        cursor, started, spinner, tty = 0, time.monotonic(), itertools.cycle("|/-\\"), sys.stdout.isatty()
        marked = False  # a progress mark is on the current line
        try:
            while True:
                state = run_state(self.agent.jobs.get(run_id))
                with self.agent.db.connection() as conn:
                    steps = lakebase.read_steps(conn, run_id, after=cursor)
                ended = state.split()[0] in FINISHED  # steps read after the end are all the steps
                lines = [describe_step(step) for step in steps] + [f"run {run_id} ended: {state}"] * ended
                if lines:
                    print(("\r\x1b[K" if tty else "\n") * marked + "\n".join(lines), flush=True)
                    cursor, marked = steps[-1]["step"] if steps else cursor, False
                if ended:
                    return
                elapsed = time.monotonic() - started
                print(f"\r{next(spinner)} run {run_id} {state} {elapsed:.0f} s" if tty else ".", end="", flush=True)
                marked = True
                time.sleep(self.watch_interval)
        except KeyboardInterrupt:
            print(f"\nstopped watching run {run_id}; it goes on (/runs shows it)", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="primary.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Chat with the primary agent: small talk answered directly, data "
                                            "questions answered by a Databricks Job run.",
                                epilog=f"{HELP}\n\n{ENVIRONMENT}\n\n'python primary.py deploy ...' deploys the "
                                       f"agent to Model Serving (serving.py; see 'deploy --help').")
    p.add_argument("--local", action="store_true", help="use the local workspace even when one is configured")
    p.add_argument("--data-dir", help="the local workspace's data directory (default ~/.local/share/async-agent)")
    p.add_argument("--thread", help="continue this thread (default: a new one)")
    p.add_argument("--harsh", action="store_true", help="a local workspace as harsh as the real one (LOCALWS_HARSH=1)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deploy"]:
        import serving  # with mlflow, which only the deploy command needs (it says how to install it)

        return serving.deploy_main(argv[1:])
    args = parser().parse_args(argv)
    config = Config.from_env()
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        thread_id = check_thread_id(args.thread or uuid.uuid4().hex)
        agent, close = setup(args, config)
    except (SetupError, ConfigError, BadRequest, lakebase.LakebaseError, psycopg.Error) as e:
        print(f"primary.py: {lakebase.redact(str(e))}", file=sys.stderr)
        return 2
    try:
        Terminal(agent, thread_id, config.watch_interval).loop()
    finally:
        close()
    return 0
