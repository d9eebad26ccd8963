"""Records -> token ids with a per-token loss mask, through the model's chat template.

Assistant-only loss: the conversation is rendered turn by turn; for assistant turn i the prompt is the template
rendered over messages[:i] with the generation prompt, and the response is what rendering messages[:i+1] adds to
it, up to and including the end-of-turn token. Only response tokens of turns with a train flag carry loss.
Templates that rewrite history (the thinking template drops earlier reasoning) are handled by re-encoding from
the new prompt: earlier turns then stay context only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .readers import Conversation, Preference, TextDoc

# Strings that end an assistant turn in ERNIE 4.5's templates.
_END_OF_TURN = ("<|end_of_sentence|>", "<|im_end|>", "</s>")


@dataclass
class Sample:
    """One training sequence before packing."""

    ids: list[int]
    loss_mask: list[bool]
    """loss_mask[t]: token t is a prediction target (predicted from tokens < t of the same sample)."""


@dataclass
class PairSample:
    """One DPO pair: a shared prompt, and the chosen / rejected responses."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _cut_turn(response: str) -> tuple[str, str]:
    """Split a rendered assistant turn into (trained part up to the end-of-turn token, trailing context)."""
    ends = [(response.find(tok), tok) for tok in _END_OF_TURN if tok in response]
    if not ends:
        return response, ""
    pos, tok = min(ends)
    return response[: pos + len(tok)], response[pos + len(tok):]


class Encoder:
    """Encodes records for one tokenizer and sequence length."""

    def __init__(self, tokenizer, max_seq_len: int, max_prompt_len: int = 0):
        self.tok = tokenizer
        self.max_seq_len = max_seq_len
        self.max_prompt_len = max_prompt_len or max_seq_len // 2
        self.eos_id = tokenizer.eos_token_id

    def _render(self, messages, generation: bool, tools=None) -> str:
        kwargs = {"tools": tools} if tools else {}
        return self.tok.apply_chat_template(messages, add_generation_prompt=generation, **kwargs)

    def text(self, doc: TextDoc) -> list[Sample]:
        """A document -> chunks of at most max_seq_len tokens (EOS appended), every token a target but the first."""
        ids = self.tok.encode(doc.text) + [self.eos_id]
        out = []
        for start in range(0, len(ids), self.max_seq_len):
            chunk = ids[start : start + self.max_seq_len]
            if len(chunk) >= 2:
                out.append(Sample(chunk, [False] + [True] * (len(chunk) - 1)))
        return out

    def conversation(self, conv: Conversation) -> list[Sample]:
        ids: list[int] = []
        mask: list[bool] = []
        text = ""
        turn = 0
        for i, msg in enumerate(conv.messages):
            if msg["role"] != "assistant":
                continue
            train = conv.train[turn] if turn < len(conv.train) else True
            turn += 1
            prompt = self._render(conv.messages[:i], True, conv.tools)
            full = self._render(conv.messages[: i + 1], False, conv.tools)
            if not full.startswith(prompt):
                raise ValueError("the chat template does not render an assistant turn as an extension of its prompt")
            if prompt.startswith(text):
                new = self.tok.encode(prompt[len(text):])
                ids += new
                mask += [False] * len(new)
            else:  # the template rewrote history: restart from the prompt as inference would see it
                ids = self.tok.encode(prompt)
                mask = [False] * len(ids)
            trained, rest = _cut_turn(full[len(prompt):])
            resp = self.tok.encode(trained)
            ids += resp
            mask += [train] * len(resp)
            text = prompt + trained
            if rest:
                tail = self.tok.encode(rest)
                ids += tail
                mask += [False] * len(tail)
                text += rest
        ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
        return [Sample(ids, mask)] if any(mask[1:]) else []

    def preference(self, pref: Preference) -> PairSample:
        prompt_text = self._render(pref.prompt, True)
        prompt = self.tok.encode(prompt_text)[-self.max_prompt_len:]
        budget = self.max_seq_len - len(prompt)
        responses = []
        for answer in (pref.chosen, pref.rejected):
            full = self._render(pref.prompt + [{"role": "assistant", "content": answer}], False)
            if not full.startswith(prompt_text):
                raise ValueError("the chat template does not render an assistant turn as an extension of its prompt")
            trained, _ = _cut_turn(full[len(prompt_text):])
            responses.append(self.tok.encode(trained)[:budget])
        return PairSample(prompt, responses[0], responses[1])

    def encode(self, record) -> list:
        if isinstance(record, TextDoc):
            return self.text(record)
        if isinstance(record, Conversation):
            return self.conversation(record)
        return [self.preference(record)]
