"""`turnlog-chat` (and `turnlog chat`): an interactive terminal client built on the SDK.

prompt_toolkit reads the prompt (line editing, history, its own Ctrl-C and
Ctrl-D handling); rich renders the turn as it streams: text as it arrives,
tool calls and results, guardrail decisions that changed or blocked
something, retractions, and how the turn ended. Each turn runs over
Converse, so Ctrl-C during a turn cancels the turn in-band (the program
stays), and at the prompt it only clears the line.

Commands: /fork (continue in a fork of this conversation), /history (the
transcript folded from the log), /export FILE (JSONL, verified offline
after writing), /cancel (cancel a turn left running), /help, /quit.
`--conversation NAME` resumes a conversation (showing its last messages),
or creates it under that name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from turnlog.v1 import conversation_pb2 as pb
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog_client.aio import DEFAULT_TARGET, AsyncTurnlogClient, conversation_name
from turnlog_client.errors import NotFound, TurnlogError
from turnlog_client.streams import ConverseTurn
from turnlog_client.verify import verify_export

try:
    from prompt_toolkit import PromptSession
    from rich.console import Console
    from rich.markup import escape
except ImportError as e:  # the `chat` extra is not installed: `chat()` says so
    _MISSING: str | None = e.name
else:
    _MISSING = None

_ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "you",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}
_ENDED = {
    pb.TURN_STATUS_CANCELLED: "turn cancelled",
    pb.TURN_STATUS_FAILED: "turn failed",
    pb.TURN_STATUS_BLOCKED: "turn blocked",
    pb.TURN_STATUS_INTERRUPTED: "turn interrupted",
}
_VERDICTS = {spb.VERDICT_ALLOW: "allow", spb.VERDICT_MODIFY: "modify", spb.VERDICT_BLOCK: "block"}
HELP = (
    "/fork  continue in a fork of this conversation\n"
    "/history  the conversation as the log tells it\n"
    "/export FILE  write the JSONL export (and verify it)\n"
    "/cancel  cancel a turn that is still running\n"
    "/quit  leave (or Ctrl-D); Ctrl-C during a turn cancels the turn"
)


class Chat:
    """One chat session on one conversation (which `/fork` may switch)."""

    def __init__(
        self, client: AsyncTurnlogClient, console: Console, *, show_all_decisions: bool = False
    ) -> None:
        self.client = client
        self.console = console
        self.conversation = ""
        self.show_all_decisions = show_all_decisions

    async def open(self, name: str | None, system_prompt: str) -> None:
        """Resumes `name` (showing its last messages), creates it, or creates a new one."""
        if name:
            try:
                conversation = await self.client.get_conversation(name, message_limit=10)
            except NotFound:
                conversation = await self.client.create_conversation(
                    conversation_id=name.removeprefix("conversations/"),
                    system_prompt=system_prompt,
                )
                self.console.print(f"created {conversation.name}", highlight=False)
            else:
                self.console.print(f"resumed {conversation.name}", highlight=False)
                for message in conversation.messages:
                    self._message(message)
        else:
            conversation = await self.client.create_conversation(system_prompt=system_prompt)
            self.console.print(f"created {conversation.name}", highlight=False)
        self.conversation = conversation.name

    def _message(self, message: pb.Message) -> None:
        role = _ROLES.get(message.role, "?")
        self.console.print(f"{role}> {escape(message.content)}", highlight=False)
        for call in message.tool_calls:
            self.console.print(
                f"  [dim]tool call {escape(call.name)}({escape(call.arguments_json)})[/dim]",
                highlight=False,
            )

    async def command(self, line: str) -> bool:
        """Runs one /command; False when the chat should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.console.print(HELP, highlight=False)
        elif name == "/history":
            transcript = await self.client.transcript(self.conversation)
            self.console.print(
                f"{self.conversation} at version {transcript.version}", highlight=False
            )
            for message in transcript.messages:
                self._message(message)
        elif name == "/fork":
            fork = await self.client.fork_conversation(self.conversation)
            self.console.print(
                f"forked {self.conversation} into {fork.conversation.name} "
                f"(at version {fork.conversation.fork_origin.version}); now chatting there",
                highlight=False,
            )
            self.conversation = fork.conversation.name
        elif name == "/export":
            if not argument:
                self.console.print("usage: /export FILE", highlight=False)
                return True
            data = await self.client.export_conversation(self.conversation)
            path, events, intact = await asyncio.to_thread(_write_export, argument, data)
            state = "hash chain intact" if intact else "DOES NOT VERIFY"
            self.console.print(f"exported {events} events to {path} ({state})", highlight=False)
        elif name == "/cancel":
            await self._cancel_running()
        else:
            self.console.print(f"unknown command {name}; /help lists them", highlight=False)
        return True

    async def _cancel_running(self) -> None:
        conversation = await self.client.get_conversation(self.conversation, turn_limit=1)
        running = [t for t in conversation.turns if t.status == pb.TURN_STATUS_RUNNING]
        if not running:
            self.console.print("no turn is running", highlight=False)
            return
        ended = await self.client.cancel_turn(
            self.conversation, running[0].turn_id, reason="cancelled from turnlog chat"
        )
        self.console.print(
            f"[{_ENDED.get(ended.turn.status, 'turn ended')}]", highlight=False, markup=False
        )

    async def turn(self, content: str) -> None:
        """Runs one turn, rendering its events as they come; Ctrl-C cancels it."""
        turn = self.client.converse(self.conversation, content)
        loop = asyncio.get_running_loop()
        cancelling: list[asyncio.Task[None]] = []

        def interrupt() -> None:
            if not cancelling:
                self.console.print("\n^C cancelling the turn…", highlight=False)
                cancelling.append(loop.create_task(turn.cancel("cancelled from turnlog chat")))

        loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            await self._render(turn)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            for task in cancelling:
                with contextlib.suppress(TurnlogError):
                    await task

    async def _render(self, turn: ConverseTurn) -> None:
        out = self.console
        streaming = False  # a streamed line is open
        retracted = False  # this generation's streamed text was partly withdrawn
        async for event in turn:
            kind = event.WhichOneof("kind")
            if kind == "text_delta":
                if not streaming:
                    out.print("assistant> ", end="", highlight=False)
                    streaming = True
                out.print(event.text_delta.text, end="", highlight=False, markup=False)
                continue
            if kind == "retraction":
                retracted = True
            line = self._describe(event)
            if kind == "assistant_message":
                if retracted:
                    # What was shown is not what was recorded: show the record.
                    content = escape(event.assistant_message.content)
                    line = f"assistant (as recorded)> {content}"
                retracted = False
            if line is None:
                continue
            if streaming:
                out.print(highlight=False)  # end the streamed line first
                streaming = False
            out.print(line, highlight=False)
        if streaming:
            out.print(highlight=False)

    def _describe(self, event: spb.TurnEvent) -> str | None:
        """The line (rich markup) that shows a non-text event, or None to show nothing."""
        kind = event.WhichOneof("kind")
        if kind == "tool_execution_started":
            started = event.tool_execution_started
            where = "client" if started.client_side else "service"
            call = started.call
            return f"  [cyan]tool call[/cyan] {escape(call.name)}({escape(call.arguments_json)}) ({where})"
        if kind == "tool_execution_finished":
            execution = event.tool_execution_finished.execution
            if execution.error:
                return f"  [red]tool error[/red] {escape(execution.error)}"
            return f"  [cyan]tool result[/cyan] {escape(execution.result)}"
        if kind == "guardrail_decision":
            decision = event.guardrail_decision
            if decision.verdict == spb.VERDICT_ALLOW and not self.show_all_decisions:
                return None  # every guardrail allows every generation: too many to show
            verdict = _VERDICTS.get(decision.verdict, "?")
            reason = f" ({escape(decision.reason)})" if decision.reason else ""
            return f"  [yellow]guardrail[/yellow] {escape(decision.guardrail)}: {verdict}{reason}"
        if kind == "retraction":
            retraction = event.retraction
            reason = f" ({escape(retraction.reason)})" if retraction.reason else ""
            return f"  [yellow]retracted[/yellow] {retraction.retracted_chars} characters{reason}"
        if kind == "tool_round_limit_reached":
            return f"  [yellow]tool round limit[/yellow] {event.tool_round_limit_reached.limit}"
        if kind == "turn_ended":
            ended = event.turn_ended.turn
            if ended.status == pb.TURN_STATUS_COMPLETED:
                return None
            label = _ENDED.get(ended.status, "turn ended")
            reason = f": {ended.outcome_reason}" if ended.outcome_reason else ""
            return escape(f"[{label}{reason}]")
        return None

    async def run(self) -> int:
        session: PromptSession[str] = PromptSession()
        self.console.print("type a message, or /help", highlight=False)
        while True:
            try:
                line = (await session.prompt_async("you> ")).strip()
            except KeyboardInterrupt:
                self.console.print("(Ctrl-D or /quit to leave)", highlight=False)
                continue
            except EOFError:
                return 0
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not await self.command(line):
                        return 0
                else:
                    await self.turn(line)
            except TurnlogError as e:
                self.console.print(f"error: {e}", highlight=False, markup=False)


