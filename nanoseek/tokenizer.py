"""The tokenizer: byte-level BPE with single-digit numbers, V3's special tokens, the R1 chat template.

What. A byte-level BPE (the `tokenizers` library, Rust) trained on our own corpus. The pre-tokenizer
first isolates every digit together with at most one space before it (`Split(" ?\\d", isolated)`:
as DeepSeek LLM did, "123" is always "1","2","3", so the model sees place value the same way in
every number, which helps arithmetic; " 123" is " 1","2","3"), then applies GPT-2's ByteLevel split. No normalizer and `add_prefix_space=False`, so decode(encode(x))
== x byte for byte for any Unicode text (English, Chinese, whitespace runs, newlines); all 256 byte
symbols are in the initial alphabet, so no input is ever unknown.

Special tokens, ids fixed at the start of the vocabulary (V3 gives BOS = 0, EOS = 1; the rest of V3's
ids are >128k and are not reproduced, a small vocab cannot hold them):
    0 <｜begin▁of▁sentence｜>  BOS      special
    1 <｜end▁of▁sentence｜>    EOS      special
    2 <｜▁pad▁｜>              pad      special
    3 <｜User｜>               role     special
    4 <｜Assistant｜>          role     special
    5 <think>   6 </think>             added, NOT special
    7 <answer>  8 </answer>            added, NOT special
"Special" means "dropped by decode(skip_special_tokens=True)". Role markers and BOS/EOS are framing,
so they go. `<think>`/`</think>` are content of an R1 answer (the API splits `reasoning_content` on
them, the format reward looks for them), so they stay, as in V3's own tokenizer.json. `<answer>`/
`</answer>` are not V3 tokens; we add them because the R1-Zero template (spec §8.1) asks the model
to wrap its answer in them: as single tokens the tiny model learns the format in one token instead
of four (`<`, `answer`, `>` pieces), answers are shorter, and the format reward sees the exact string.
They are content like `<think>`, hence not special. All of these are matched in raw text before
BPE (so "<think>" typed in a prompt is the single token too, as in HF).

vocab_size counts everything above. The BPE trainer stops early when no pair occurs twice more
(min_frequency=2); then the vocab is smaller than asked and `Tokenizer.vocab_size` says so. A model
whose embedding is larger than the tokenizer vocab still works (the extra rows are never indexed;
HF Qwen2 ships exactly that), so callers size the model from their config, not from this number.

Chat template (spec §12; rendered by our own Python, `chat_template()` is the equivalent Jinja saved
for transformers, and a test checks they give identical ids):
    BOS + system text raw (several system messages joined by "\\n\\n")
    user      -> <｜User｜>content
    assistant -> <｜Assistant｜>content.split('</think>')[-1]<｜end▁of▁sentence｜>   (reasoning stripped)
    generation prompt -> <｜Assistant｜><think>\\n
SFT (`encode_conversation`). The template strips reasoning from *every* assistant turn, so the last
one, which we train on, is not rendered by the template: ids = template(history,
add_generation_prompt=True) + tokens(completion) where completion is the final assistant content
without its leading "<think>\\n" (the prompt holds it) plus EOS; content with no `</think>` gets
R1's empty reasoning "\\n</think>\\n\\n". Prompt and completion are tokenized separately and
concatenated: that is exactly what the model sees at inference (prompt tokenized alone, then
generated tokens), and no BPE merge crosses the boundary. loss_mask is 1 on the completion (EOS
included) and 0 on everything else, *including earlier assistant turns*: in history they appear
stripped to their answers right after `<｜Assistant｜>`, a position that at inference is always
followed by the `<think>\\n` prompt, so training on them would teach a "no thinking" mode that the
template never uses. To train on every turn, emit one example per assistant turn (its prefix).

R1-Zero prompt (`r1_zero_prompt`): spec §8.1 verbatim as one paragraph ending in
"User: {question}. Assistant:". The question is stripped; the period is added unless the question
already ends in sentence punctuation (".?!。？！"), so "What is 2+3?" does not become "?.". No
trailing space after "Assistant:": with byte-level BPE a trailing space is a token the model rarely
saw before "<think>"; the model emits " " (its own token, since <think> is an added token) itself.

Files written by `save(dir)`: tokenizer.json, tokenizer_config.json (PreTrainedTokenizerFast,
bos/eos/pad, add_bos_token, clean_up_tokenization_spaces=false so HF decode is byte-exact, and
chat_template for older transformers), special_tokens_map.json and chat_template.jinja (where
transformers 5 looks). Each file is written to a temp name and renamed. No transformers import.

Measured (2 cores, tokenizers 0.23.3, the synthetic English/Chinese/arithmetic corpus of
tests/test_tokenizer.py, 20k lines = 1.04M chars): vocab 1024 trains in 0.6 s (2.1 chars/token),
vocab 4096 in 1.1 s (2.4 chars/token). Why the space rides on the first digit: with
`Digits(individual_digits=True)` alone the space before a number was its own token (" 678" ->
" ", "6", "7", "8"), so "9 - 3 + 7" was 3 tokens an operand, " " tokens stood everywhere, and
copying an expression (what a worked arithmetic trace does first) needed 3 tokens of context to
find its place; a 4M-parameter base pretrained 800 steps never learned to copy one (0 of 32
restated expressions right). Now an operand is one token (" 3") plus one per further digit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
ANSWER, END_ANSWER = "<answer>", "</answer>"
# order = ids 0..8; the first five are special (skipped by decode(skip_special_tokens=True))
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]
ADDED_TOKENS = [THINK, END_THINK, ANSWER, END_ANSWER]
GENERATION_PROMPT = ASSISTANT + THINK + "\n"
EMPTY_REASONING = "\n" + END_THINK + "\n\n"  # R1 answers trivial prompts with "<think>\n\n</think>\n\n"
DEFAULT_MAX_LENGTH = 16384

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question} Assistant:"
)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero training template (R1 paper Table 1) around `question`.

    >>> r1_zero_prompt("What is 2+3").endswith("User: What is 2+3. Assistant:")
    True
    >>> r1_zero_prompt(" What is 2+3? ").endswith("User: What is 2+3? Assistant:")
    True
    """
    q = question.strip()
    if not q.endswith((".", "?", "!", "。", "？", "！")):
        q += "."
    return R1_ZERO_TEMPLATE.format(question=q)


