"""Character-level chat tokenizer for toy models: a real `PreTrainedTokenizerFast`, built offline.

Every printable ASCII character (space to `~`) and `\\n` is one token; other characters map to
`<unk>`. Plain `encode` adds no BOS/EOS (one id per character); the chat template writes
`<s>` itself, so `apply_chat_template` output never carries a doubled BOS.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TEXT_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
END_OF_TURN_TOKEN = "<|end|>"

SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TEXT_TOKEN,
    UNK_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    SYSTEM_TOKEN,
    END_OF_TURN_TOKEN,
)
CHARACTERS: tuple[str, ...] = (*(chr(code) for code in range(ord(" "), ord("~") + 1)), "\n")

TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def toy_vocab() -> dict[str, int]:
    """Token -> id map of the toy tokenizer: special tokens first (`<pad>` is 0), then characters."""
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}


def _backend_tokenizer() -> Tokenizer:
    """Build the `tokenizers` backend: WordLevel over single characters, decoded without separators."""
    backend = Tokenizer(models.WordLevel(vocab=toy_vocab(), unk_token=UNK_TOKEN))
    # `[\s\S]` matches any single character, newline included; each match is its own pre-token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return backend


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the toy character tokenizer with its chat template; ids are the same on every call."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=END_OF_TURN_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[EOS_TEXT_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN],
        chat_template=TOY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