def _write_export(where: str, data: bytes) -> tuple[Path, int, bool]:
    """Writes an export to `where` and checks it offline: (path, events, intact)."""
    path = Path(where).expanduser()
    path.write_bytes(data)
    reports = verify_export(path)
    return path, sum(r.events_checked for r in reports), all(r.intact for r in reports)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnlog-chat", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The chat's options (shared with the server's `turnlog chat`)."""
    parser.add_argument(
        "--target",
        default=os.environ.get("TURNLOG_TARGET", DEFAULT_TARGET),
        help=f"the service's HOST:PORT (TURNLOG_TARGET; default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TURNLOG_TOKEN"),
        help="bearer token (TURNLOG_TOKEN)",
    )
    parser.add_argument(
        "--conversation", metavar="NAME", help="resume (or create) this conversation"
    )
    parser.add_argument("--system", default="", metavar="PROMPT", help="system prompt of a new one")
    parser.add_argument(
        "--all-decisions", action="store_true", help="show every guardrail decision, allows too"
    )


async def chat(args: argparse.Namespace) -> int:
    """Runs the chat with parsed `args` (see `add_arguments`)."""
    if _MISSING is not None:
        print(
            f"turnlog chat needs the chat extra ({_MISSING} is missing): "
            "pip install 'turnlog-client[chat]'",
            file=sys.stderr,
        )
        return 2
    console = Console(highlight=False)
    async with AsyncTurnlogClient(args.target, token=args.token) as client:
        session = Chat(client, console, show_all_decisions=args.all_decisions)
        try:
            await session.open(
                conversation_name(args.conversation) if args.conversation else None, args.system
            )
        except TurnlogError as e:
            console.print(f"turnlog chat: {e}", highlight=False, markup=False)
            return 2
        return await session.run()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(chat(args))
    except KeyboardInterrupt:  # Ctrl-C outside a turn and the prompt (a slow /export ...)
        return 130


if __name__ == "__main__":
    sys.exit(main())