def chat_template() -> str:
    """The Jinja form of `Tokenizer.render_chat`, saved for transformers (no tool calls)."""
    return (
        "{%- set ns = namespace(system='', first=true) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{%- if not ns.first %}{% set ns.system = ns.system + '\\n\\n' %}{% endif -%}"
        "{%- set ns.system = ns.system + m['content'] %}{% set ns.first = false -%}"
        "{%- endfor -%}"
        "{{- bos_token + ns.system -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{- '" + USER + "' + m['content'] -}}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{- '" + ASSISTANT + "' + m['content'].split('" + END_THINK + "')[-1] + '" + EOS + "' -}}"
        "{%- elif m['role'] != 'system' -%}{{- raise_exception('unsupported role ' + m['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + THINK + "\\n' -}}{%- endif -%}"
    )


def _new_backend() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    # digits first: each digit (with one space before it) becomes its own pre-token, so no merge
    # can ever join two digits
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(r" ?\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> "Tokenizer":
    """Train the BPE on `texts`; `vocab_size` includes the 9 special/added tokens and 256 bytes."""
    fixed = SPECIAL_TOKENS + ADDED_TOKENS
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(fixed) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} < {len(fixed) + len(alphabet)} (specials + 256 bytes)")
    tok = _new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=fixed,
        initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # the trainer registers all its tokens as special; <think>, <answer> and their closers are content
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    # encode(..., add_special_tokens=True), and HF's tokenizer(text), prepend BOS as V3's does
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, 0)])
    ids = [tok.token_to_id(t) for t in fixed]
    assert ids == list(range(len(fixed))), ids  # V3's BOS = 0, EOS = 1, then ours
    return Tokenizer(tok)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with nanoseek's ids, template and loss masks."""

    def __init__(self, backend: tokenizers.Tokenizer, model_max_length: int = DEFAULT_MAX_LENGTH):
        self.backend = backend
        self.model_max_length = model_max_length
        # looked up by name, so a V3 / R1-Distill tokenizer.json (ids > 128k, no <answer>) loads too;
        # a missing optional token is None
        ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS]
        self.bos_id, self.eos_id, self.pad_id, self.user_id, self.assistant_id = ids[:5]
        self.think_id, self.end_think_id, self.answer_id, self.end_answer_id = ids[5:]
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer lacks {BOS} or {EOS}")
        if self.pad_id is None:
            self.pad_id = self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # BOS by hand, not by the post-processor, so this holds for any loaded tokenizer.json
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # --- chat -------------------------------------------------------------------------------------
    @staticmethod
    def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The R1 chat template as text (spec §12); `chat_template()` is the same in Jinja."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        parts = [BOS, system]
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "user":
                parts.append(USER + content)
            elif role == "assistant":  # earlier turns keep only their answer, not their reasoning
                parts.append(ASSISTANT + content.split(END_THINK)[-1] + EOS)
            elif role != "system":
                raise ValueError(f"unsupported role {role!r}")
        if add_generation_prompt:
            parts.append(GENERATION_PROMPT)
        return "".join(parts)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    @staticmethod
    def completion_text(content: str) -> str:
        """What the model generates after the generation prompt for a final assistant `content`."""
        if content.startswith(THINK):  # the prompt already ends with "<think>\n"
            content = content[len(THINK):]
            return content[1:] if content.startswith("\n") else content
        return content if END_THINK in content else EMPTY_REASONING + content

    def encode_conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """SFT ids and loss mask: 1 on the final assistant turn's generated tokens (EOS included)."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("an SFT conversation must end with an assistant message")
        prompt = self.apply_chat_template(messages[:-1], add_generation_prompt=True)
        completion = self.encode(self.completion_text(messages[-1]["content"])) + [self.eos_id]
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)

    # --- files ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write an AutoTokenizer-loadable directory (existing files are replaced atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # HF would otherwise rewrite " ." -> "."
            "model_max_length": self.model_max_length,
            "padding_side": "left",  # generation batches; SFT collation pads on its own
            "chat_template": chat_template(),  # older transformers read it only from here
        }
        _atomic_write(d / "tokenizer.json", self.backend.to_str(pretty=True))
        _atomic_write(d / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2))
        _atomic_write(d / "special_tokens_map.json", json.dumps(specials, ensure_ascii=False, indent=2))
        _atomic_write(d / "chat_template.jinja", chat_template())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        d = Path(directory)
        backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        max_len = DEFAULT_MAX_LENGTH
        if (d / "tokenizer_config.json").exists():
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            max_len = int(cfg.get("model_max_length", max_len))
        return cls(backend, model_max_length=max_len)
