"""Chat templates: how a conversation (a list of `Turn`s) becomes prompt text, and what closes a response.

A template renders the turns followed by the opener of the assistant's reply (the generation prompt), so the model
continues with the response. Templates only produce text: bos/eos ids are added by the caller around the encoded
text (`[bos] + encode(prompt) + encode(response + response_suffix(tok)) + [eos]`), never written as `<s>`/`</s>`.
Turn contents are inserted verbatim (no stripping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mrlhf.data.records import ROLES, Turn
from mrlhf.data.tokenizer import Tokenizer
from mrlhf.errors import MrlhfError


@dataclass(frozen=True)
class ChatTemplate:
    """A named chat format. Subclasses implement `_render` for turns already checked by `render_prompt`."""

    name: str
    """Registry name (`get_template(name)`)."""

    def render_prompt(self, turns: Sequence[Turn]) -> str:
        """Text of the conversation followed by the opener of the assistant's reply; MrlhfError for bad turns."""
        if not turns:
            raise MrlhfError(f"chat template '{self.name}': a prompt needs at least one turn")
        for i, turn in enumerate(turns):
            if turn.role not in ROLES:
                raise MrlhfError(
                    f"chat template '{self.name}': turn {i}: role {turn.role!r} is not one of {', '.join(ROLES)}"
                )
        return self._render(turns)

    def response_suffix(self, tokenizer: Tokenizer) -> str:
        """Text appended to the response before the eos id; "" when the eos token itself ends the turn."""
        return ""

    def _render(self, turns: Sequence[Turn]) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class TurnFormatTemplate(ChatTemplate):
    """Each turn rendered by one format string, then a fixed reply opener (plain, chatml)."""

    turn_format: str
    """Format of one turn, with `{role}` and `{content}` fields."""
    reply_opener: str
    """Text that opens the assistant's reply (the generation prompt)."""
    end_of_turn: str = ""
    """Text that closes a turn; a response needs it too unless the tokenizer's eos token is exactly this text."""

    def _render(self, turns: Sequence[Turn]) -> str:
        parts = [self.turn_format.format(role=t.role, content=t.content) for t in turns]
        return "".join(parts) + self.reply_opener

    def response_suffix(self, tokenizer: Tokenizer) -> str:
        """`end_of_turn` unless the tokenizer's eos token is already that text (e.g. Qwen's `<|im_end|>`)."""
        if not self.end_of_turn or tokenizer.eos_token == self.end_of_turn:
            return ""
        return self.end_of_turn


@dataclass(frozen=True)
class Llama2Template(ChatTemplate):
    """Llama-2 chat: `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} [INST] {user} [/INST] `.

    Meta's format also puts `<s>` before each `[INST]` and `</s>` after each assistant reply; those are token ids,
    not text, so they are not rendered here: only the caller's single bos (start) and eos (end of the response) are
    added. The reply opener is the single space after the last `[/INST]`.
    """

    def _render(self, turns: Sequence[Turn]) -> str:
        system = turns[0].content if turns[0].role == "system" else None
        dialog = turns[1:] if system is not None else turns
        for i, turn in enumerate(dialog):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.role != expected:
                index = i + (system is not None)
                raise MrlhfError(
                    f"chat template '{self.name}': turn {index} is {turn.role!r}, expected {expected!r} "
                    "(an optional system turn, then user/assistant alternating, ending with user)"
                )
        if len(dialog) % 2 == 0:  # empty, or ends with an assistant turn: nothing for the model to answer
            raise MrlhfError(f"chat template '{self.name}': the prompt must end with a user turn")
        parts = []
        for i, turn in enumerate(dialog):
            if turn.role == "assistant":
                parts.append(f" {turn.content} ")
            elif i == 0 and system is not None:
                parts.append(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{turn.content} [/INST]")
            else:
                parts.append(f"[INST] {turn.content} [/INST]")
        return "".join(parts) + " "


PLAIN = TurnFormatTemplate(name="plain", turn_format="<|{role}|>\n{content}\n", reply_opener="<|assistant|>\n")
LLAMA2 = Llama2Template(name="llama2")
CHATML = TurnFormatTemplate(
    name="chatml",
    turn_format="<|im_start|>{role}\n{content}<|im_end|>\n",
    reply_opener="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>",
)
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (PLAIN, LLAMA2, CHATML)}


def get_template(name: str) -> ChatTemplate:
    """The registered template called `name`; MrlhfError listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise MrlhfError(f"unknown chat template {name!r}; choose one of: {', '.join(sorted(TEMPLATES))}") from None
