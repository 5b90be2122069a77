"""A real word-level tokenizer built offline with the `tokenizers` library, for the embedded and test models.

Words are lower-cased and split on whitespace and punctuation, so a question like "What colour is the
triangle?" becomes ["what", "colour", "is", "the", "triangle", "?"]: each text rater the UI shows is a word.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
# The LLaVA-1.5 conversation template (USER: <image>\n{question} ASSISTANT:) needs these words.
TEMPLATE_WORDS = ("user", ":", "assistant")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt_for(question: str) -> str:
    """The LLaVA-1.5 single-turn prompt."""
    return f"USER: <image>\n{question} ASSISTANT:"


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (plus specials and template words); unknown words map to <unk>."""
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *TEMPLATE_WORDS, *words):
        w = w if w in SPECIAL_TOKENS else w.lower()
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace (the template's newline too) separates words; punctuation marks are words of their own.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=2048,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
