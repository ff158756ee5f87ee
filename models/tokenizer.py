"""The tokenizer and chat template, built from a GGUF file's metadata (or a tokenizer.json).

GGUF's `gpt2` model is byte-level BPE; we rebuild it with the `tokenizers` library from the
stored tokens and merges. The pre-tokenizer follows the GGUF `pre` name (SmolLM splits digits
one by one before the GPT-2 byte-level regex, as its Hugging Face tokenizer.json does).
"""

from __future__ import annotations

import os
from typing import Any

import jinja2
import jinja2.sandbox

from pipelive_jax.errors import ModelLoadError

_CONTROL = 3  # llama.cpp token type of special/control tokens
_USER_DEFINED = 4


class Tokenizer:
    """Text <-> token ids, plus the model's chat template.

    `add_bos` says whether `encode` prepends BOS (GGUF `tokenizer.ggml.add_bos_token`).
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool = False,
        chat_template: str | None = None,
        special_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._tok = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_ids = special_ids

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Renders messages ([{"role": ..., "content": ...}]) with the model's template."""
        if not self.chat_template:
            raise ModelLoadError("this model has no chat template")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise jinja2.exceptions.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        tmpl = env.from_string(self.chat_template)
        tok = self._tok
        return tmpl.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else "",
            eos_token=tok.id_to_token(self.eos_token_id) if self.eos_token_id is not None else "",
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, source: str = "GGUF") -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(
                f"{source}: tokenizer model {kind!r} is not supported (only 'gpt2' BPE)"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ModelLoadError(f"{source}: tokenizer tokens or merges missing from metadata")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = HFTokenizer(
            models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        pre = meta.get("tokenizer.ggml.pre")
        if pre in ("smollm", "starcoder", "refact", "codeshell"):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        from tokenizers import AddedToken

        special = [i for i, ty in enumerate(types) if ty in (_CONTROL, _USER_DEFINED)]
        tok.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in special]
        )
        return cls(
            tok,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            special_ids=frozenset(special),
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        import gguf

        from pipelive_jax.models.gguf_loader import read_metadata

        try:
            reader = gguf.GGUFReader(os.fspath(path))
        except Exception as e:
            raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
        return cls.from_gguf_metadata(read_metadata(reader), source=os.fspath(path))

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A Hugging Face model directory's tokenizer.json (+ tokenizer_config.json)."""
        import json

        from tokenizers import Tokenizer as HFTokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ModelLoadError(f"{path}: no tokenizer.json")
        tok = HFTokenizer.from_file(tj)
        conf: dict[str, Any] = {}
        cj = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cj):
            with open(cj) as f:
                conf = json.load(f)

        def tid(key: str) -> int | None:
            v = conf.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v) if isinstance(v, str) else None

        return cls(
            tok,
            bos_token_id=tid("bos_token"),
            eos_token_id=tid("eos_token"),
            add_bos=bool(conf.get("add_bos_token", False)),
            chat_template=conf.get("chat_template"),
        )
