"""Tiny stand-ins for the paper's model families: the REAL chat templates and special tokens, tiny weights.

Tests use them to check that tokenization and sampling follow each family's own end-of-turn token
and BOS handling, which the toy world's single template cannot show. Each family copies, from the
published `tokenizer_config.json` / `generation_config.json` of the model named in `source`:
the chat template (verbatim), the bos / eos / pad / unk tokens, the special tokens the template
uses, the generation config's `eos_token_id` list, and whether the tokenizer itself prepends BOS
when it encodes text (`adds_bos`: Llama-3's post-processor, Gemma's / Mistral's / InternLM's
`add_bos_token`). The vocabulary is the toy world's characters (printable ASCII and a newline, one
token each) plus those special tokens, so ids differ from the real ones; the model is a random
Llama of about 100K parameters (`tiny_models.build_tiny_llama`).

    path = save_family_model(FAMILIES["gemma2"], tmp_path / "gemma2")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import CHARACTERS


@dataclass(frozen=True)
class ChatFamily:
    """One model family's chat format, as its published tokenizer and generation configs state it."""

    name: str
    source: str
    """The hub model whose tokenizer_config.json / generation_config.json these values copy."""
    chat_template: str
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    unk_token: str | None
    end_of_turn: str
    """The token that closes an assistant turn in the template (what training and sampling must use)."""
    generation_eos: tuple[str, ...]
    """generation_config.json's eos_token_id, as tokens."""
    adds_bos: bool
    """Whether encoding text with special tokens prepends BOS (so a templated prompt could get two)."""


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3_MEDIUM_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
INTERNLM2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES: dict[str, ChatFamily] = {
    family.name: family
    for family in (
        # The first release's tokenizer: eos <|end_of_text|>; turns end with <|eot_id|>.
        ChatFamily(
            "llama3", "meta-llama/Meta-Llama-3-8B-Instruct", LLAMA3_TEMPLATE,
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token=None, unk_token=None,
            end_of_turn="<|eot_id|>", generation_eos=("<|end_of_text|>", "<|eot_id|>"), adds_bos=True,
        ),
        # eos <eos>; the release's generation config names only <eos>, turns end with <end_of_turn>.
        ChatFamily(
            "gemma2", "google/gemma-2-9b-it", GEMMA2_TEMPLATE,
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
            end_of_turn="<end_of_turn>", generation_eos=("<eos>",), adds_bos=True,
        ),
        # No BOS at all; eos <|im_end|>, pad <|endoftext|>, which the generation config also names.
        ChatFamily(
            "qwen2", "Qwen/Qwen2-7B-Instruct", QWEN2_TEMPLATE,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
            end_of_turn="<|im_end|>", generation_eos=("<|im_end|>", "<|endoftext|>"), adds_bos=False,
        ),
        # No generation-prompt flag (a user turn always opens the assistant's); eos <|endoftext|>.
        ChatFamily(
            "phi3", "microsoft/Phi-3-medium-4k-instruct", PHI3_MEDIUM_TEMPLATE,
            ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
            bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>",
            end_of_turn="<|end|>", generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), adds_bos=False,
        ),
        # Turns end with eos itself; no generation-prompt flag.
        ChatFamily(
            "mistral", "mistralai/Mistral-7B-Instruct-v0.2", MISTRAL_TEMPLATE, ("<unk>", "<s>", "</s>"),
            bos_token="<s>", eos_token="</s>", pad_token=None, unk_token="<unk>",
            end_of_turn="</s>", generation_eos=("</s>",), adds_bos=True,
        ),
        # ChatML turns with eos </s>; the generation config names both.
        ChatFamily(
            "internlm2", "internlm/internlm2_5-7b-chat", INTERNLM2_TEMPLATE,
            ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"),
            bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>",
            end_of_turn="<|im_end|>", generation_eos=("</s>", "<|im_end|>"), adds_bos=True,
        ),
    )
}  # fmt: skip


def build_family_tokenizer(family: ChatFamily) -> PreTrainedTokenizerFast:
    """A character tokenizer carrying `family`'s chat template and special tokens (same ids every call)."""
    vocab = {token: index for index, token in enumerate((*family.special_tokens, *CHARACTERS))}
    unknown = family.unk_token or family.special_tokens[0]
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unknown))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special_tokens])
    if family.adds_bos:
        bos = family.bos_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    named = {family.bos_token, family.eos_token, family.pad_token, family.unk_token}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos_token,
        eos_token=family.eos_token,
        pad_token=family.pad_token,
        unk_token=family.unk_token,
        extra_special_tokens=[t for t in family.special_tokens if t not in named],
        chat_template=family.chat_template,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def save_family_model(family: ChatFamily, out_dir: str | Path, *, seed: int = 0) -> str:
    """Saves a tiny random Llama with `family`'s tokenizer and generation config's end tokens; the path."""
    tokenizer = build_family_tokenizer(family)
    model = build_tiny_llama(tokenizer, seed=seed)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos]
    return save_tiny_model(model, tokenizer, out_dir)


def add_to_hub_cache(
    folder: str | Path, cache_dir: str | Path, repo_id: str, *, commit: str, refs: tuple[str, ...] = ()
) -> None:
    """Stores a saved model folder as commit `commit` of `repo_id` in a hub cache laid out like the real one.

    Offline loads of `repo_id` from that cache at a revision then read it: the commit hash itself, or
    a branch / tag named in `refs` (each written as `refs/NAME` holding the hash, as the hub client does).
    """
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in Path(folder).iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
